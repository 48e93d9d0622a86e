//! OVF envelopes as ovftool and vSphere write them (OVF 1.x and 2.0), parsed with a
//! DTD-free, node-bounded XML parser. Elements and attributes are matched by local name,
//! so the exact namespace version does not matter.

use crate::devices;
use crate::error::{ImportError, Result};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_VMS, MAX_XML_DEPTH, MAX_XML_NODES};
use crate::model::{DiskFile, ImportedApplication};
use crate::{ovf_sections, ovf_vcloud, ovf_vm};
use roxmltree::{Document, Node, ParsingOptions};
use std::collections::BTreeMap;

/// A `DiskSection/Disk`: the virtual disk a hardware item points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    /// The `References/File` name (plain); `None` for a blank disk (no `ovf:fileRef`,
    /// or an empty one), which VMware creates empty at deployment.
    pub file: Option<String>,
    /// Capacity in bytes.
    pub capacity_bytes: Option<u64>,
}

/// What the VirtualSystems share: the envelope's sections.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    /// `ovf:id` of a File to its plain name.
    pub files: BTreeMap<String, DiskFile>,
    /// `ovf:diskId` to the disk.
    pub disks: BTreeMap<String, OvfDisk>,
    /// NetworkSection names, in order.
    pub networks: Vec<String>,
    /// The deployment option chosen (`DeploymentOptionSection`), which selects the
    /// hardware items whose `ovf:configuration` names it.
    pub configuration: Option<String>,
}

/// Choices the user makes for an OVF.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OvfOptions {
    /// `DeploymentOptionSection` configuration to deploy (default: the export's).
    pub deployment_option: Option<String>,
}

/// Parses an OVF descriptor with the export's default deployment option.
/// `fallback_name` names the application when the descriptor does not.
pub fn parse(text: &str, fallback_name: &str) -> Result<ImportedApplication> {
    parse_with(text, fallback_name, &OvfOptions::default())
}

/// Parses an OVF descriptor. Every problem of the export is reported in one error
/// ([`ImportError::Problems`] when there are several); only an unreadable document
/// stops at the first.
pub fn parse_with(
    text: &str,
    fallback_name: &str,
    options: &OvfOptions,
) -> Result<ImportedApplication> {
    if text.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return Err(ImportError::TooLarge {
            what: "OVF descriptor".into(),
            size: text.len() as u64,
            limit: MAX_DESCRIPTOR_BYTES,
        });
    }
    let parsing = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    let doc =
        Document::parse_with_options(text, parsing).map_err(|e| ImportError::Xml(e.to_string()))?;
    check_depth(doc.root())?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(ImportError::Ovf(format!(
            "root element is <{}>, not <Envelope>",
            root.tag_name().name()
        )));
    }
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let files = references(root, &mut problems);
    let systems: Vec<Node> = root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "VirtualSystem")
        .collect();
    if systems.is_empty() {
        problems.push(ImportError::Ovf("no VirtualSystem in the envelope".into()));
        ImportError::collect(problems)?;
        return Err(ImportError::Ovf("no VirtualSystem in the envelope".into()));
    }
    if systems.len() > MAX_VMS {
        return Err(ImportError::TooMany {
            what: "VirtualSystems",
            count: systems.len(),
            limit: MAX_VMS,
        });
    }
    let envelope = Envelope {
        disks: disk_section(root, &files, &mut problems),
        files,
        networks: network_section(root),
        configuration: ovf_sections::deployment_option(
            root,
            options.deployment_option.as_deref(),
            &mut warnings,
            &mut problems,
        ),
    };
    let collection = child(root, "VirtualSystemCollection");
    let name = collection
        .or_else(|| (systems.len() == 1).then_some(systems[0]))
        .and_then(|n| child_text(n, "Name").or_else(|| attr(n, "id")))
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(fallback_name)
        .trim()
        .to_owned();

    let mut app = ImportedApplication {
        name,
        deployment_option: envelope.configuration.clone(),
        network_configs: ovf_vcloud::network_configs(root, &mut warnings),
        warnings,
        ..ImportedApplication::default()
    };
    let mut used_files = Vec::new();
    for system in &systems {
        let Some(vm) = ovf_vm::virtual_system(
            *system,
            &envelope,
            &mut app.warnings,
            &mut problems,
            &mut used_files,
        ) else {
            continue;
        };
        app.vms.push(vm);
    }
    ImportError::collect(problems)?;
    app.networks = used_networks(&envelope.networks, &app.vms, &mut app.warnings);
    if let Some(collection) = collection {
        ovf_sections::start_order(collection, &mut app);
    }
    let used: Vec<&str> = app
        .vms
        .iter()
        .flat_map(|vm| {
            vm.disks
                .iter()
                .filter(|d| !d.blank)
                .map(|d| d.file.as_str())
        })
        .collect();
    for file in envelope.files.values() {
        let name = file.name.as_str();
        if !used.contains(&name) && !used_files.iter().any(|u| u == name) {
            app.warnings.push(format!(
                "file {name:?} of the export is used by no VM disk; not imported"
            ));
        }
    }
    app.disk_files = envelope
        .files
        .values()
        .filter(|f| used.contains(&f.name.as_str()))
        .cloned()
        .collect();
    Ok(app)
}

/// The networks VirtualNetworks are made for: those a NIC uses, NetworkSection order
/// first. Declared networks no VM uses are named in a warning and dropped.
fn used_networks(
    declared: &[String],
    vms: &[crate::model::ImportedVm],
    warnings: &mut Vec<String>,
) -> Vec<String> {
    let mut used: Vec<String> = Vec::new();
    let in_use = |n: &String| {
        vms.iter()
            .any(|vm| vm.nics.iter().any(|nic| &nic.network == n))
    };
    for n in declared {
        if in_use(n) {
            used.push(n.clone());
        } else {
            warnings.push(format!(
                "network {n:?} is declared but no VM is connected to it; no VirtualNetwork is made for it"
            ));
        }
    }
    for vm in vms {
        for nic in &vm.nics {
            if !used.contains(&nic.network) {
                used.push(nic.network.clone());
            }
        }
    }
    used
}

/// Refuses documents nested deeper than any OVF needs, before anything walks them.
fn check_depth(root: Node) -> Result<()> {
    let mut stack = vec![(root, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth > MAX_XML_DEPTH {
            return Err(ImportError::TooMany {
                what: "levels of XML nesting",
                count: depth,
                limit: MAX_XML_DEPTH,
            });
        }
        stack.extend(
            node.children()
                .filter(Node::is_element)
                .map(|c| (c, depth + 1)),
        );
    }
    Ok(())
}

/// The first child element with this local name.
pub fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// All child elements with this local name.
pub fn children<'a, 'i: 'a>(
    node: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

/// Trimmed text of the first child element with this local name.
pub fn child_text<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|c| c.text()).map(str::trim)
}

/// An attribute by local name, whatever its namespace (`ovf:id`, `vmw:key`).
pub fn attr<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
}

fn references(root: Node, problems: &mut Vec<ImportError>) -> BTreeMap<String, DiskFile> {
    let mut files = BTreeMap::new();
    let Some(refs) = child(root, "References") else {
        return files;
    };
    for file in children(refs, "File") {
        let Some(id) = attr(file, "id") else {
            problems.push(ImportError::Ovf("File without ovf:id".into()));
            continue;
        };
        let Some(href) = attr(file, "href") else {
            problems.push(ImportError::Ovf(format!("File {id} has no ovf:href")));
            continue;
        };
        if !devices::is_plain_name(href) {
            problems.push(ImportError::UnsafeName(href.to_owned()));
            continue;
        }
        if attr(file, "compression").is_some_and(|c| c != "identity") {
            problems.push(ImportError::Ovf(format!(
                "File {href}: compressed references are not supported; re-export without compression"
            )));
        }
        if attr(file, "chunkSize").is_some() {
            problems.push(ImportError::Ovf(format!(
                "File {href}: chunked files are not supported; re-export without --chunkSize"
            )));
        }
        let size_bytes = match attr(file, "size") {
            None => None,
            Some(s) => match s.trim().parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(ImportError::Ovf(format!(
                        "File {href}: size {s:?} is not a number"
                    )));
                    None
                }
            },
        };
        files.insert(
            id.to_owned(),
            DiskFile {
                name: href.to_owned(),
                size_bytes,
                format: crate::model::ImageFormat::Detect,
            },
        );
    }
    files
}

fn disk_section(
    root: Node,
    files: &BTreeMap<String, DiskFile>,
    problems: &mut Vec<ImportError>,
) -> BTreeMap<String, OvfDisk> {
    let mut disks = BTreeMap::new();
    for section in children(root, "DiskSection") {
        for disk in children(section, "Disk") {
            let Some(id) = attr(disk, "diskId") else {
                problems.push(ImportError::Ovf("Disk without ovf:diskId".into()));
                continue;
            };
            let capacity_bytes = match attr(disk, "capacity") {
                None => None,
                Some(c) => {
                    let units = attr(disk, "capacityAllocationUnits").unwrap_or("byte");
                    let bytes = scaled(c, units);
                    if bytes.is_none() {
                        problems.push(ImportError::Ovf(format!(
                            "Disk {id}: capacity {c:?} in {units:?} is not a size"
                        )));
                    }
                    bytes
                }
            };
            // No fileRef, or an empty one: a blank disk VMware creates at deployment.
            let file = match attr(disk, "fileRef")
                .map(str::trim)
                .filter(|f| !f.is_empty())
            {
                None => {
                    if capacity_bytes.is_none_or(|c| c == 0) {
                        problems.push(ImportError::Ovf(format!(
                            "Disk {id} is blank (no ovf:fileRef) and declares no capacity"
                        )));
                    }
                    None
                }
                Some(file_ref) => match files.get(file_ref) {
                    Some(f) => Some(f.name.clone()),
                    None => {
                        problems.push(ImportError::Ovf(format!(
                            "Disk {id} references unknown File {file_ref}"
                        )));
                        continue;
                    }
                },
            };
            disks.insert(
                id.to_owned(),
                OvfDisk {
                    file,
                    capacity_bytes,
                },
            );
        }
    }
    disks
}

fn network_section(root: Node) -> Vec<String> {
    let mut names = Vec::new();
    for section in children(root, "NetworkSection") {
        for net in children(section, "Network") {
            if let Some(name) = attr(net, "name").map(str::trim)
                && !name.is_empty()
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// `quantity` in `units` as bytes. Units as OVF writes them: `byte`, `byte * 2^30`,
/// `byte * 10^9`, `KiloBytes`, `MegaBytes`, `GigaBytes`. `None` on overflow or junk.
pub fn scaled(quantity: &str, units: &str) -> Option<u64> {
    let q: u64 = quantity.trim().parse().ok()?;
    q.checked_mul(unit_bytes(units)?)
}

fn unit_bytes(units: &str) -> Option<u64> {
    let u: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    match u.as_str() {
        "byte" | "bytes" => return Some(1),
        "kilobytes" | "kb" => return Some(1 << 10),
        "megabytes" | "mb" => return Some(1 << 20),
        "gigabytes" | "gb" => return Some(1 << 30),
        _ => {}
    }
    let rest = u.strip_prefix("byte*")?;
    let (base, exp) = rest.split_once('^')?;
    let base: u64 = base.parse().ok()?;
    let exp: u32 = exp.parse().ok()?;
    if base != 2 && base != 10 {
        return None;
    }
    base.checked_pow(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_as_ovf_writes_them() {
        assert_eq!(scaled("16", "byte * 2^30"), Some(16 << 30));
        assert_eq!(scaled("1073741824", "byte"), Some(1 << 30));
        assert_eq!(scaled("2048", "byte * 2^20"), Some(2048 << 20));
        assert_eq!(scaled("2", "GigaBytes"), Some(2 << 30));
        assert_eq!(scaled("5", "byte * 10^9"), Some(5_000_000_000));
        assert_eq!(scaled("5", "byte * 3^2"), None);
        assert_eq!(scaled("99999999999", "byte * 2^60"), None);
        assert_eq!(scaled("x", "byte"), None);
        assert_eq!(scaled("1", "furlongs"), None);
    }

    #[test]
    fn dtds_are_refused() {
        let text =
            r#"<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>"#;
        assert!(matches!(parse(text, "x"), Err(ImportError::Xml(_))));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!(
            "<Envelope>{}{}</Envelope>",
            "<a>".repeat(MAX_XML_DEPTH + 5),
            "</a>".repeat(MAX_XML_DEPTH + 5)
        );
        assert!(matches!(
            parse(&text, "x"),
            Err(ImportError::TooMany { .. })
        ));
    }

    #[test]
    fn wrong_root_and_empty_envelopes_are_refused() {
        assert!(matches!(parse("<Foo/>", "x"), Err(ImportError::Ovf(_))));
        assert!(matches!(
            parse("<Envelope/>", "x"),
            Err(ImportError::Ovf(_))
        ));
        assert!(matches!(parse("<Envelope>", "x"), Err(ImportError::Xml(_))));
    }

    #[test]
    fn traversal_in_href_is_refused() {
        let text = r#"<Envelope><References><File ovf:id="f" ovf:href="../../etc/shadow" xmlns:ovf="o"/></References></Envelope>"#;
        let e = parse(text, "x").expect_err("refused");
        assert!(
            e.to_string()
                .contains("unsafe file name \"../../etc/shadow\""),
            "{e}"
        );
    }
}
