//! VMware display names turned into Kubernetes names.

/// A DNS-1123 label of at most `max` characters: lower-case, runs of anything else
/// become one `-`, no leading or trailing `-`. Never empty (`fallback` then).
pub fn dns_label(raw: &str, max: usize, fallback: &str) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_matches('-').to_owned();
    if out.len() > max {
        // Keep the name recognisable and unique: truncated prefix plus a short hash.
        let hash = format!("{:06x}", fnv(raw) & 0x00ff_ffff);
        out.truncate(max.saturating_sub(hash.len() + 1));
        out = format!("{}-{hash}", out.trim_end_matches('-'));
    }
    if out.is_empty() {
        fallback.to_owned()
    } else {
        out
    }
}

/// `candidate`, or `candidate-2`, `-3`... whichever is not in `taken`.
pub fn unique(candidate: String, taken: &[String]) -> String {
    if !taken.contains(&candidate) {
        return candidate;
    }
    (2..)
        .map(|i| format!("{candidate}-{i}"))
        .find(|n| !taken.contains(n))
        .unwrap_or(candidate)
}

fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_vmware_names() {
        assert_eq!(dns_label("Edge Gateway 01", 50, "vm"), "edge-gateway-01");
        assert_eq!(dns_label("WIN2022-AD01", 50, "vm"), "win2022-ad01");
        assert_eq!(dns_label("  --VM Network--", 63, "n"), "vm-network");
        assert_eq!(dns_label("Hard disk 1", 63, "d"), "hard-disk-1");
        assert_eq!(dns_label("日本", 63, "vm"), "vm");
        let long = dns_label(&"x".repeat(80), 50, "vm");
        assert_eq!(long.len(), 50);
        assert_ne!(long, dns_label(&"x".repeat(81), 50, "vm"));
    }

    #[test]
    fn unique_appends_a_counter() {
        let taken = vec!["a".to_owned(), "a-2".to_owned()];
        assert_eq!(unique("a".into(), &taken), "a-3");
        assert_eq!(unique("b".into(), &taken), "b");
    }
}
