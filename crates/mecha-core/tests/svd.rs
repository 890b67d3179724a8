//! The SVD family end to end: decompositions cached across merges of the same recipe, the
//! seeded randomised range finder (accuracy, same seed → same bytes for any thread count), and
//! bad hyper-parameters or inputs as typed errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use common::*;
use mecha_core::exec::cache::MethodCache;
use mecha_core::exec::MergeOptions;
use mecha_core::methods::wholemath::svd::decompositions;
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::DType;

/// The decomposition counter is process-wide: tests that decompose run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const ROTATE_KEYS: [(&str, &[usize]); 4] =
    [("sq", &[6, 6]), ("tall", &[8, 5]), ("wide", &[3, 7]), ("conv", &[4, 3, 3, 3])];

/// A file with pseudo-random F32 tensors of these shapes.
fn write_keys(path: &Path, keys: &[(&str, &[usize])], seed: u64) {
    let tensors: Vec<(&str, Raw)> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, s))| (*k, f32_tensor(DType::F32, s, &values(seed * 10 + i as u64, s.iter().product()))))
        .collect();
    write_file(path, &tensors);
}

fn rotate_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    write_keys(&path, &ROTATE_KEYS, seed);
    path
}

/// `lr` [64, 48]: rank 4 plus 1 % noise; `zero`: the same shape of zeros (to add a delta to).
fn low_rank_model(dir: &Path) -> (PathBuf, PathBuf, Vec<f32>) {
    let (m, n, r) = (64, 48, 4);
    let (left, right, noise) = (values(1, m * r), values(2, r * n), values(3, m * n));
    let data: Vec<f32> = (0..m * n)
        .map(|idx| {
            let (i, j) = (idx / n, idx % n);
            (0..r).map(|k| left[i * r + k] * right[k * n + j]).sum::<f32>() + 0.01 * noise[idx]
        })
        .collect();
    let (path, zero) = (dir.join("lr.safetensors"), dir.join("zero.safetensors"));
    write_file(&path, &[("lr", f32_tensor(DType::F32, &[m, n], &data))]);
    write_file(&zero, &[("lr", f32_tensor(DType::F32, &[m, n], &vec![0.0; m * n]))]);
    (path, zero, data)
}

fn kw(name: &str, v: Scalar) -> (String, Arg) {
    (name.into(), Arg::Value(v))
}

fn rotate_recipe(a: &Path, b: &Path, kwargs: Vec<(String, Arg)>) -> mecha_core::Result<Recipe> {
    let mut r = RecipeBuilder::new();
    let (na, nb) =
        (r.model(a.to_str().unwrap(), None, Some("weight")), r.model(b.to_str().unwrap(), None, Some("weight")));
    let root = r.merge("rotate", vec![Arg::Node(na), Arg::Node(nb)], kwargs)?;
    r.finish(root)
}

/// `zero + method(delta)` with the delta model `lr`.
fn delta_recipe(lr: &Path, zero: &Path, method: &str, kwargs: Vec<(String, Arg)>) -> mecha_core::Result<Recipe> {
    let mut r = RecipeBuilder::new();
    let d = r.model(lr.to_str().unwrap(), None, Some("delta"));
    let z = r.model(zero.to_str().unwrap(), None, Some("weight"));
    let t = r.merge(method, vec![Arg::Node(d)], kwargs)?;
    let root = r.merge("add_difference", vec![Arg::Node(z), Arg::Node(t)], vec![])?;
    r.finish(root)
}

fn bytes(result: &mecha_core::exec::MergeResult) -> Vec<Vec<u8>> {
    result.tensors.iter().map(|t| t.data.clone()).collect()
}

fn with_cache(cache: &Arc<MethodCache>) -> MergeOptions {
    MergeOptions { cache: cache.clone(), ..f32_memory() }
}

/// Frobenius distance.
fn distance(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt()
}

fn truncate(rank: i64, approximate: bool, seed: Scalar) -> Vec<(String, Arg)> {
    vec![
        kw("rank", Scalar::Int(rank)),
        kw("use_approximate_basis", Scalar::Bool(approximate)),
        kw("approximate_basis_seed", seed),
    ]
}

#[test]
fn decompositions_are_cached_across_merges_and_give_fresh_results() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rotate_model(dir.path(), "a.safetensors", 1), rotate_model(dir.path(), "b.safetensors", 2));
    let rotate = |alignment: f64, alpha: f64| {
        rotate_recipe(&a, &b, vec![kw("alignment", Scalar::Float(alignment)), kw("alpha", Scalar::Float(alpha))])
            .unwrap()
    };
    let cache = Arc::new(MethodCache::new(1 << 30));
    let before = decompositions();
    run(rotate(0.5, 0.0), &with_cache(&cache));
    let first = decompositions() - before;
    assert!(first >= 4, "one Procrustes SVD per key at least: {first}");
    assert!(cache.bytes() > 0);

    // Another fractional alignment and alpha: the transforms, eigenbases and Stiefel logs are reused.
    let before = decompositions();
    let cached = run(rotate(0.7, 0.3), &with_cache(&cache));
    assert_eq!(decompositions() - before, 0, "the second merge decomposes nothing");
    let fresh = run(rotate(0.7, 0.3), &f32_memory());
    assert_eq!(bytes(&cached), bytes(&fresh), "a cached result equals a fresh one");

    // The factors of a float32 merge are kept in float32, those of a float64 merge in float64:
    // twice the bytes, and there too a cached result equals a fresh one.
    let f64_merge = |cache: &Arc<MethodCache>| {
        let mut options = with_cache(cache);
        options.plan.merge_dtype = mecha_core::exec::plan::MergeDtype::F64;
        options
    };
    let single_bytes = cache.bytes();
    let double = Arc::new(MethodCache::new(1 << 30));
    run(rotate(0.5, 0.0), &f64_merge(&double));
    run(rotate(0.7, 0.3), &f64_merge(&double));
    let ratio = double.bytes() as f64 / single_bytes as f64;
    // (less than twice on these tiny keys: the eigen-angles are float64 in both)
    assert!((1.7..2.0).contains(&ratio), "float64 factors take about twice the bytes: {ratio}");
    let before = decompositions();
    let cached = run(rotate(0.7, 0.3), &f64_merge(&double));
    assert_eq!(decompositions() - before, 0);
    assert_eq!(bytes(&cached), bytes(&run(rotate(0.7, 0.3), &f64_merge(&Arc::new(MethodCache::new(1 << 30))))));

    // An integer alignment keeps the reflection, so its transform is another one.
    let before = decompositions();
    run(rotate(2.0, 0.0), &with_cache(&cache));
    assert!(decompositions() > before);

    // truncate_rank: the exact basis serves every rank up to the one it was computed for; a
    // larger rank is computed again (and then serves the smaller ones).
    let (lr, zero, _) = low_rank_model(dir.path());
    let cache = Arc::new(MethodCache::new(1 << 30));
    let full = |rank| delta_recipe(&lr, &zero, "truncate_rank", truncate(rank, false, Scalar::Null)).unwrap();
    run(full(5), &with_cache(&cache));
    let before = decompositions();
    let cached = run(full(3), &with_cache(&cache));
    assert_eq!(decompositions() - before, 0);
    assert_eq!(bytes(&cached), bytes(&run(full(3), &f32_memory())));
    let before = decompositions();
    run(full(7), &with_cache(&cache));
    assert!(decompositions() > before, "a larger rank than the cached basis holds is computed");
    let before = decompositions();
    run(full(6), &with_cache(&cache));
    assert_eq!(decompositions() - before, 0);
    // The randomised basis is cached per rank and seed.
    let approx = |seed| delta_recipe(&lr, &zero, "truncate_rank", truncate(4, true, Scalar::Int(seed))).unwrap();
    run(approx(1), &with_cache(&cache));
    let before = decompositions();
    run(approx(1), &with_cache(&cache));
    assert_eq!(decompositions() - before, 0);
    run(approx(2), &with_cache(&cache));
    assert!(decompositions() > before, "another seed draws another basis");

    // truncate_kronecker: another ratio with the same factor shapes reuses the SVD.
    let kron = |ratio| {
        delta_recipe(
            &lr,
            &zero,
            "truncate_kronecker",
            vec![kw("kronecker_ratio", Scalar::Float(ratio)), kw("use_approximate_basis", Scalar::Bool(false))],
        )
        .unwrap()
    };
    run(kron(0.5), &with_cache(&cache));
    let before = decompositions();
    let cached = run(kron(0.5), &with_cache(&cache));
    assert_eq!(decompositions() - before, 0);
    assert_eq!(bytes(&cached), bytes(&run(kron(0.5), &f32_memory())));
}

#[test]
fn the_approximate_basis_is_accurate_and_seeded() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (lr, zero, data) = low_rank_model(dir.path());
    let merge = |approximate, seed: Scalar, threads| {
        let recipe = delta_recipe(&lr, &zero, "truncate_rank", truncate(4, approximate, seed)).unwrap();
        run(recipe, &MergeOptions { threads, ..f32_memory() })
    };
    let exact = tensor(&merge(false, Scalar::Null, 0), "lr").1;
    let approx = merge(true, Scalar::Int(7), 1);
    let err_exact = distance(&exact, &data);
    let err_approx = distance(&tensor(&approx, "lr").1, &data);
    // The best rank-4 error is the noise's; two power iterations come within 1 % of it.
    assert!(err_exact > 0.0 && err_approx <= err_exact * 1.01, "{err_approx} vs {err_exact}");
    assert_eq!(bytes(&approx), bytes(&merge(true, Scalar::Int(7), 3)), "same seed, same bytes, any threads");
    assert_ne!(bytes(&approx), bytes(&merge(true, Scalar::Int(8), 1)), "another seed, another basis");
}

#[test]
fn ranks_are_clamped_as_sd_mecha_does() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (lr, zero, data) = low_rank_model(dir.path());
    let merged = |rank| {
        tensor(
            &run(
                delta_recipe(&lr, &zero, "truncate_rank", truncate(rank, false, Scalar::Null)).unwrap(),
                &f32_memory(),
            ),
            "lr",
        )
        .1
    };
    assert_eq!(merged(48), data, "full rank: a itself");
    assert_eq!(merged(1000), data, "more than full: clamped to full");
    assert!(merged(0).iter().all(|&v| v == 0.0));
    assert!(merged(-3).iter().all(|&v| v == 0.0), "negative: clamped to 0");
}

#[test]
fn bad_parameters_and_inputs_are_typed_errors() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rotate_model(dir.path(), "a.safetensors", 1), rotate_model(dir.path(), "b.safetensors", 2));
    let merge_err = |recipe: mecha_core::Result<Recipe>, options: &MergeOptions| {
        let recipe = recipe.unwrap();
        mecha_core::exec::merge(recipe, options, &std::sync::atomic::AtomicBool::new(false), None)
            .err()
            .expect("an error")
            .message
    };
    for (name, value) in
        [("alignment", f64::NAN), ("alignment", f64::INFINITY), ("centralization", f64::NAN), ("alpha", f64::NAN)]
    {
        let e = merge_err(rotate_recipe(&a, &b, vec![kw(name, Scalar::Float(value))]), &f32_memory());
        assert!(e.contains("rotate") && e.contains(name), "{e}");
    }
    let e = merge_err(
        rotate_recipe(&a, &b, vec![kw("alignment", Scalar::Float(0.5)), kw("stiefel_max_iters", Scalar::Int(0))]),
        &f32_memory(),
    );
    assert!(e.contains("stiefel_max_iters"), "{e}");

    // NaN reaching the SVD (sd-mecha's default would drop the key first).
    let nan = dir.path().join("nan.safetensors");
    let mut v = values(11, 36);
    v[7] = f32::NAN;
    write_file(&nan, &[("sq", f32_tensor(DType::F32, &[6, 6], &v))]);
    let keep_nan = MergeOptions { omit_non_finite_inputs: false, ..f32_memory() };
    let e = merge_err(rotate_recipe(&nan, &a, vec![]), &keep_nan);
    assert!(e.contains("rotate") && e.contains("finite"), "{e}");
    let e = merge_err(delta_recipe(&nan, &a, "truncate_rank", truncate(2, false, Scalar::Null)), &keep_nan);
    assert!(e.contains("truncate_rank") && e.contains("NaN"), "{e}");

    let (lr, zero, _) = low_rank_model(dir.path());
    let e = merge_err(
        delta_recipe(&lr, &zero, "truncate_kronecker", vec![kw("kronecker_ratio", Scalar::Float(f64::NAN))]),
        &f32_memory(),
    );
    assert!(e.contains("truncate_kronecker") && e.contains("kronecker_ratio"), "{e}");
}

#[test]
fn get_rank_from_ratio_is_decided_from_shapes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (lr, zero, data) = low_rank_model(dir.path());
    let mut r = RecipeBuilder::new();
    let d = r.model(lr.to_str().unwrap(), None, Some("delta"));
    let z = r.model(zero.to_str().unwrap(), None, Some("weight"));
    let rank =
        r.merge("get_rank_from_ratio", vec![Arg::Node(d)], vec![kw("ratio", Scalar::Float(4.0 / 48.0))]).unwrap();
    let t = r
        .merge(
            "truncate_rank",
            vec![Arg::Node(d)],
            vec![("rank".into(), Arg::Node(rank)), kw("use_approximate_basis", Scalar::Bool(false))],
        )
        .unwrap();
    let root = r.merge("add_difference", vec![Arg::Node(z), Arg::Node(t)], vec![]).unwrap();
    let via_ratio = tensor(&run(r.finish(root).unwrap(), &f32_memory()), "lr").1;
    let direct = tensor(
        &run(delta_recipe(&lr, &zero, "truncate_rank", truncate(4, false, Scalar::Null)).unwrap(), &f32_memory()),
        "lr",
    )
    .1;
    assert_eq!(via_ratio, direct);
    assert_ne!(via_ratio, data);
}

#[test]
fn degenerate_shapes_neither_panic_nor_give_nan() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let shapes: [(&str, &[usize]); 8] = [
        ("row", &[1, 4]),
        ("column", &[4, 1]),
        ("one", &[1, 1]),
        ("primes", &[7, 5]),
        ("conv1x1_wide", &[2, 3, 1, 1]),
        ("conv_one", &[1, 1, 3, 3]),
        ("three_d", &[2, 3, 2]),
        ("empty", &[0, 3]),
    ];
    let model = |name: &str, seed: u64| {
        let path = dir.path().join(name);
        write_keys(&path, &shapes, seed);
        path
    };
    let (a, b) = (model("a.safetensors", 3), model("b.safetensors", 4));
    let finite = |result: &mecha_core::exec::MergeResult| {
        for (k, _) in shapes {
            assert!(tensor(result, k).1.iter().all(|v| v.is_finite()), "{k}");
        }
    };
    for alignment in [0.5, 1.0, 2.0, -0.3] {
        for alpha in [0.0, 0.5] {
            let kwargs = vec![kw("alignment", Scalar::Float(alignment)), kw("alpha", Scalar::Float(alpha))];
            finite(&run(rotate_recipe(&a, &b, kwargs).unwrap(), &f32_memory()));
        }
    }
    for rank in [1, 2, 3] {
        finite(&run(
            delta_recipe(&a, &b, "truncate_rank", truncate(rank, false, Scalar::Null)).unwrap(),
            &f32_memory(),
        ));
        finite(&run(
            delta_recipe(&a, &b, "truncate_rank", truncate(rank, true, Scalar::Int(5))).unwrap(),
            &f32_memory(),
        ));
    }
    for ratio in [0.0, 0.5, 1.0] {
        for approximate in [false, true] {
            let kwargs = vec![
                kw("kronecker_ratio", Scalar::Float(ratio)),
                kw("use_approximate_basis", Scalar::Bool(approximate)),
                kw("approximate_basis_seed", Scalar::Int(1)),
            ];
            finite(&run(delta_recipe(&a, &b, "truncate_kronecker", kwargs).unwrap(), &f32_memory()));
        }
    }
}
