//! `kubectl hvx doctor`: every node's prerequisite checks, as its hvx agent published
//! them (annotation `hvx.dev/prerequisites`, condition `HvxReady`), in one table.

use hvx_api::prereq::{self, Outcome, Report};
use k8s_openapi::api::core::v1::Node;

/// The table and whether any node failed a required check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doctor {
    /// The rendered table.
    pub table: String,
    /// Nodes with a failed required check.
    pub failed_nodes: Vec<String>,
}

/// One node's rows: (check, result, message).
fn node_rows(node: &Node) -> Vec<(String, Outcome, String)> {
    let annotation = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(prereq::ANNOTATION));
    let Some(text) = annotation else {
        return vec![(
            "agent".into(),
            Outcome::Warn,
            "no prerequisite report: no hvx agent ran on this node (nodeSelector, or not started yet)"
                .into(),
        )];
    };
    match serde_json::from_str::<Report>(text) {
        Ok(report) => {
            let mut rows: Vec<_> = report
                .checks
                .into_iter()
                .map(|c| (c.name, c.result, c.message))
                .collect();
            // A Node condition that disagrees with the report (older agent, or one
            // that stopped reporting) is a finding of its own.
            if let Some(stale) = stale_condition(node) {
                rows.push(("report".into(), Outcome::Warn, stale));
            }
            rows
        }
        Err(e) => vec![(
            "report".into(),
            Outcome::Fail,
            format!("unreadable {} annotation: {e}", prereq::ANNOTATION),
        )],
    }
}

/// A message when the node has no `HvxReady` condition although it has a report.
fn stale_condition(node: &Node) -> Option<String> {
    let has = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == prereq::CONDITION));
    (!has).then(|| format!("no {} condition on the node", prereq::CONDITION))
}

/// The doctor table for `nodes` (sorted by name). With `failed_only`, rows that
/// passed are left out.
pub fn doctor(nodes: &[Node], failed_only: bool) -> Doctor {
    let mut nodes: Vec<&Node> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut rows = Vec::new();
    let mut failed_nodes = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let checks = node_rows(node);
        if checks.iter().any(|(_, r, _)| *r == Outcome::Fail) {
            failed_nodes.push(name.clone());
        }
        for (check, result, message) in checks {
            if failed_only && result == Outcome::Ok {
                continue;
            }
            rows.push(vec![
                name.clone(),
                check,
                result.as_str().to_string(),
                message,
            ]);
        }
    }
    Doctor {
        table: crate::table::render(&["NODE", "CHECK", "RESULT", "MESSAGE"], &rows),
        failed_nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvx_api::prereq::Check;

    fn node(name: &str, report: Option<&Report>, condition: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": report.map(|r| serde_json::json!({
                prereq::ANNOTATION: serde_json::to_string(r).unwrap_or_default(),
            })).unwrap_or_default()},
            "status": {"conditions": if condition {
                serde_json::json!([{"type": "HvxReady", "status": "True"}])
            } else { serde_json::json!([]) }},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn report(failed: &[&str]) -> Report {
        Report {
            checks: ["tun", "qemu-img"]
                .iter()
                .map(|n| Check {
                    name: (*n).into(),
                    result: if failed.contains(n) {
                        Outcome::Fail
                    } else {
                        Outcome::Ok
                    },
                    message: format!("{n} message"),
                })
                .collect(),
        }
    }

    #[test]
    fn one_row_per_check_and_the_failing_node_named() {
        let nodes = [
            node("n2", Some(&report(&["qemu-img"])), true),
            node("n1", Some(&report(&[])), true),
        ];
        let d = doctor(&nodes, false);
        assert_eq!(d.failed_nodes, ["n2"]);
        assert_eq!(
            d.table,
            "NODE  CHECK     RESULT  MESSAGE\n\
             n1    tun       OK      tun message\n\
             n1    qemu-img  OK      qemu-img message\n\
             n2    tun       OK      tun message\n\
             n2    qemu-img  FAIL    qemu-img message\n"
        );
        let only = doctor(&nodes, true);
        assert_eq!(
            only.table,
            "NODE  CHECK     RESULT  MESSAGE\nn2    qemu-img  FAIL    qemu-img message\n"
        );
    }

    #[test]
    fn nodes_without_a_report_warn_and_garbage_fails() {
        let mut bad = node("n3", None, false);
        bad.metadata.annotations = Some(
            [(prereq::ANNOTATION.to_string(), "{".to_string())]
                .into_iter()
                .collect(),
        );
        let d = doctor(
            &[
                node("n1", None, false),
                node("n2", Some(&report(&[])), false),
                bad,
            ],
            false,
        );
        assert_eq!(d.failed_nodes, ["n3"]);
        assert!(
            d.table
                .contains("n1    agent     WARN    no prerequisite report"),
            "{}",
            d.table
        );
        assert!(
            d.table
                .contains("n2    report    WARN    no HvxReady condition"),
            "{}",
            d.table
        );
        assert!(
            d.table
                .contains("n3    report    FAIL    unreadable hvx.dev/prerequisites annotation"),
            "{}",
            d.table
        );
    }
}
