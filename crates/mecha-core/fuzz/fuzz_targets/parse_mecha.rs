//! The `.mecha` parser must turn any input into a recipe or a typed error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(recipe) = mecha_core::recipe::parse::parse(text) {
            // What parses must also convert to the JSON form and back.
            let json = mecha_core::recipe::wire::to_json(&recipe);
            mecha_core::recipe::wire::from_json_value(&json).expect("a parsed recipe re-reads from JSON");
        }
    }
});
