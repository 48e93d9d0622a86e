//! Maps the operator's `LaunchSpec` (the CRD's VM plus resolved UIDs, VNIs and tap
//! names) to the VMM's `VmSpec`. Disk paths are node-local: they come from a
//! `DiskResolver` (the node agent's disk store), the one step not decided here.

use super::LauncherError;
use hvx_api::launch::LaunchSpec;
use hvx_api::vmapp::{Accelerator, ControllerType, Firmware, NicModel, RunStrategy};
use hvx_vmm::spec::{
    AcceleratorChoice, Controller, ControllerKind, CpuTopology, Disk, DiskFormat, MachineType, Nic,
    NicBackend, RestartKind, RestartPolicy, VmSpec,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a disk's image lives on this node.
pub trait DiskResolver {
    /// The image path and format for the OverlayDisk `disk_uid` of VM disk `name`.
    fn resolve(&self, disk_uid: &str, name: &str) -> Result<(PathBuf, DiskFormat), LauncherError>;
}

/// Placeholder resolution until the node agent hands over its overlay paths:
/// `<dir>/<disk uid>/<vm disk name>.qcow2` (the per-VM overlay over the base).
#[derive(Clone, Debug)]
pub struct DirResolver {
    /// Root of the node's disk store as mounted in the launcher pod.
    pub dir: PathBuf,
}

impl DiskResolver for DirResolver {
    fn resolve(&self, disk_uid: &str, name: &str) -> Result<(PathBuf, DiskFormat), LauncherError> {
        if disk_uid.is_empty() || disk_uid.contains('/') || disk_uid.contains("..") {
            return Err(LauncherError::Map(format!(
                "disk {name}: bad OverlayDisk uid {disk_uid:?}"
            )));
        }
        Ok((
            self.dir.join(disk_uid).join(format!("{name}.qcow2")),
            DiskFormat::Qcow2,
        ))
    }
}

/// Resolution through the node's disk store: the overlay the agent created for this
/// VM disk (`hvx_api::node::vm_overlay_ref`), read from its `disk.json` without opening
/// the store (opening clears the agent's import staging).
#[derive(Clone, Debug)]
pub struct StoreResolver {
    /// Root of the node's disk store (`NodePaths::disk_store`).
    pub store_root: PathBuf,
    /// The VM identity (`LaunchSpec::vm_id`).
    pub vm_id: String,
}

impl StoreResolver {
    /// `disk.json` of a VM disk's overlay: the agent writes it last, by rename.
    pub fn meta_path(&self, disk: &str) -> PathBuf {
        let (ns, name) = hvx_api::node::vm_overlay_ref(&self.vm_id, disk);
        self.store_root
            .join("disks")
            .join(ns)
            .join(name)
            .join("disk.json")
    }
}

impl DiskResolver for StoreResolver {
    fn resolve(&self, _disk_uid: &str, name: &str) -> Result<(PathBuf, DiskFormat), LauncherError> {
        let path = self.meta_path(name);
        let text = std::fs::read(&path).map_err(|e| {
            LauncherError::Map(format!(
                "disk {name}: overlay not prepared by the node agent ({}: {e})",
                path.display()
            ))
        })?;
        let meta: hvx_storage::chain::DiskMeta = serde_json::from_slice(&text)
            .map_err(|e| LauncherError::Map(format!("disk {name}: {}: {e}", path.display())))?;
        if meta.active.is_empty() || meta.active.contains('/') || meta.active.contains("..") {
            return Err(LauncherError::Map(format!(
                "disk {name}: bad active layer {:?} in {}",
                meta.active,
                path.display()
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        Ok((
            dir.join(format!("{}.qcow2", meta.active)),
            DiskFormat::Qcow2,
        ))
    }
}

/// The `LaunchSpec` -> `VmSpec` mapping; `run_dir` is the pod's run volume.
pub fn vm_spec_from_launch(
    ls: &LaunchSpec,
    run_dir: &Path,
    resolver: &dyn DiskResolver,
) -> Result<VmSpec, LauncherError> {
    let vm = &ls.vm;
    let kind = |t: ControllerType| match t {
        ControllerType::Pvscsi => ControllerKind::Pvscsi,
        ControllerType::Lsilogic => ControllerKind::Lsilogic,
        ControllerType::Lsisas => ControllerKind::Lsisas,
        ControllerType::Sata => ControllerKind::Sata,
        ControllerType::Ide => ControllerKind::Ide,
    };
    let mut disks = Vec::new();
    for d in &vm.disks {
        let resolved = ls.disks.iter().find(|r| r.name == d.name).ok_or_else(|| {
            LauncherError::Map(format!("disk {} has no resolved OverlayDisk", d.name))
        })?;
        let (path, format) = resolver.resolve(&resolved.disk_uid, &d.name)?;
        disks.push(Disk {
            name: d.name.clone(),
            path,
            format,
            controller: kind(d.controller),
            bus: d.bus,
            unit: d.unit,
            readonly: d.read_only,
            cdrom: d.cdrom,
            boot_order: d.boot_order,
        });
    }
    let mut nics = Vec::new();
    let mut static_ips = String::new();
    for (i, n) in vm.nics.iter().enumerate() {
        let resolved =
            ls.nics.iter().find(|r| r.name == n.name).ok_or_else(|| {
                LauncherError::Map(format!("NIC {} has no resolved network", n.name))
            })?;
        nics.push(Nic {
            name: n.name.clone(),
            model: match n.model {
                NicModel::Vmxnet3 => hvx_vmm::spec::NicModel::Vmxnet3,
                NicModel::E1000 => hvx_vmm::spec::NicModel::E1000,
                NicModel::E1000e => hvx_vmm::spec::NicModel::E1000e,
                NicModel::Virtio => hvx_vmm::spec::NicModel::Virtio,
            },
            mac: n.mac_address.clone(),
            pci_slot: n.pci_slot,
            slot_number: n.pci_slot_number,
            backend: NicBackend::Tap {
                name: resolved.tap.clone(),
                fd: None,
            },
        });
        // The test guest (and hvx guest tooling) read static addresses from fw_cfg;
        // guest NIC order follows PCI order, which follows declaration order here. A
        // NIC with a slot number has the name Linux gives it from that slot.
        if let Some(ip) = &n.ip_address {
            match n.pci_slot_number {
                Some(slot) => static_ips.push_str(&format!("ip.ens{slot}={ip}\n")),
                None => static_ips.push_str(&format!("ip.eth{i}={ip}\n")),
            }
        }
    }
    // The VM's name for hvx guest tooling (a VMware guest keeps its own hostname on
    // its disk and never reads this), plus static addresses.
    let mut fw_cfg = BTreeMap::new();
    fw_cfg.insert(
        "opt/hvx/config".to_string(),
        format!("hostname={}\n{static_ips}", vm.name),
    );
    let devices = vm.devices.clone().unwrap_or_default();
    let identity = vm.identity.clone().unwrap_or_default();
    Ok(VmSpec {
        name: vm.name.clone(),
        uuid: identity.uuid,
        serial: identity.serial_number,
        firmware: match vm.firmware {
            Firmware::Bios => hvx_vmm::spec::Firmware::Bios,
            Firmware::Efi => hvx_vmm::spec::Firmware::Efi,
        },
        cpu: CpuTopology {
            sockets: vm.cpu.sockets,
            cores: vm.cpu.cores_per_socket,
            threads: vm.cpu.threads_per_core,
        },
        memory_mib: vm.memory_mib,
        accelerator: match vm.accelerator {
            Accelerator::Auto => AcceleratorChoice::Auto,
            Accelerator::Kvm => AcceleratorChoice::Kvm,
            Accelerator::Tcg => AcceleratorChoice::Tcg,
        },
        // VMware's i440bx is closest to QEMU's i440fx `pc`; slot numbers need q35
        // (hvx_vmm::argv explains why; the CRD refuses them with IDE disks).
        machine: if uses_slot_numbers(vm) {
            MachineType::Q35
        } else {
            MachineType::Pc
        },
        controllers: vm
            .controllers
            .iter()
            .flatten()
            .map(|c| Controller {
                kind: kind(c.type_),
                bus: c.bus,
                pci_slot: c.pci_slot,
                slot_number: c.pci_slot_number,
            })
            .collect(),
        disks,
        nics,
        run_dir: run_dir.to_path_buf(),
        vnc: devices.vnc,
        balloon: devices.balloon,
        vmport: vm.devices.as_ref().is_none_or(|d| d.vmport),
        svga: true,
        fw_cfg,
        restart_policy: RestartPolicy {
            policy: match vm.run_strategy {
                RunStrategy::Always => RestartKind::Always,
                RunStrategy::RerunOnFailure => RestartKind::OnFailure,
                RunStrategy::Manual | RunStrategy::Halted => RestartKind::Never,
            },
            max_restarts: 3,
        },
        shutdown_timeout_s: vm.shutdown_grace_seconds,
    })
}

/// True if a NIC or controller carries a VMware slot number (the VM then needs q35).
fn uses_slot_numbers(vm: &hvx_api::VirtualMachine) -> bool {
    vm.nics.iter().any(|n| n.pci_slot_number.is_some())
        || vm
            .controllers
            .iter()
            .flatten()
            .any(|c| c.pci_slot_number.is_some())
}

/// A LaunchSpec fixture shared by the launcher's tests.
#[cfg(test)]
pub(crate) fn fixture() -> LaunchSpec {
    serde_json::from_value(serde_json::json!({
            "namespace": "default", "application": "shop", "vmId": "uid-1/web",
            "vm": {
                "name": "web", "cpu": {"sockets": 1, "coresPerSocket": 2}, "memoryMib": 512,
                "identity": {"uuid": "421a5b3c-0000-4000-8000-000000000001", "serialNumber": "VMware-42 1a"},
                "disks": [{"name": "boot", "overlayDisk": {"name": "web-boot"}, "controller": "pvscsi", "unit": 0, "bootOrder": 1}],
                "nics": [{"name": "eth0", "network": {"name": "lan"}, "macAddress": "00:50:56:01:02:03", "ipAddress": "10.1.0.5/24"}]
            },
            "disks": [{"name": "boot", "diskUid": "d-uid"}],
            "nics": [{"name": "eth0", "networkUid": "n-uid", "vni": 7, "tap": "hvt0123456789ab"}]
        }))
        .expect("launch spec fixture parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> LaunchSpec {
        fixture()
    }

    #[test]
    fn maps_identity_devices_and_resolves_disks() {
        let r = DirResolver {
            dir: PathBuf::from("/var/lib/hvx/disks"),
        };
        let spec = vm_spec_from_launch(&launch(), Path::new("/run/hvx"), &r).expect("maps");
        assert_eq!(
            spec.uuid.as_deref(),
            Some("421a5b3c-0000-4000-8000-000000000001")
        );
        assert_eq!(spec.serial.as_deref(), Some("VMware-42 1a"));
        assert_eq!(
            spec.cpu,
            CpuTopology {
                sockets: 1,
                cores: 2,
                threads: 1
            }
        );
        assert_eq!(
            spec.disks[0].path,
            PathBuf::from("/var/lib/hvx/disks/d-uid/boot.qcow2")
        );
        assert_eq!(spec.disks[0].controller, ControllerKind::Pvscsi);
        assert_eq!(
            spec.nics[0].backend,
            NicBackend::Tap {
                name: "hvt0123456789ab".into(),
                fd: None,
            }
        );
        assert_eq!(
            spec.fw_cfg["opt/hvx/config"],
            "hostname=web\nip.eth0=10.1.0.5/24\n"
        );
        assert_eq!(spec.restart_policy.policy, RestartKind::Always);
        hvx_vmm::validate(&spec).expect("mapped spec is valid");
    }

    #[test]
    fn vmware_slot_numbers_choose_q35_and_name_the_static_address_by_slot() {
        let r = DirResolver {
            dir: PathBuf::from("/d"),
        };
        let spec = vm_spec_from_launch(&launch(), Path::new("/run/hvx"), &r).expect("maps");
        assert_eq!(spec.machine, MachineType::Pc);
        assert_eq!(spec.nics[0].slot_number, None);

        let mut ls = launch();
        ls.vm.nics[0].pci_slot_number = Some(192);
        ls.vm.controllers = Some(vec![hvx_api::DiskController {
            type_: ControllerType::Pvscsi,
            bus: 0,
            pci_slot: Some(16),
            pci_slot_number: Some(160),
        }]);
        let spec = vm_spec_from_launch(&ls, Path::new("/run/hvx"), &r).expect("maps");
        assert_eq!(spec.machine, MachineType::Q35);
        assert_eq!(spec.nics[0].slot_number, Some(192));
        assert_eq!(spec.controllers[0].slot_number, Some(160));
        assert_eq!(
            spec.fw_cfg["opt/hvx/config"],
            "hostname=web\nip.ens192=10.1.0.5/24\n"
        );
        hvx_vmm::validate(&spec).expect("mapped spec is valid");
    }

    #[test]
    fn unresolved_disk_is_a_clear_error() {
        let mut ls = launch();
        ls.disks.clear();
        let r = DirResolver {
            dir: PathBuf::from("/d"),
        };
        let err = vm_spec_from_launch(&ls, Path::new("/run/hvx"), &r).expect_err("no resolution");
        assert!(
            err.to_string()
                .contains("disk boot has no resolved OverlayDisk"),
            "{err}"
        );
    }
}
