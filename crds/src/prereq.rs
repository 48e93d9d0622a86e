//! The node prerequisite report the hvx agent publishes on its Node, and
//! `kubectl hvx doctor` reads: condition [`CONDITION`] (True when no required check
//! failed; its message names every failed check) and annotation [`ANNOTATION`] with
//! every check's result as compact JSON ([`Report`]).

use serde::{Deserialize, Serialize};

/// Node condition type: `True` when every required check passed.
pub const CONDITION: &str = "HvxReady";
/// Node annotation holding the [`Report`] as JSON.
pub const ANNOTATION: &str = "hvx.dev/prerequisites";
/// Condition reason when every required check passed.
pub const REASON_OK: &str = "PrerequisitesMet";
/// Condition reason when a required check failed.
pub const REASON_FAILED: &str = "PrerequisitesFailed";

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Works, but worse than it could (no KVM: TCG; small underlay MTU).
    Warn,
    /// A required prerequisite is missing: VMs or networks will not work here.
    Fail,
}

impl Outcome {
    /// The word shown in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short stable name (`tun`, `qemu-img`, `store-space`, ...).
    pub name: String,
    /// Its outcome.
    pub result: Outcome,
    /// What was found, or what is missing.
    pub message: String,
}

/// Every check of one node, as the annotation holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The checks, in a fixed order.
    pub checks: Vec<Check>,
}

impl Report {
    /// The checks that failed.
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.result == Outcome::Fail)
    }

    /// The condition message: every failed check with its message, else a summary.
    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .failed()
            .map(|c| format!("{}: {}", c.name, c.message))
            .collect();
        if failed.is_empty() {
            let warned: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.result == Outcome::Warn)
                .map(|c| c.name.as_str())
                .collect();
            if warned.is_empty() {
                format!("all {} prerequisite checks passed", self.checks.len())
            } else {
                format!(
                    "required prerequisites met; warnings: {}",
                    warned.join(", ")
                )
            }
        } else {
            format!("failed: {}", failed.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, result: Outcome) -> Check {
        Check {
            name: name.into(),
            result,
            message: format!("{name} says so"),
        }
    }

    #[test]
    fn summary_names_every_failed_check_else_the_warnings() {
        let mut r = Report {
            checks: vec![check("tun", Outcome::Ok), check("kvm", Outcome::Warn)],
        };
        assert_eq!(r.summary(), "required prerequisites met; warnings: kvm");
        r.checks.push(check("nft", Outcome::Fail));
        r.checks.push(check("qemu-img", Outcome::Fail));
        assert_eq!(
            r.summary(),
            "failed: nft: nft says so; qemu-img: qemu-img says so"
        );
        r.checks.retain(|c| c.result == Outcome::Ok);
        assert_eq!(r.summary(), "all 1 prerequisite checks passed");
    }

    #[test]
    fn the_annotation_form_round_trips_with_upper_case_outcomes() {
        let r = Report {
            checks: vec![check("tun", Outcome::Fail)],
        };
        let json = serde_json::to_string(&r).unwrap_or_default();
        assert!(json.contains("\"result\":\"FAIL\""), "{json}");
        assert_eq!(serde_json::from_str::<Report>(&json).ok(), Some(r));
    }
}
