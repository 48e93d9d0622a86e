//! `kubectl hvx status`: applications, VMs, nodes and migrations in progress on one
//! screen, from the objects (no agent calls).

use hvx_api::prereq;
use hvx_api::{VmApplication, VmMigration};
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything `status` shows.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Applications (all namespaces, or one).
    pub apps: Vec<VmApplication>,
    /// Migrations (the same scope).
    pub migrations: Vec<VmMigration>,
    /// The cluster's nodes (empty when the caller may not list them).
    pub nodes: Vec<Node>,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

fn condition(node: &Node, type_: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

/// The status screen.
pub fn render(inputs: &Inputs) -> String {
    let mut out = String::new();
    let mut apps: Vec<&VmApplication> = inputs.apps.iter().collect();
    apps.sort_by_key(|a| ns_name(&a.metadata));
    let mut vms_per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut app_rows = Vec::new();
    let mut vm_rows = Vec::new();
    for app in &apps {
        let name = ns_name(&app.metadata);
        let status = app.status.clone().unwrap_or_default();
        app_rows.push(vec![
            name.clone(),
            dash(status.phase.map(|p| format!("{p:?}"))),
            format!("{}/{}", status.running_count, app.spec.vms.len()),
        ]);
        for spec_vm in &app.spec.vms {
            let vm = status.vms.iter().find(|v| v.name == spec_vm.name);
            if let Some(node) = vm.and_then(|v| v.node.clone()) {
                *vms_per_node.entry(node).or_default() += 1;
            }
            let ips: Vec<String> = vm
                .map(|v| {
                    v.interfaces
                        .iter()
                        .filter_map(|i| i.ip_address.clone())
                        .collect()
                })
                .unwrap_or_default();
            vm_rows.push(vec![
                name.clone(),
                spec_vm.name.clone(),
                dash(vm.map(|v| format!("{:?}", v.phase))),
                dash(vm.and_then(|v| v.node.clone())),
                dash(Some(ips.join(","))),
                dash(vm.and_then(|v| v.reason.clone())),
            ]);
        }
    }
    let running: Vec<&VmMigration> = inputs
        .migrations
        .iter()
        .filter(|m| {
            !m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_final())
        })
        .collect();
    let mut leaving: BTreeMap<String, usize> = BTreeMap::new();
    for m in &running {
        if let Some(src) = m.status.as_ref().and_then(|s| s.source_node.clone()) {
            *leaving.entry(src).or_default() += 1;
        }
    }
    let _ = writeln!(out, "APPLICATIONS ({})", app_rows.len());
    out.push_str(&crate::table::render(
        &["APPLICATION", "PHASE", "RUNNING"],
        &app_rows,
    ));
    let _ = writeln!(out, "\nVMS ({})", vm_rows.len());
    out.push_str(&crate::table::render(
        &["APPLICATION", "VM", "PHASE", "NODE", "IP", "REASON"],
        &vm_rows,
    ));
    let mut nodes: Vec<&Node> = inputs.nodes.iter().collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let node_rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let agent = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("hvx.dev/agent"))
                .cloned();
            let hvx_ready = condition(n, prereq::CONDITION);
            let agent_state = match (agent.as_deref(), hvx_ready.as_deref()) {
                (Some("ready"), Some("True") | None) => "ready".to_string(),
                (Some("ready"), Some(_)) => "prerequisites failed (kubectl hvx doctor)".into(),
                (None, _) => "no agent".into(),
                (Some(other), _) => other.to_string(),
            };
            let cordoned = n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let drain = match (cordoned, leaving.get(&name).copied().unwrap_or(0)) {
                (false, 0) => "-".to_string(),
                (true, 0) => "cordoned".into(),
                (c, k) => format!("{}{k} migrating away", if c { "cordoned, " } else { "" }),
            };
            vec![
                name.clone(),
                dash(condition(n, "Ready")),
                agent_state,
                vms_per_node.get(&name).copied().unwrap_or(0).to_string(),
                drain,
            ]
        })
        .collect();
    let _ = writeln!(out, "\nNODES ({})", node_rows.len());
    out.push_str(&crate::table::render(
        &["NODE", "READY", "AGENT", "VMS", "DRAIN"],
        &node_rows,
    ));
    let migration_rows: Vec<Vec<String>> = running
        .iter()
        .map(|m| {
            let s = m.status.clone().unwrap_or_default();
            vec![
                ns_name(&m.metadata),
                format!("{}/{}", m.spec.application, m.spec.vm),
                dash(s.phase.map(|p| format!("{p:?}"))),
                format!(
                    "{} -> {}",
                    dash(s.source_node),
                    dash(s.target_node.or_else(|| m.spec.target_node.clone()))
                ),
            ]
        })
        .collect();
    let _ = writeln!(out, "\nMIGRATIONS IN PROGRESS ({})", migration_rows.len());
    if !migration_rows.is_empty() {
        out.push_str(&crate::table::render(
            &["MIGRATION", "VM", "PHASE", "FROM -> TO"],
            &migration_rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn vm(name: &str) -> serde_json::Value {
        json!({"name": name, "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 256,
               "disks": [], "nics": []})
    }

    #[test]
    fn one_screen_of_apps_vms_nodes_and_migrations() {
        let app: VmApplication = parse(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
            "metadata": {"name": "shop", "namespace": "demo"},
            "spec": {"vms": [vm("web"), vm("db")]},
            "status": {"phase": "Migrating", "vmCount": 2, "runningCount": 1, "vms": [
                {"name": "web", "phase": "Migrating", "node": "n1",
                 "interfaces": [{"name": "eth0", "macAddress": "00:50:56:00:00:01", "ipAddress": "10.0.0.10"}]},
                {"name": "db", "phase": "Pending", "reason": "waiting for disk db-0"},
            ]},
        }));
        let migrations: Vec<VmMigration> = vec![
            parse(json!({
                "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
                "metadata": {"name": "drain-web", "namespace": "demo"},
                "spec": {"application": "shop", "vm": "web"},
                "status": {"phase": "PreCopy", "sourceNode": "n1", "targetNode": "n2"},
            })),
            parse(json!({
                "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
                "metadata": {"name": "old", "namespace": "demo"},
                "spec": {"application": "shop", "vm": "db"},
                "status": {"phase": "Completed", "sourceNode": "n2", "targetNode": "n1"},
            })),
        ];
        let nodes: Vec<Node> = vec![
            parse(
                json!({"metadata": {"name": "n1", "labels": {"hvx.dev/agent": "ready"}},
                "spec": {"unschedulable": true},
                "status": {"conditions": [{"type": "Ready", "status": "True"},
                                          {"type": "HvxReady", "status": "True"}]}}),
            ),
            parse(
                json!({"metadata": {"name": "n2", "labels": {"hvx.dev/agent": "ready"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"},
                                          {"type": "HvxReady", "status": "False"}]}}),
            ),
            parse(json!({"metadata": {"name": "n3"},
                "status": {"conditions": [{"type": "Ready", "status": "False"}]}})),
        ];
        let text = render(&Inputs {
            apps: vec![app],
            migrations,
            nodes,
        });
        assert_eq!(
            text,
            "APPLICATIONS (1)\n\
             APPLICATION  PHASE      RUNNING\n\
             demo/shop    Migrating  1/2\n\
             \n\
             VMS (2)\n\
             APPLICATION  VM   PHASE      NODE  IP         REASON\n\
             demo/shop    web  Migrating  n1    10.0.0.10  -\n\
             demo/shop    db   Pending    -     -          waiting for disk db-0\n\
             \n\
             NODES (3)\n\
             NODE  READY  AGENT                                      VMS  DRAIN\n\
             n1    True   ready                                      1    cordoned, 1 migrating away\n\
             n2    True   prerequisites failed (kubectl hvx doctor)  0    -\n\
             n3    False  no agent                                   0    -\n\
             \n\
             MIGRATIONS IN PROGRESS (1)\n\
             MIGRATION       VM        PHASE    FROM -> TO\n\
             demo/drain-web  shop/web  PreCopy  n1 -> n2\n"
        );
    }
}
