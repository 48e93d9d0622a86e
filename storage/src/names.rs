//! Names of things in the store: Kubernetes-style names and sha256 digests.
use crate::error::{Result, StorageError};

/// A namespace, disk or snapshot name: a DNS-1123 label-like name, so it is safe as a
/// path component and as a QMP node-name suffix.
pub fn check_object_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidName {
            name: name.to_string(),
            reason:
                "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
                    .into(),
        })
    }
}

/// A lowercase hex sha256 digest.
pub fn check_sha256(hex: &str) -> Result<String> {
    let lower = hex.trim().to_ascii_lowercase();
    let lower = lower.strip_prefix("sha256:").unwrap_or(&lower).to_string();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(StorageError::BadChecksum(hex.to_string()))
    }
}

/// Lower-case hex of `bytes` (digests as the store and its callers write them).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        assert!(check_object_name("web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a/b", "..", "a.b", &"x".repeat(64)] {
            assert!(check_object_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests() {
        let d = "A".repeat(64);
        assert_eq!(
            check_sha256(&format!("sha256:{d}")).unwrap(),
            "a".repeat(64)
        );
        assert!(check_sha256("abc").is_err());
    }
}
