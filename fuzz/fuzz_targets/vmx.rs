//! VMX files: syntax and the mapping to the neutral model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(vmx) = hvx_import::vmx::parse(text)
    {
        let _ = hvx_import::vmx_vm::application(&vmx, "fuzz");
    }
});
