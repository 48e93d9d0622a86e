//! OVF envelopes as ovftool and vSphere write them (OVF 1.x and 2.0), parsed with a
//! DTD-free, node-bounded XML parser. Elements and attributes are matched by local name,
//! so the exact namespace version does not matter.

use crate::devices;
use crate::error::{ImportError, Result};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_VMS, MAX_XML_DEPTH, MAX_XML_NODES};
use crate::model::{DiskFile, ImportedApplication};
use crate::ovf_vm;
use roxmltree::{Document, Node, ParsingOptions};
use std::collections::BTreeMap;

/// A `DiskSection/Disk`: the virtual disk a hardware item points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    /// The `References/File` name (plain).
    pub file: String,
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
}

/// Parses an OVF descriptor. `fallback_name` names the application when the
/// descriptor does not.
pub fn parse(text: &str, fallback_name: &str) -> Result<ImportedApplication> {
    if text.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return Err(ImportError::TooLarge {
            what: "OVF descriptor".into(),
            size: text.len() as u64,
            limit: MAX_DESCRIPTOR_BYTES,
        });
    }
    let options = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    let doc =
        Document::parse_with_options(text, options).map_err(|e| ImportError::Xml(e.to_string()))?;
    check_depth(doc.root())?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(ImportError::Ovf(format!(
            "root element is <{}>, not <Envelope>",
            root.tag_name().name()
        )));
    }
    let envelope = Envelope {
        files: references(root)?,
        disks: BTreeMap::new(),
        networks: Vec::new(),
    };
    let envelope = Envelope {
        disks: disk_section(root, &envelope.files)?,
        networks: network_section(root),
        ..envelope
    };

    let systems: Vec<Node> = root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "VirtualSystem")
        .collect();
    if systems.is_empty() {
        return Err(ImportError::Ovf("no VirtualSystem in the envelope".into()));
    }
    if systems.len() > MAX_VMS {
        return Err(ImportError::TooMany {
            what: "VirtualSystems",
            count: systems.len(),
            limit: MAX_VMS,
        });
    }
    let collection = child(root, "VirtualSystemCollection");
    let name = collection
        .or_else(|| (systems.len() == 1).then_some(systems[0]))
        .and_then(|n| child_text(n, "Name").or_else(|| attr(n, "id")))
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(fallback_name)
        .trim()
        .to_owned();

    let ids: Vec<(String, String)> = systems
        .iter()
        .map(|s| {
            let id = attr(*s, "id").unwrap_or_default().to_owned();
            let name = child_text(*s, "Name")
                .filter(|n| !n.is_empty())
                .unwrap_or(&id)
                .to_owned();
            (id, name)
        })
        .collect();
    let mut app = ImportedApplication {
        name,
        networks: envelope.networks.clone(),
        ..ImportedApplication::default()
    };
    for system in systems {
        let vm = ovf_vm::virtual_system(system, &envelope, &mut app.warnings)?;
        for nic in &vm.nics {
            if !app.networks.contains(&nic.network) {
                app.networks.push(nic.network.clone());
            }
        }
        app.vms.push(vm);
    }
    if let Some(collection) = collection {
        start_order(collection, &ids, &mut app);
    }
    let used: Vec<&str> = app
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter().map(|d| d.file.as_str()))
        .collect();
    app.disk_files = envelope
        .files
        .values()
        .filter(|f| used.contains(&f.name.as_str()))
        .cloned()
        .collect();
    Ok(app)
}

/// vApp `StartupSection`: each VM depends on the VMs of the previous start group
/// (the greatest `ovf:order` below its own), which is how vSphere sequences them.
fn start_order(collection: Node, ids: &[(String, String)], app: &mut ImportedApplication) {
    let Some(section) = child(collection, "StartupSection") else {
        return;
    };
    let orders: Vec<(String, u32)> = children(section, "Item")
        .filter_map(|item| {
            let id = attr(item, "id")?;
            let order = attr(item, "order")?.trim().parse().ok()?;
            let name = ids.iter().find(|(i, _)| i == id).map(|(_, n)| n.clone())?;
            Some((name, order))
        })
        .collect();
    for vm in &mut app.vms {
        let Some(&(_, mine)) = orders.iter().find(|(n, _)| n == &vm.name) else {
            continue;
        };
        let previous = orders.iter().map(|(_, o)| *o).filter(|o| *o < mine).max();
        vm.depends_on = orders
            .iter()
            .filter(|(_, o)| Some(*o) == previous)
            .map(|(n, _)| n.clone())
            .collect();
    }
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

fn references(root: Node) -> Result<BTreeMap<String, DiskFile>> {
    let mut files = BTreeMap::new();
    let Some(refs) = child(root, "References") else {
        return Ok(files);
    };
    for file in children(refs, "File") {
        let id = attr(file, "id").ok_or_else(|| ImportError::Ovf("File without ovf:id".into()))?;
        let href = attr(file, "href")
            .ok_or_else(|| ImportError::Ovf(format!("File {id} has no ovf:href")))?;
        if !devices::is_plain_name(href) {
            return Err(ImportError::UnsafeName(href.to_owned()));
        }
        if attr(file, "compression").is_some_and(|c| c != "identity") {
            return Err(ImportError::Ovf(format!(
                "File {href}: compressed references are not supported; re-export without compression"
            )));
        }
        if attr(file, "chunkSize").is_some() {
            return Err(ImportError::Ovf(format!(
                "File {href}: chunked files are not supported; re-export without --chunkSize"
            )));
        }
        let size_bytes = match attr(file, "size") {
            None => None,
            Some(s) => Some(s.trim().parse().map_err(|_| {
                ImportError::Ovf(format!("File {href}: size {s:?} is not a number"))
            })?),
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
    Ok(files)
}

fn disk_section(
    root: Node,
    files: &BTreeMap<String, DiskFile>,
) -> Result<BTreeMap<String, OvfDisk>> {
    let mut disks = BTreeMap::new();
    for section in children(root, "DiskSection") {
        for disk in children(section, "Disk") {
            let id = attr(disk, "diskId")
                .ok_or_else(|| ImportError::Ovf("Disk without ovf:diskId".into()))?;
            let file_ref = attr(disk, "fileRef").ok_or_else(|| {
                ImportError::Ovf(format!(
                    "Disk {id} has no ovf:fileRef (blank disks are not supported)"
                ))
            })?;
            let file = files.get(file_ref).ok_or_else(|| {
                ImportError::Ovf(format!("Disk {id} references unknown File {file_ref}"))
            })?;
            let capacity_bytes = match attr(disk, "capacity") {
                None => None,
                Some(c) => {
                    let units = attr(disk, "capacityAllocationUnits").unwrap_or("byte");
                    Some(scaled(c, units).ok_or_else(|| {
                        ImportError::Ovf(format!(
                            "Disk {id}: capacity {c:?} in {units:?} is not a size"
                        ))
                    })?)
                }
            };
            disks.insert(
                id.to_owned(),
                OvfDisk {
                    file: file.name.clone(),
                    capacity_bytes,
                },
            );
        }
    }
    Ok(disks)
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
        assert!(matches!(parse(text, "x"), Err(ImportError::UnsafeName(_))));
    }
}
