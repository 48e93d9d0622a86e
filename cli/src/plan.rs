//! `--dry-run`: what import would create and send, in words.

use crate::manifests::Manifests;
use hvx_import::Loaded;
use std::fmt::Write as _;

/// Human-readable size (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The plan text.
pub fn render(loaded: &Loaded, m: &Manifests, upload: bool) -> String {
    let mut out = String::new();
    let w = &mut out;
    let app = m.app.metadata.name.as_deref().unwrap_or("");
    let ns = m
        .app
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("<current namespace>");
    let _ = writeln!(
        w,
        "Import plan for {:?} ({:?}) into namespace {ns}",
        loaded.app.name, loaded.kind
    );
    if let Some(option) = &loaded.app.deployment_option {
        let _ = writeln!(w, "Deployment option: {option}");
    }
    let _ = writeln!(w, "VmApplication {app}:");
    for vm in &m.app.spec.vms {
        let _ = writeln!(
            w,
            "  VM {}: {} vCPU ({} sockets x {} cores), {} MiB, {:?}, {} disk(s), {} NIC(s)",
            vm.name,
            vm.cpu.vcpus(),
            vm.cpu.sockets,
            vm.cpu.cores_per_socket,
            vm.memory_mib,
            vm.firmware,
            vm.disks.len(),
            vm.nics.len()
        );
        for d in &vm.disks {
            let _ = writeln!(
                w,
                "    disk {}: {:?} {}:{} boot={} -> OverlayDisk {}",
                d.name,
                d.controller,
                d.bus,
                d.unit,
                d.boot_order.map_or("-".into(), |b| b.to_string()),
                d.overlay_disk.name
            );
        }
        for n in &vm.nics {
            let _ = writeln!(
                w,
                "    nic {}: {:?} {}{} -> VirtualNetwork {}",
                n.name,
                n.model,
                n.mac_address,
                n.ip_address
                    .as_deref()
                    .map_or(String::new(), |ip| format!(" {ip}")),
                n.network.name
            );
        }
    }
    for n in &m.networks {
        let cidr = n.spec.subnets.first().map_or("", |s| s.cidr.as_str());
        let dhcp = n
            .spec
            .subnets
            .first()
            .and_then(|s| s.dhcp.as_ref())
            .is_some_and(|d| d.enabled);
        let _ = writeln!(
            w,
            "VirtualNetwork {}: {cidr}, DHCP {}",
            n.metadata.name.as_deref().unwrap_or(""),
            if dhcp { "on" } else { "off" }
        );
    }
    let mut total = 0u64;
    for d in &m.disks {
        let name = d.metadata.name.as_deref().unwrap_or("");
        if d.spec.source.blank.is_some() {
            let capacity = d.spec.capacity.as_ref().map_or("?".into(), |q| q.0.clone());
            let _ = writeln!(w, "OverlayDisk {name}: blank, capacity {capacity}");
            continue;
        }
        let file = m.disk_files.get(name).map_or("", String::as_str);
        let size = loaded
            .disks
            .get(file)
            .map_or(0, hvx_import::DiskLocation::size);
        total += size;
        let capacity = d.spec.capacity.as_ref().map_or("?".into(), |q| q.0.clone());
        let _ = writeln!(
            w,
            "OverlayDisk {name}: {file} ({}, capacity {capacity}){}",
            human(size),
            if upload { ", uploaded" } else { "" }
        );
    }
    if upload {
        // Blank disks have nothing to upload.
        let _ = writeln!(
            w,
            "Upload: {} in {} disk(s)",
            human(total),
            m.disk_files.len()
        );
    }
    if !loaded.verified.is_empty() {
        let _ = writeln!(w, "Manifest: {} member(s) verified", loaded.verified.len());
    }
    for warning in &m.warnings {
        let _ = writeln!(w, "warning: {warning}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(16 << 30), "16.0 GiB");
    }
}
