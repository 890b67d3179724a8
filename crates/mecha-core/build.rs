//! Converts the model configs in `configs/*.yaml` into one compact text file that the crate
//! embeds (format in `src/configs/yaml.rs`), so no YAML is parsed when the engine loads them.

use std::path::Path;
use std::{env, fs};

include!("src/configs/yaml.rs");

fn main() {
    println!("cargo:rerun-if-changed=configs");
    println!("cargo:rerun-if-changed=src/configs/yaml.rs");

    let mut paths: Vec<_> = fs::read_dir("configs")
        .expect("configs/ is readable")
        .map(|entry| entry.expect("configs/ is readable").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    // Directory order differs between file systems; the output must not.
    paths.sort();

    let mut compact = String::new();
    for path in &paths {
        // sd-mecha registers a YAML config under its file stem, not its `identifier` field.
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name");
        let text = fs::read_to_string(path).expect("config is readable UTF-8");
        yaml_rust2::YamlLoader::load_from_str(&text)
            .map_err(|e| e.to_string())
            .and_then(|docs| write_compact(&docs, Some(stem), &mut compact))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let out = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("model-configs.txt");
    fs::write(out, compact).expect("OUT_DIR is writable");
}
