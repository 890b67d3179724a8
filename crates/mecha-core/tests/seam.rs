//! The method seam end to end: methods registered here with their own key maps, plans and runs
//! (several outputs from one run, several input keys stacked into one, exact integer
//! parameters), the memory budget, skips decided while running, and determinism.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use common::*;
use mecha_core::exec::plan::PlanOptions;
use mecha_core::exec::{merge, MergeOptions, OutputTarget};
use mecha_core::methods::seam::{
    Arg, Clause, ComputeSpec, Decision, KeyMapCall, KeyRelation, Meta, Method, Output, PlanCall, RunCall,
};
use mecha_core::methods::{registry, DefaultValue, MethodSpec, ParamKind, ParamSpec, ReturnSpec, SpaceSpec, ValueType};
use mecha_core::recipe::{Arg as RecipeArg, Recipe, RecipeBuilder, Scalar};
use mecha_core::DType;

fn param(name: &str, value_type: ValueType, default: Option<DefaultValue>) -> ParamSpec {
    ParamSpec {
        name: name.into(),
        value_type,
        state_dict: true,
        space: if default.is_some() { SpaceSpec::Fixed(vec!["param".into()]) } else { SpaceSpec::Symbol },
        config: None,
        kind: ParamKind::Positional,
        default,
    }
}

fn register(id: &str, params: Vec<ParamSpec>, method: impl Method + 'static) {
    register_with_config(id, params, None, method)
}

fn register_with_config(id: &str, params: Vec<ParamSpec>, config: Option<&str>, method: impl Method + 'static) {
    let returns =
        ReturnSpec { value_type: ValueType::Tensor, space: SpaceSpec::Symbol, config: config.map(Into::into) };
    let spec = MethodSpec::new(id, "test method", params, returns, method);
    // Tests in this file share the process-wide registry; each id is registered once.
    let _ = registry().register(spec);
}

/// Reads `q`, `k`, `v` and writes `q` = q + k + v, `k` = k·2, `v` = v − q in one run, counting runs.
struct ThreeOutputs {
    runs: Arc<AtomicUsize>,
}

impl Method for ThreeOutputs {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let all: Vec<String> = ["q", "k", "v"].iter().map(|s| s.to_string()).collect();
        all.contains(&call.key.to_string()).then(|| KeyRelation {
            outputs: all.clone(),
            clauses: vec![Clause { inputs: vec![Some(all)], meta: Meta::new(7u32) }],
        })
    }
    fn plan(&self, call: &PlanCall) -> Result<Decision, mecha_core::MechaError> {
        assert_eq!(call.meta.get::<u32>(), Some(&7));
        Ok(ComputeSpec::whole(call.args[0][0].shape.clone()))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>, mecha_core::MechaError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let [q, k, v] = [0, 1, 2].map(|i| call.tensor(0, i).unwrap());
        Ok(vec![Arg::Tensor(((&q + &k)? + &v)?), Arg::Tensor((&k * 2.0)?), Arg::Tensor((&v - &q)?)])
    }
}

/// `qkv` = the concatenation of the input's `q`, `k`, `v` (three keys stacked into one).
struct Concat;

impl Method for Concat {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        (call.key == "qkv").then(|| KeyRelation {
            outputs: vec!["qkv".into()],
            clauses: vec![Clause {
                inputs: vec![Some(vec!["q".into(), "k".into(), "v".into()])],
                meta: Meta::default(),
            }],
        })
    }
    fn plan(&self, call: &PlanCall) -> Result<Decision, mecha_core::MechaError> {
        let n: usize = call.args[0].iter().map(|a| a.numel()).sum();
        Ok(ComputeSpec::whole(Some(vec![n])))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>, mecha_core::MechaError> {
        let parts: Vec<Tensor> = call.tensors(0)?.iter().map(|t| t.flatten_all().unwrap()).collect();
        Ok(vec![Arg::Tensor(Tensor::cat(&parts, 0)?)])
    }
}

/// a + seed's low bits as f32, checking that the 64-bit integer arrives exactly.
struct ExactInt;

impl Method for ExactInt {
    fn plan(&self, call: &PlanCall) -> Result<Decision, mecha_core::MechaError> {
        assert_eq!(call.args[1][0].constant, Some(Scalar::Int((1 << 60) + 1)));
        Ok(ComputeSpec::whole(call.args[0][0].shape.clone()))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>, mecha_core::MechaError> {
        let seed = call.int(1)?;
        assert_eq!(seed, (1 << 60) + 1, "64-bit integers are not squeezed through floats");
        let a = call.tensor(0, 0)?;
        Ok(vec![Arg::Tensor((a + (seed & 0xff) as f64)?)])
    }
}

fn qkv_model(dir: &Path) -> (PathBuf, [Vec<f32>; 3]) {
    let path = dir.join("qkv.safetensors");
    let vals = [values(1, 6), values(2, 6), values(3, 6)];
    write_file(
        &path,
        &[
            ("q", f32_tensor(DType::F32, &[2, 3], &vals[0])),
            ("k", f32_tensor(DType::F32, &[2, 3], &vals[1])),
            ("v", f32_tensor(DType::F32, &[2, 3], &vals[2])),
        ],
    );
    (path, vals)
}

fn one_method(path: &Path, id: &str, extra: Vec<RecipeArg>) -> Recipe {
    let mut r = RecipeBuilder::new();
    let m = r.model(path.to_str().unwrap(), None, Some("weight"));
    let mut args = vec![RecipeArg::Node(m)];
    args.extend(extra);
    let root = r.merge(id, args, vec![]).unwrap();
    r.finish(root).unwrap()
}

#[test]
fn a_group_with_several_outputs_is_computed_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    register("test_three_outputs", vec![param("a", ValueType::Tensor, None)], ThreeOutputs { runs: runs.clone() });
    let dir = tempfile::tempdir().unwrap();
    let (path, [q, k, v]) = qkv_model(dir.path());
    for threads in [1, 2, 3] {
        runs.store(0, Ordering::SeqCst);
        let result = run(one_method(&path, "test_three_outputs", vec![]), &MergeOptions { threads, ..f32_memory() });
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for the three keys ({threads} threads)");
        let want_q: Vec<f32> = (0..6).map(|i| q[i] + k[i] + v[i]).collect();
        assert_eq!(tensor(&result, "q").1, want_q);
        assert_eq!(tensor(&result, "k").1, k.iter().map(|x| x * 2.0).collect::<Vec<_>>());
        assert_eq!(tensor(&result, "v").1, (0..6).map(|i| v[i] - q[i]).collect::<Vec<_>>());
    }
}

#[test]
fn several_input_keys_stack_into_one_output() {
    // From a config with q, k and v to one with their concatenation.
    for yaml in [
        "identifier: test-split\ncomponents:\n  all:\n    q: {shape: [2, 3], dtype: float32}\n    \
         k: {shape: [2, 3], dtype: float32}\n    v: {shape: [2, 3], dtype: float32}\n",
        "identifier: test-joined\ncomponents:\n  all:\n    qkv: {shape: [18], dtype: float32}\n",
    ] {
        let _ = mecha_core::configs::register(mecha_core::configs::from_yaml(yaml, None).unwrap());
    }
    let input = ParamSpec { config: Some("test-split".into()), ..param("a", ValueType::Tensor, None) };
    register_with_config("test_concat", vec![input], Some("test-joined"), Concat);
    let dir = tempfile::tempdir().unwrap();
    let (path, [q, k, v]) = qkv_model(dir.path());
    let result = run(one_method(&path, "test_concat", vec![]), &f32_memory());
    let (shape, values) = tensor(&result, "qkv");
    assert_eq!(shape, vec![18]);
    assert_eq!(values, [q, k, v].concat());
}

#[test]
fn integer_parameters_arrive_exactly() {
    register(
        "test_exact_int",
        vec![param("a", ValueType::Tensor, None), param("seed", ValueType::Int, Some(DefaultValue::Int(0)))],
        ExactInt,
    );
    let dir = tempfile::tempdir().unwrap();
    let (path, [q, ..]) = qkv_model(dir.path());
    let recipe = one_method(&path, "test_exact_int", vec![RecipeArg::Value(Scalar::Int((1 << 60) + 1))]);
    let result = run(recipe, &f32_memory());
    assert_eq!(tensor(&result, "q").1, q.iter().map(|x| x + 1.0).collect::<Vec<_>>());
}

/// `a` unchanged, computed whole, recording how many runs overlap.
struct Overlap {
    active: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Method for Overlap {
    fn plan(&self, call: &PlanCall) -> Result<Decision, mecha_core::MechaError> {
        Ok(ComputeSpec::whole(call.args[0][0].shape.clone()))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>, mecha_core::MechaError> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(40));
        self.active.fetch_sub(1, Ordering::SeqCst);
        Ok(vec![Arg::Tensor(call.tensor(0, 0)?)])
    }
}

fn wide_model(dir: &Path) -> PathBuf {
    let path = dir.join("wide.safetensors");
    let tensors: Vec<(String, Raw)> =
        (0..6).map(|i| (format!("w{i}"), f32_tensor(DType::F32, &[256, 256], &values(i, 256 * 256)))).collect();
    let named: Vec<(&str, Raw)> =
        tensors.into_iter().map(|(n, r)| (Box::leak(n.into_boxed_str()) as &str, r)).collect();
    write_file(&path, &named);
    path
}

#[test]
fn the_memory_budget_limits_what_runs_at_once() {
    let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    register("test_overlap", vec![param("a", ValueType::Tensor, None)], Overlap { active, most: most.clone() });
    let dir = tempfile::tempdir().unwrap();
    let path = wide_model(dir.path());
    let key_bytes = 256 * 256 * 4u64;
    let mut outputs = vec![];
    // Each key needs two tensors' worth at its peak (the input with the bytes read for it, or
    // the result with its encoded output): a budget of three keeps them one at a time; a large
    // one lets both threads run.
    for (budget, allowed) in [(3 * key_bytes, 1), (64 * key_bytes, 2)] {
        most.store(0, Ordering::SeqCst);
        let options = MergeOptions { threads: 2, memory_budget: budget, ..f32_memory() };
        let result = run(one_method(&path, "test_overlap", vec![]), &options);
        assert!(most.load(Ordering::SeqCst) <= allowed, "budget {budget}: {} at once", most.load(Ordering::SeqCst));
        assert_eq!(result.report.memory_budget, budget);
        assert!(result.report.over_budget.is_empty());
        outputs.push(result.tensors.iter().map(|t| t.data.clone()).collect::<Vec<_>>());
    }
    assert_eq!(most.load(Ordering::SeqCst), 2, "with room, both threads run");
    // A budget smaller than one key: each runs alone, is reported, and the output is the same.
    let options = MergeOptions { threads: 2, memory_budget: key_bytes, ..f32_memory() };
    most.store(0, Ordering::SeqCst);
    let result = run(one_method(&path, "test_overlap", vec![]), &options);
    assert_eq!(most.load(Ordering::SeqCst), 1);
    assert_eq!(result.report.over_budget.len(), 6, "{:?}", result.report.over_budget);
    outputs.push(result.tensors.iter().map(|t| t.data.clone()).collect());
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "bit-identical under any budget");
}

#[test]
fn plans_estimate_the_working_memory_of_whole_tensor_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = wide_model(dir.path());
    let mut r = RecipeBuilder::new();
    let a = r.model(path.to_str().unwrap(), None, Some("weight"));
    let b = r.model(path.to_str().unwrap(), None, Some("weight"));
    let root = r.merge("stack", vec![RecipeArg::Node(a), RecipeArg::Node(b)], vec![]).unwrap();
    let plan = mecha_core::exec::plan::plan(r.finish(root).unwrap(), &PlanOptions::default()).unwrap();
    let key = 256 * 256 * 4u64;
    // Two decoded inputs (the same file twice is read once: one buffer), the stacked result
    // (two keys' worth), its temporary, and the encoded f16 output.
    let whole = plan.unit_bytes(0, 1 << 15);
    assert!(whole >= 3 * key && whole <= 8 * key, "{whole}");
    assert_eq!(plan.estimated_working_bytes(2, 1 << 15, 1 << 40), 2 * whole);
    assert_eq!(plan.estimated_working_bytes(2, 1 << 15, whole), whole, "the budget admits one at a time");
}

#[test]
fn shortcuts_follow_sd_mecha() {
    let dir = tempfile::tempdir().unwrap();
    let (path, [q, ..]) = qkv_model(dir.path());
    let other = dir.path().join("other.safetensors");
    let o = values(9, 6);
    write_file(&other, &[("q", f32_tensor(DType::F32, &[2, 3], &o))]);
    let build = |method: &str, alpha: f64, delta: bool| {
        let mut r = RecipeBuilder::new();
        let a = r.model(path.to_str().unwrap(), None, Some("weight"));
        let b = r.model(other.to_str().unwrap(), None, Some("weight"));
        let root = if delta {
            let d = r.merge("subtract", vec![RecipeArg::Node(a), RecipeArg::Node(b)], vec![]).unwrap();
            let s = r.merge(method, vec![RecipeArg::Node(d), RecipeArg::Value(Scalar::Float(alpha))], vec![]).unwrap();
            r.merge("add_difference", vec![RecipeArg::Node(b), RecipeArg::Node(s)], vec![]).unwrap()
        } else {
            r.merge(
                method,
                vec![RecipeArg::Node(a), RecipeArg::Node(b), RecipeArg::Value(Scalar::Float(alpha))],
                vec![],
            )
            .unwrap()
        };
        r.finish(root).unwrap()
    };
    // weighted_sum at exactly 0 and 1 returns an input unchanged (copied as bytes).
    assert_eq!(tensor(&run(build("weighted_sum", 0.0, false), &f32_memory()), "q").1, q);
    assert_eq!(tensor(&run(build("weighted_sum", 1.0, false), &f32_memory()), "q").1, o);
    // scale at 0 gives zeros (sd-mecha returns the number 0.0), so b + 0 = b; at 1, a − b itself.
    assert_eq!(tensor(&run(build("scale", 0.0, true), &f32_memory()), "q").1, o);
    let back = tensor(&run(build("scale", 1.0, true), &f32_memory()), "q").1;
    assert!(back.iter().zip(&q).all(|(x, y)| (x - y).abs() < 1e-6));
}

#[test]
fn whole_tensor_methods_are_bit_identical_for_any_threads_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let a = wide_model(dir.path());
    let b = dir.path().join("wide-b.safetensors");
    let tensors: Vec<(String, Raw)> =
        (0..6).map(|i| (format!("w{i}"), f32_tensor(DType::F32, &[256, 256], &values(100 + i, 256 * 256)))).collect();
    let named: Vec<(&str, Raw)> =
        tensors.into_iter().map(|(n, r)| (Box::leak(n.into_boxed_str()) as &str, r)).collect();
    write_file(&b, &named);
    let recipe = || {
        let mut r = RecipeBuilder::new();
        let (na, nb) =
            (r.model(a.to_str().unwrap(), None, Some("weight")), r.model(b.to_str().unwrap(), None, Some("weight")));
        let s = r.merge("slerp", vec![RecipeArg::Node(na), RecipeArg::Node(nb)], vec![]).unwrap();
        let c = r
            .merge(
                "crossover",
                vec![RecipeArg::Node(s), RecipeArg::Node(nb)],
                vec![("tilt".into(), RecipeArg::Value(Scalar::Float(0.3)))],
            )
            .unwrap();
        let t = r
            .merge(
                "top_k_tensor_sum",
                vec![RecipeArg::Node(c), RecipeArg::Node(na)],
                vec![("width".into(), RecipeArg::Value(Scalar::Float(0.4)))],
            )
            .unwrap();
        r.finish(t).unwrap()
    };
    let mut outputs = vec![];
    for (threads, budget) in [(1, 1u64 << 30), (2, 1 << 30), (3, 1 << 30), (2, 1 << 20)] {
        let result = run(recipe(), &MergeOptions { threads, memory_budget: budget, ..f32_memory() });
        assert_eq!(result.tensors.len(), 6);
        outputs.push(result.tensors.iter().map(|t| t.data.clone()).collect::<Vec<_>>());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

/// Panics while running (a bug in a method), alone or as a group of three outputs.
struct Panics {
    group: bool,
}

impl Method for Panics {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        if !self.group {
            return Some(KeyRelation::identity(call.key, 1));
        }
        let keys: Vec<String> = ["q", "k", "v"].iter().map(|s| s.to_string()).collect();
        Some(KeyRelation {
            outputs: keys.clone(),
            clauses: vec![Clause { inputs: vec![Some(keys)], meta: Meta::default() }],
        })
    }
    fn plan(&self, call: &PlanCall) -> mecha_core::Result<Decision> {
        Ok(ComputeSpec::whole(call.args[0][0].shape.clone()))
    }
    fn run(&self, call: RunCall) -> mecha_core::Result<Vec<Output>> {
        // an out-of-bounds index, as a buggy method would have
        let index = call.args[0].len() + usize::from(call.outputs.is_empty());
        let _ = &call.args[0][index];
        Ok(vec![call.args[0][0].clone()])
    }
}

#[test]
fn a_method_that_panics_fails_the_merge_with_an_internal_error_and_leaves_nothing() {
    register("test_panics", vec![param("a", ValueType::Tensor, None)], Panics { group: false });
    register("test_panics_group", vec![param("a", ValueType::Tensor, None)], Panics { group: true });
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = qkv_model(dir.path());
    let out = dir.path().join("out.safetensors");
    for id in ["test_panics", "test_panics_group"] {
        for threads in [1, 3] {
            let options = MergeOptions { threads, output: OutputTarget::File(out.clone()), ..f32_memory() };
            let err = merge(one_method(&path, id, vec![]), &options, &AtomicBool::new(false), None)
                .err()
                .unwrap_or_else(|| panic!("{id} must fail"));
            assert_eq!(err.kind, mecha_core::ErrorKind::Internal, "{err}");
            assert!(err.to_string().contains("index out of bounds") && err.to_string().contains(id), "{err}");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, vec![std::ffi::OsString::from("qkv.safetensors")], "{id}, {threads} threads");
        }
    }
}
