//! The chart's alerts (`charts/hvx/files/monitoring/alerts.yaml`) and Grafana
//! dashboard (`dashboard.json`): every PromQL expression parses, and every metric it
//! names is one the operator or the agent exports, read from their metric code (a
//! renamed metric fails here). `up` is Prometheus's own.

use promql_parser::parser::{self, Expr, VectorSelector};
use std::collections::BTreeSet;
use std::path::Path;

fn repo(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Metric names a metrics source exports: each `# TYPE name kind` it writes (a
/// summary as `name_sum` and `name_count`), and for the agent's per-VM series
/// `hvx_vm_x` the node total `hvx_node_vms_x` it derives from them.
fn exported_by(source: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let name_at = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in source.match_indices("# TYPE ") {
        let rest = &source[i + 7..];
        let name = name_at(rest);
        let kind = name_at(rest[name.len()..].trim_start());
        if name.is_empty() || name.ends_with('_') {
            continue;
        }
        if kind == "summary" {
            names.insert(format!("{name}_sum"));
            names.insert(format!("{name}_count"));
        } else {
            names.insert(name);
        }
    }
    for (i, _) in source.match_indices("(\"hvx_vm_") {
        let name = name_at(&source[i + 2..]);
        if let Some(rest) = name.strip_prefix("hvx_vm_")
            && rest != "up"
        {
            names.insert(format!("hvx_node_vms_{rest}"));
        }
    }
    names
}

fn exported() -> BTreeSet<String> {
    let mut names = exported_by(&repo("operator/core/src/metrics.rs"));
    names.extend(exported_by(&repo("node-agent/src/agent/metrics.rs")));
    names
}

fn selector_names(vs: &VectorSelector, out: &mut Vec<String>) {
    match &vs.name {
        Some(n) => out.push(n.clone()),
        None => out.extend(
            vs.matchers
                .matchers
                .iter()
                .filter(|m| m.name == "__name__")
                .map(|m| m.value.clone()),
        ),
    }
}

/// Every metric name an expression selects.
fn metric_names(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(vs) => selector_names(vs, out),
        Expr::MatrixSelector(ms) => selector_names(&ms.vs, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Problems of one expression: a parse error, or metrics nobody exports.
fn problems(what: &str, expr: &str, known: &BTreeSet<String>) -> Vec<String> {
    match parser::parse(expr) {
        Err(e) => vec![format!("{what}: does not parse: {e}\n  {expr}")],
        Ok(ast) => {
            let mut names = Vec::new();
            metric_names(&ast, &mut names);
            if names.is_empty() {
                return vec![format!("{what}: selects no metric: {expr}")];
            }
            names
                .into_iter()
                .filter(|n| n != "up" && !known.contains(n))
                .map(|n| format!("{what}: {n} is exported by neither the operator nor the agent"))
                .collect()
        }
    }
}

fn alert_exprs() -> Vec<(String, String)> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&repo("charts/hvx/files/monitoring/alerts.yaml"))
            .expect("alerts.yaml");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .expect("alert or record name");
            let expr = rule["expr"].as_str().expect("expr");
            out.push((format!("alert {name}"), expr.to_string()));
        }
    }
    out
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let d: serde_json::Value =
        serde_json::from_str(&repo("charts/hvx/files/monitoring/dashboard.json"))
            .expect("dashboard.json");
    let mut out = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            out.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    out
}

#[test]
fn alerts_and_dashboard_parse_and_use_exported_metrics_only() {
    let known = exported();
    for name in [
        "hvx_operator_vms",
        "hvx_operator_reconcile_seconds_sum",
        "hvx_agent_prerequisites_failed",
        "hvx_store_free_bytes",
        "hvx_node_vms_cpu_seconds_total",
    ] {
        assert!(known.contains(name), "{name} not found in {known:?}");
    }
    let alerts = alert_exprs();
    let panels = dashboard_exprs();
    assert!(
        alerts.len() >= 8 && panels.len() >= 9,
        "{alerts:?} {panels:?}"
    );
    let all: Vec<String> = alerts
        .iter()
        .chain(&panels)
        .flat_map(|(what, expr)| problems(what, expr, &known))
        .collect();
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn the_check_catches_renamed_metrics_and_bad_syntax() {
    let known = exported_by("# TYPE hvx_x_seconds summary\n# TYPE hvx_y gauge\n");
    assert!(problems("t", "rate(hvx_x_seconds_sum[5m]) / hvx_y", &known).is_empty());
    assert_eq!(
        problems("t", "sum(hvx_renamed) > 0", &known),
        ["t: hvx_renamed is exported by neither the operator nor the agent"]
    );
    assert!(problems("t", "sum(hvx_y", &known)[0].contains("does not parse"));
    assert!(problems("t", "1 + 1", &known)[0].contains("selects no metric"));
}
