//! Config inference and key propagation on synthetic headers (zero-size tensors).
mod common;

use std::path::{Path, PathBuf};

use common::{write_file, Raw};
use mecha_core::configs;
use mecha_core::exec::plan::{finalize, plan, PlanOptions};
use mecha_core::recipe::spaces::RootSpace;
use mecha_core::recipe::{Arg, RecipeBuilder, Scalar};
use mecha_core::{DType, ErrorKind};

fn header_file(dir: &Path, name: &str, keys: &[String]) -> PathBuf {
    let path = dir.join(name);
    let tensors: Vec<(&str, Raw)> =
        keys.iter().map(|k| (k.as_str(), Raw { dtype: DType::F16, shape: vec![0], data: vec![] })).collect();
    write_file(&path, &tensors);
    path
}

fn config_keys(id: &str, components: &[&str]) -> Vec<String> {
    let c = configs::resolve(id).unwrap();
    c.components()
        .iter()
        .filter(|(name, _)| components.is_empty() || components.contains(&name.as_str()))
        .flat_map(|(_, comp)| comp.keys.keys().cloned())
        .collect()
}

fn inferred(path: &Path) -> String {
    let mut b = RecipeBuilder::new();
    let m = b.model(path.to_str().unwrap(), None, Some("weight"));
    finalize(b.finish(m).unwrap(), &RootSpace::default()).unwrap().root_config().id().to_string()
}

#[test]
fn infers_full_partial_aliased_and_unknown_models() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(
        inferred(&header_file(d, "sd1.safetensors", &config_keys("sd1-ldm", &["clip_l", "vae", "diffuser"]))),
        "sd1-ldm"
    );
    assert_eq!(inferred(&header_file(d, "unet.safetensors", &config_keys("sd1-ldm", &["diffuser"]))), "sd1-ldm");
    assert_eq!(inferred(&header_file(d, "sdxl.safetensors", &config_keys("sdxl-sgm", &[]))), "sdxl-sgm");
    let flux: Vec<String> = configs::resolve("flux-flux")
        .unwrap()
        .keys()
        .filter(|(_, m)| !m.aliases.is_empty())
        .map(|(_, m)| m.aliases[0].clone())
        .collect();
    assert_eq!(inferred(&header_file(d, "flux.safetensors", &flux)), "flux-flux");
    let unknown: Vec<String> = (0..20).map(|i| format!("net.{i}.weight")).collect();
    assert_eq!(inferred(&header_file(d, "unknown.safetensors", &unknown)), "structural");
    assert_eq!(
        inferred(&header_file(d, "blocks.safetensors", &config_keys("sd1-supermerger_blocks", &[]))),
        "sd1-supermerger_blocks"
    );
}

#[test]
fn aliased_keys_are_read_and_written_under_their_canonical_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = configs::resolve("sd1-ldm").unwrap();
    let keys: Vec<String> = config
        .keys()
        .filter(|(_, m)| !m.optional)
        .map(|(k, m)| m.aliases.first().cloned().unwrap_or_else(|| k.to_string()))
        .collect();
    let a = header_file(dir.path(), "old.safetensors", &keys);
    let canonical: Vec<String> = config.keys().filter(|(_, m)| !m.optional).map(|(k, _)| k.to_string()).collect();
    let b = header_file(dir.path(), "new.safetensors", &canonical);
    let mut r = RecipeBuilder::new();
    let (na, nb) =
        (r.model(a.to_str().unwrap(), None, Some("weight")), r.model(b.to_str().unwrap(), None, Some("weight")));
    let root = r.merge("weighted_sum", vec![Arg::Node(na), Arg::Node(nb)], vec![]).unwrap();
    let p = plan(r.finish(root).unwrap(), &PlanOptions::default()).unwrap();
    let written: Vec<&str> = p.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(written, canonical.iter().map(String::as_str).collect::<Vec<_>>(), "config order, canonical names");
    assert!(p.skipped.is_empty(), "{:?}", &p.skipped[..3.min(p.skipped.len())]);
}

#[test]
fn extra_keys_are_reported_and_conflicts_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = config_keys("sd1-ldm", &["diffuser"]);
    keys.push("some.extra.key".into());
    let a = header_file(dir.path(), "a.safetensors", &keys);
    let mut r = RecipeBuilder::new();
    let m = r.model(a.to_str().unwrap(), None, Some("weight"));
    let p = plan(r.finish(m).unwrap(), &PlanOptions::default()).unwrap();
    assert_eq!(p.skipped.len(), 1);
    assert!(p.skipped[0].reason.contains("not a key of the model config \"sd1-ldm\""), "{:?}", p.skipped);

    // An explicit config the keys do not match.
    let mut r = RecipeBuilder::new();
    let m = r.model(a.to_str().unwrap(), Some("sdxl-sgm"), Some("weight"));
    let m2 = r.model(a.to_str().unwrap(), Some("sd1-ldm"), Some("weight"));
    let root = r.merge("weighted_sum", vec![Arg::Node(m), Arg::Node(m2)], vec![]).unwrap();
    let err = finalize(r.finish(root).unwrap(), &RootSpace::default()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(err.message.contains("incompatible"), "{}", err.message);

    let mut r = RecipeBuilder::new();
    let m = r.model(a.to_str().unwrap(), Some("sd9-nope"), Some("weight"));
    let err = finalize(r.finish(m).unwrap(), &RootSpace::default()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(err.message.contains("unknown model config \"sd9-nope\""), "{}", err.message);
}

#[test]
fn pick_and_omit_component_select_keys_by_component() {
    let dir = tempfile::tempdir().unwrap();
    let a = header_file(dir.path(), "a.safetensors", &config_keys("sd1-ldm", &["clip_l", "vae", "diffuser"]));
    for (method, component, expected) in [("pick_component", "vae", 248), ("omit_component", "vae", 197 + 686)] {
        let mut r = RecipeBuilder::new();
        let m = r.model(a.to_str().unwrap(), None, Some("weight"));
        let root = r.merge(method, vec![Arg::Node(m), Arg::Value(Scalar::Str(component.into()))], vec![]).unwrap();
        let p = plan(r.finish(root).unwrap(), &PlanOptions::default()).unwrap();
        assert_eq!(p.keys.len(), expected, "{method}");
    }
    let mut r = RecipeBuilder::new();
    let m = r.model(a.to_str().unwrap(), None, Some("weight"));
    let root = r.merge("pick_component", vec![Arg::Node(m), Arg::Value(Scalar::Str("unet".into()))], vec![]).unwrap();
    let err = plan(r.finish(root).unwrap(), &PlanOptions::default()).err().unwrap();
    assert!(err.message.contains("component \"unet\" does not exist in config \"sd1-ldm\"; valid components: clip_l, vae, diffuser, ema, scheduler"), "{}", err.message);
}
