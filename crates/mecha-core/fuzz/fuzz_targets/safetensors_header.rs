//! Opening any file as safetensors gives a validated header or a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("mecha-fuzz-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).expect("temp file");
    if let Ok(file) = mecha_core::io::reader::SafetensorsFile::open(&path) {
        for entry in file.tensors().values() {
            let _ = file.read_tensor(entry);
        }
    }
});
