//! Envelope-level OVF sections that shape the whole application: the deployment
//! option (`DeploymentOptionSection`) and the vApp start order (`StartupSection`,
//! nested `VirtualSystemCollection`s included).

use crate::error::ImportError;
use crate::model::ImportedApplication;
use crate::ovf::{attr, child, child_text, children};
use roxmltree::Node;

/// The configuration to deploy: `requested` when the export has it, else the one
/// marked `ovf:default`, else the first (DSP0243 §9.8). `None` when the export
/// declares no options.
pub(crate) fn deployment_option(
    root: Node,
    requested: Option<&str>,
    warnings: &mut Vec<String>,
    problems: &mut Vec<ImportError>,
) -> Option<String> {
    let section = root
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "DeploymentOptionSection");
    let Some(section) = section else {
        if let Some(r) = requested {
            problems.push(ImportError::Ovf(format!(
                "deployment option {r:?} was asked for, but the export declares none"
            )));
        } else if root
            .descendants()
            .any(|n| n.is_element() && attr(n, "configuration").is_some())
        {
            warnings.push(
                "hardware items name deployment options (ovf:configuration) but the export has no DeploymentOptionSection; every item is kept, the first of each kind wins".into(),
            );
        }
        return None;
    };
    let options: Vec<(String, bool)> = children(section, "Configuration")
        .filter_map(|c| {
            let id = attr(c, "id")?.trim();
            let default = attr(c, "default").is_some_and(|d| d.trim() == "true");
            (!id.is_empty()).then(|| (id.to_owned(), default))
        })
        .collect();
    let ids: Vec<&str> = options.iter().map(|(id, _)| id.as_str()).collect();
    let chosen = match requested {
        Some(r) if ids.contains(&r) => r.to_owned(),
        Some(r) => {
            problems.push(ImportError::Ovf(format!(
                "deployment option {r:?} is not in the export (it has: {})",
                ids.join(", ")
            )));
            return None;
        }
        None => match options.iter().find(|(_, d)| *d).or(options.first()) {
            Some((id, _)) => id.clone(),
            None => return None,
        },
    };
    if ids.len() > 1 {
        let others: Vec<&str> = ids.iter().copied().filter(|i| *i != chosen).collect();
        let how = if requested.is_some() {
            "as asked"
        } else {
            "the export's default"
        };
        warnings.push(format!(
            "deployment option {chosen:?} ({how}) sizes the VMs; the export also offers {} (choose with --deployment-option)",
            others.join(", ")
        ));
    }
    Some(chosen)
}

/// Whether a hardware item applies to the chosen deployment option: items without
/// `ovf:configuration` apply to all of them.
pub(crate) fn applies(item: Node, chosen: Option<&str>) -> bool {
    match (attr(item, "configuration"), chosen) {
        (Some(list), Some(c)) => list.split_whitespace().any(|x| x == c),
        _ => true,
    }
}

/// One child of a collection in the start order.
struct Entry {
    order: Option<u32>,
    delay: u32,
    waits_for_guest: bool,
    powers_on: bool,
}

fn entry(section: Option<Node>, id: &str) -> Entry {
    let item = section.and_then(|s| children(s, "Item").find(|i| attr(*i, "id") == Some(id)));
    let num = |k: &str| {
        item.and_then(|i| attr(i, k))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    Entry {
        order: num("order"),
        delay: num("startDelay").unwrap_or(0),
        waits_for_guest: item
            .and_then(|i| attr(i, "waitingForGuest"))
            .is_some_and(|v| v.trim() == "true"),
        powers_on: item
            .and_then(|i| attr(i, "startAction"))
            .is_none_or(|a| !a.trim().eq_ignore_ascii_case("none")),
    }
}

/// The VMs whose running means `node` has started: itself for a VirtualSystem; for a
/// collection, those of its last start group (which depend on the earlier groups)
/// plus its unordered members. Keeps `dependsOn` short (the API allows 16) without
/// changing what a later group waits for.
fn finishers(node: Node) -> Vec<String> {
    if node.tag_name().name() == "VirtualSystem" {
        return vec![system_name(node)];
    }
    let section = child(node, "StartupSection");
    let members: Vec<(Node, Option<u32>)> = node
        .children()
        .filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "VirtualSystem" | "VirtualSystemCollection"
                )
        })
        .map(|c| (c, entry(section, attr(c, "id").unwrap_or_default()).order))
        .collect();
    let last = members.iter().filter_map(|(_, o)| *o).max();
    members
        .iter()
        .filter(|(_, o)| o.is_none() || *o == last)
        .flat_map(|(c, _)| finishers(*c))
        .collect()
}

fn system_name(s: Node) -> String {
    child_text(s, "Name")
        .filter(|n| !n.is_empty())
        .or_else(|| attr(s, "id"))
        .unwrap_or_default()
        .to_owned()
}

/// vApp start order, as vSphere runs it: each collection starts its children group by
/// group (`ovf:order` ascending; a child collection starts as a whole, its own
/// StartupSection ordering its members); a VM depends on every VM of the previous
/// group, and waits the longest `ovf:startDelay` of that group after it runs.
/// Waiting for the guest (VMware Tools) has no hvx equivalent and is reported.
pub(crate) fn start_order(collection: Node, app: &mut ImportedApplication) {
    walk(collection, (&[], 0), app);
}

/// Longest start delay carried into `startDelaySeconds` (the API's bound).
pub const MAX_START_DELAY: u32 = 3600;

/// Orders `collection`'s members; `before` is what its first group waits for and the
/// delay after it.
fn walk(collection: Node, before: (&[String], u32), app: &mut ImportedApplication) {
    let (before, before_delay) = before;
    let section = child(collection, "StartupSection");
    let mut members: Vec<(Node, Entry)> = collection
        .children()
        .filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "VirtualSystem" | "VirtualSystemCollection"
                )
        })
        .map(|c| (c, entry(section, attr(c, "id").unwrap_or_default())))
        .collect();
    // Children the section does not order start with the first group (vSphere puts
    // unordered entries in their own group; nothing depends on them).
    members.sort_by_key(|(_, e)| e.order.unwrap_or(0));
    if let Some(section) = section {
        for id in children(section, "Item").filter_map(|i| attr(i, "id")) {
            if !members.iter().any(|(m, _)| attr(*m, "id") == Some(id)) {
                app.warnings.push(format!(
                    "start order: {id:?} is not a VM or vApp of {:?}; its entry is ignored",
                    system_name(collection)
                ));
            }
        }
    }
    let last_order = members
        .iter()
        .filter_map(|(_, e)| e.order)
        .max()
        .unwrap_or(0);
    let mut previous: Vec<String> = before.to_vec();
    let mut previous_delay = before_delay;
    let mut group: Vec<String> = Vec::new();
    let mut group_delay = 0;
    let mut group_order = None;
    for (node, e) in &members {
        if e.order.is_some() && group_order.is_some() && e.order != group_order {
            previous = std::mem::take(&mut group);
            previous_delay = std::mem::take(&mut group_delay);
        }
        if e.order.is_some() {
            group_order = e.order;
        }
        let (deps, delay) = if e.order.is_some() {
            (previous.clone(), previous_delay)
        } else {
            (before.to_vec(), before_delay)
        };
        let who = system_name(*node);
        // Delays and waiting only matter when a later group waits for this one.
        let before_last = e.order.is_some_and(|o| o < last_order);
        if before_last && e.delay > MAX_START_DELAY {
            app.warnings.push(format!(
                "{who}: vSphere waited {} s after starting it before the next start group; hvx waits {MAX_START_DELAY} s, its longest start delay",
                e.delay
            ));
        }
        if before_last && e.waits_for_guest {
            // vSphere moves on when Tools report ready or the delay ends, whichever is
            // first; hvx cannot see the guest's Tools, so only the delay remains.
            app.warnings.push(if e.delay > 0 {
                format!(
                    "{who}: vSphere started the next start group once its guest (VMware Tools) was ready, at most {} s; hvx waits the full {} s",
                    e.delay,
                    e.delay.min(MAX_START_DELAY)
                )
            } else {
                format!(
                    "{who}: vSphere waited for its guest (VMware Tools) before the next start group; hvx starts the next group as soon as this one runs"
                )
            });
        }
        if node.tag_name().name() == "VirtualSystem" {
            if let Some(vm) = app.vms.iter_mut().find(|v| v.name == who) {
                vm.depends_on = deps.clone();
                vm.start_delay_seconds =
                    (delay > 0 && !deps.is_empty()).then_some(delay.min(MAX_START_DELAY));
                if !e.powers_on {
                    vm.stays_off = true;
                    app.warnings.push(format!(
                        "{who}: the vApp does not power it on (startAction none); it gets runStrategy Halted (set Always or Manual to start it)"
                    ));
                }
            }
        } else {
            if !e.powers_on {
                app.warnings.push(format!(
                    "{who}: startAction none on a nested vApp is not carried; its VMs start"
                ));
            }
            walk(*node, (&deps, delay), app);
        }
        if e.order.is_some() {
            group.extend(finishers(*node));
            group_delay = group_delay.max(e.delay);
        }
    }
}
