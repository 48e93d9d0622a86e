//! The OVA tar index: any byte string ends in Ok or Err, and every member it returns
//! lies inside the archive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    if let Ok(members) = hvx_storage::tar::index(&mut r, Path::new("fuzz.ova")) {
        for m in members {
            let end = m.offset.checked_add(m.size).expect("member end overflows");
            assert!(
                end <= data.len() as u64,
                "member {m:?} lies past the archive's end"
            );
        }
    }
});
