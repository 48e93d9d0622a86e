//! OVF descriptors: parsing must end in Ok or Err, never panic, hang or blow memory,
//! with the export's default deployment option and with one chosen by name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hvx_import::ovf::parse(text, "fuzz");
        let options = hvx_import::ovf::OvfOptions {
            deployment_option: Some("small".into()),
        };
        let _ = hvx_import::ovf::parse_with(text, "fuzz", &options);
    }
});
