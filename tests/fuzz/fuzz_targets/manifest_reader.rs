//! Arbitrary bytes as `manifest.json`: errors only, and anything accepted must validate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = snapshot::Manifest::from_json(data, std::path::Path::new("manifest.json"))
    {
        assert!(manifest.validate().is_ok());
        let _ = manifest.to_json();
    }
});
