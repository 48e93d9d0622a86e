//! VMX syntax: `key = "value"` lines. Keys are case-insensitive (as VMware treats them);
//! a later line overrides an earlier one; values may hold `|XX` hex escapes.

use crate::error::{ImportError, Result};
use crate::limits::{MAX_VMX_BYTES, MAX_VMX_LINES};
use std::collections::BTreeMap;

/// A parsed VMX: lower-cased keys to unescaped values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vmx {
    entries: BTreeMap<String, String>,
}

impl Vmx {
    /// The value of `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .get(&key.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// `TRUE`/`FALSE` (any case) as VMware writes booleans; `None` when absent.
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.get(key)
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"))
    }

    /// A number, with the line-free error a bad value deserves.
    pub fn number(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| ImportError::Vmx {
                line: 0,
                reason: format!("{key} = {v:?} is not a number"),
            }),
        }
    }

    /// All keys, lower-cased, in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// Parses VMX text.
pub fn parse(text: &str) -> Result<Vmx> {
    if text.len() as u64 > MAX_VMX_BYTES {
        return Err(ImportError::TooLarge {
            what: "VMX file".into(),
            size: text.len() as u64,
            limit: MAX_VMX_BYTES,
        });
    }
    let mut entries = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        if i >= MAX_VMX_LINES {
            return Err(ImportError::TooMany {
                what: "VMX lines",
                count: i + 1,
                limit: MAX_VMX_LINES,
            });
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| ImportError::Vmx {
            line: i + 1,
            reason: reason.to_owned(),
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| bad("expected `key = \"value\"`"))?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:_-[]".contains(&b))
        {
            return Err(bad(&format!("invalid key {key:?}")));
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .ok_or_else(|| bad("unterminated quoted value"))?,
            // VMware always quotes, but hand-edited files sometimes do not.
            None => value,
        };
        entries.insert(
            key.to_ascii_lowercase(),
            unescape(value).map_err(|r| bad(&r))?,
        );
    }
    Ok(Vmx { entries })
}

/// Decodes VMware's `|XX` escapes (`|22` is `"`, `|7C` is `|`).
fn unescape(v: &str) -> std::result::Result<String, String> {
    if !v.contains('|') {
        return Ok(v.to_owned());
    }
    let mut out = Vec::with_capacity(v.len());
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'|' {
            let hex = v
                .get(i + 1..i + 3)
                .ok_or_else(|| format!("truncated escape in {v:?}"))?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape |{hex}"))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("escape in {v:?} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_values_case_insensitively() {
        let vmx = parse(
            ".encoding = \"UTF-8\"\n# comment\n\nnumvcpus = \"4\"\nDisplayName = \"a |22quoted|22 name\"\nmemsize = 2048\nnumvcpus = \"8\"\n",
        )
        .expect("valid");
        assert_eq!(vmx.get("displayname"), Some("a \"quoted\" name"));
        assert_eq!(vmx.number("numvcpus").ok().flatten(), Some(8));
        assert_eq!(vmx.number("memSize").ok().flatten(), Some(2048));
        assert_eq!(vmx.get(".encoding"), Some("UTF-8"));
    }

    #[test]
    fn flags_follow_vmware_spelling() {
        let vmx = parse("a.present = \"TRUE\"\nb.present = \"FALSE\"\n").expect("valid");
        assert_eq!(vmx.flag("a.present"), Some(true));
        assert_eq!(vmx.flag("b.present"), Some(false));
        assert_eq!(vmx.flag("c.present"), None);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let err = parse("a = \"1\"\nthis is not vmx\n").expect_err("invalid");
        assert!(err.to_string().starts_with("VMX line 2:"), "{err}");
        assert!(parse("a = \"unterminated\n").is_err());
        assert!(parse("bad key = \"1\"\n").is_err());
        assert!(parse("a = \"|4\"\n").is_err());
        assert!(parse("a = \"|zz\"\n").is_err());
    }

    #[test]
    fn non_numbers_are_errors_not_zero() {
        let vmx = parse("memsize = \"lots\"\n").expect("valid syntax");
        assert!(vmx.number("memsize").is_err());
    }

    #[test]
    fn too_many_lines_is_refused() {
        let text = "a = \"1\"\n".repeat(MAX_VMX_LINES + 1);
        assert!(matches!(parse(&text), Err(ImportError::TooMany { .. })));
    }
}
