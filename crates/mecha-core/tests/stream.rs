//! A merge streamed to a consumer (`OutputTarget::Stream`, behind `iterate()`): keys arrive in
//! output order with the bytes a merge into memory gives, the engine waits while the consumer is
//! slow (memory bounded by the stream's limit plus the keys in flight), and a consumer that stops
//! stops the merge.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mecha_core::exec::stream::StreamSink;
use mecha_core::exec::{merge, MergeOptions, OutputTarget};
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::{DType, ErrorKind};

/// 24 keys of 64 KiB (f16 128×256), some with NaN when `nan`.
fn write_model(path: &Path, seed: u64, nan: bool) {
    let tensors: Vec<(String, Raw)> = (0..24)
        .map(|i| {
            let mut v = values(seed * 100 + i, 128 * 256);
            if nan && i == 17 {
                v[3] = f32::NAN;
            }
            (format!("layers.{i:02}.weight"), f32_tensor(DType::F16, &[128, 256], &v))
        })
        .collect();
    write_named(path, &tensors);
}

fn recipe(a: &Path, b: &Path, method: &str) -> Recipe {
    let mut r = RecipeBuilder::new();
    let na = r.model(a.to_str().unwrap(), None, Some("weight"));
    let nb = r.model(b.to_str().unwrap(), None, Some("weight"));
    let root = r.merge(method, vec![Arg::Node(na), Arg::Node(nb), Arg::Value(Scalar::Float(0.3))], vec![]).unwrap();
    r.finish(root).unwrap()
}

/// Runs the streamed merge on its own thread; returns the sink, the cancel flag and the thread.
fn stream(
    recipe: Recipe,
    limit: u64,
    chunk: usize,
) -> (Arc<StreamSink>, Arc<AtomicBool>, std::thread::JoinHandle<mecha_core::Result<()>>) {
    let sink = Arc::new(StreamSink::new(limit));
    let cancel = Arc::new(AtomicBool::new(false));
    let (s, c) = (sink.clone(), cancel.clone());
    let handle = std::thread::spawn(move || {
        let options =
            MergeOptions { output: OutputTarget::Stream(s.clone()), threads: 2, chunk, ..MergeOptions::default() };
        let result = merge(recipe, &options, &c, None).map(|_| ());
        s.end(result.clone());
        result
    });
    (sink, cancel, handle)
}

struct Models {
    _dir: tempfile::TempDir,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    nan: std::path::PathBuf,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, nan) = (dir.path().join("a.st"), dir.path().join("b.st"), dir.path().join("nan.st"));
    write_model(&a, 1, false);
    write_model(&b, 2, false);
    write_model(&nan, 2, true);
    Models { _dir: dir, a, b, nan }
}

#[test]
fn keys_arrive_in_output_order_with_the_bytes_of_a_merge_in_memory() {
    let m = models();
    for (method, chunk) in [("weighted_sum", 4096), ("slerp", 1 << 15)] {
        let expected =
            merge(recipe(&m.a, &m.b, method), &MergeOptions::default(), &AtomicBool::new(false), None).unwrap();
        let (sink, _, handle) = stream(recipe(&m.a, &m.b, method), 1 << 30, chunk);
        let mut got = vec![];
        while let Some(t) = sink.next().unwrap() {
            got.push(t);
        }
        handle.join().unwrap().unwrap();
        assert_eq!(got.len(), expected.tensors.len(), "{method}");
        for (g, e) in got.iter().zip(&expected.tensors) {
            assert_eq!((&g.name, g.dtype, &g.shape), (&e.name, e.dtype, &e.shape), "{method}");
            assert!(g.data == e.data, "{method}: {} differs", g.name);
        }
    }
}

#[test]
fn a_slow_consumer_holds_the_engine_back_within_the_limit() {
    let m = models();
    let key = 128 * 256 * 2; // bytes of one key
    let (sink, _, handle) = stream(recipe(&m.a, &m.b, "weighted_sum"), key as u64, 4096);
    let mut count = 0;
    while let Some(t) = sink.next().unwrap() {
        assert_eq!(t.name, format!("layers.{count:02}.weight"));
        count += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.join().unwrap().unwrap();
    assert_eq!(count, 24);
    // The limit, plus the keys two workers can have started when it was reached.
    let peak = sink.peak_buffered_bytes();
    assert!(peak <= (key * 4) as u64, "held {peak} bytes at once (a key is {key})");
    assert!(peak >= key as u64);
}

#[test]
fn a_consumer_that_stops_stops_the_merge() {
    let m = models();
    let (sink, cancel, handle) = stream(recipe(&m.a, &m.b, "weighted_sum"), 1, 4096);
    assert!(sink.next().unwrap().is_some());
    cancel.store(true, Ordering::SeqCst);
    sink.cancel();
    let result = handle.join().unwrap();
    assert_eq!(result.unwrap_err().kind, ErrorKind::Aborted);
    loop {
        match sink.next() {
            Ok(Some(_)) => continue, // keys finished before the cancel was seen
            Ok(None) => panic!("the stream ended as if complete"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Aborted);
                break;
            }
        }
    }
}

#[test]
fn an_input_with_nan_fails_the_stream_instead_of_replanning_under_the_consumer() {
    let m = models();
    let (sink, _, handle) = stream(recipe(&m.a, &m.nan, "weighted_sum"), 1 << 30, 4096);
    let mut names = vec![];
    let err = loop {
        match sink.next() {
            Ok(Some(t)) => names.push(t.name),
            Ok(None) => panic!("the stream completed"),
            Err(e) => break e,
        }
    };
    assert!(err.message.contains("omitNonFiniteInputs: false"), "{}", err.message);
    assert!(handle.join().unwrap().is_err());
    // The keys before the one with the NaN, and not that one (its values are not the output's).
    let expected: Vec<String> = (0..17).map(|i| format!("layers.{i:02}.weight")).collect();
    assert_eq!(names, expected);
}

#[test]
fn small_keys_between_large_ones_arrive_in_order_under_a_full_buffer() {
    // Small keys are batched while large ones are cut into chunks: the batch must not be queued
    // behind the large keys' chunks, or the consumer waits for a key no worker will take.
    let dir = tempfile::tempdir().unwrap();
    let tensors = |seed: u64| -> Vec<(String, Raw)> {
        (0..12)
            .map(|i| {
                let shape = if i % 3 == 0 { vec![16] } else { vec![256, 256] };
                let n = shape.iter().product();
                (format!("k.{i:02}"), f32_tensor(DType::F16, &shape, &values(seed * 100 + i, n)))
            })
            .collect()
    };
    let (a, b) = (dir.path().join("a.st"), dir.path().join("b.st"));
    for (path, seed) in [(&a, 1), (&b, 2)] {
        write_named(path, &tensors(seed));
    }
    let (sink, _, handle) = stream(recipe(&a, &b, "weighted_sum"), 1, 4096);
    let mut names = vec![];
    while let Some(t) = sink.next().unwrap() {
        names.push(t.name);
        std::thread::sleep(Duration::from_millis(2));
    }
    handle.join().unwrap().unwrap();
    assert_eq!(names, (0..12).map(|i| format!("k.{i:02}")).collect::<Vec<_>>());
}
