//! OVF descriptors: parsing must end in Ok or Err, never panic, hang or blow memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hvx_import::ovf::parse(text, "fuzz");
    }
});
