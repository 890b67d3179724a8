//! Recipes of any depth and heavy sharing: no recursion on their depth (these run on a thread
//! with a 256 KiB stack), and shared sub-graphs cost once.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use mecha_core::exec::{merge, MergeOptions};
use mecha_core::recipe::parse::parse;
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::DType;

/// Runs `f` on a small stack and fails if it does not finish within `limit`.
fn on_small_stack<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || tx.send(f()).expect("receiver waits"))
        .expect("thread starts");
    rx.recv_timeout(limit).expect("finished in time (no exponential work, no stack overflow)")
}

fn tiny_models(dir: &Path) -> (String, String) {
    let write = |name: &str, seed| {
        let path = dir.join(name);
        write_file(&path, &[("model.w", f32_tensor(DType::F32, &[4], &values(seed, 4)))]);
        path.to_str().unwrap().to_string()
    };
    (write("a.safetensors", 1), write("b.safetensors", 2))
}

fn merged(recipe: Recipe) -> (Vec<u8>, String) {
    let result = merge(recipe, &MergeOptions::default(), &AtomicBool::new(false), None).expect("merges");
    (result.tensors[0].data.clone(), result.report.recipe)
}

#[test]
fn a_chain_of_100000_nodes_plans_merges_serializes_and_parses_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tiny_models(dir.path());
    on_small_stack(Duration::from_secs(300), move || {
        let mut r = RecipeBuilder::new();
        let mut root = r.model(&a, None, Some("weight"));
        let other = r.model(&b, None, Some("weight"));
        for _ in 0..100_000 {
            root = r
                .merge("weighted_sum", vec![Arg::Node(root), Arg::Node(other), Arg::Value(Scalar::Float(0.5))], vec![])
                .unwrap();
        }
        let (data, text) = merged(r.finish(root).unwrap());
        assert_eq!(text.lines().filter(|l| l.starts_with("merge \"weighted_sum\"")).count(), 100_000);
        let (again, text_again) = merged(parse(&text).expect("parses back"));
        assert_eq!((again, text_again), (data, text));
    });
}

#[test]
fn a_node_used_twice_at_each_of_30_levels_costs_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = tiny_models(dir.path());
    on_small_stack(Duration::from_secs(60), move || {
        let mut r = RecipeBuilder::new();
        let mut root = r.model(&a, None, Some("weight"));
        for _ in 0..30 {
            root = r
                .merge("weighted_sum", vec![Arg::Node(root), Arg::Node(root), Arg::Value(Scalar::Float(0.5))], vec![])
                .unwrap();
        }
        // 2^30 paths through the graph; one model line, one alpha, 30 merges.
        let (data, text) = merged(r.finish(root).unwrap());
        assert_eq!(text.lines().filter(|l| l.starts_with("merge \"weighted_sum\"")).count(), 30);
        let (again, _) = merged(parse(&text).unwrap());
        assert_eq!(again, data);
        let input = values(1, 4);
        let out: Vec<f32> = data.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        let expected: Vec<f32> = input.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(out, expected, "the average of a tensor with itself is itself");
    });
}
