//! Privileged: VMware's PCI slot numbers reach the guest. Boots the test guest on q35
//! with two vmxnet3 NICs at physical slots 160 and 192 and a network configuration that
//! names `ens160` and `ens192` (as a guest imported from VMware would have), and checks
//! the guest derived those names the way systemd-udev does and configured them. The
//! VM boots from a pvscsi controller behind its own root port (slot number 224) and has
//! an ISO in a SATA CD-ROM drive, which the guest must see as `sr0`.

mod common;

use common::*;
use hvx_vmm::Accel;
use hvx_vmm::console::SerialLog;
use hvx_vmm::spec::MachineType;
use hvx_vmm::vm::{StartOptions, Vm};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn nics_at_vmware_slot_numbers_get_their_ens_names_and_isos_are_cdroms() {
    if !require_root() {
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = overlay_on_qcow2_base(&guest, tmp.path());
    let run_dir = tmp.path().join("run");
    let mut spec = vm_spec("slots", &disk, &run_dir);
    spec.machine = MachineType::Q35;
    spec.balloon = false;
    let second = serde_json::json!({"name": "ethernet1", "model": "vmxnet3",
        "mac": "00:50:56:12:34:57", "pci_slot": 18, "backend": {"user": {}}});
    spec.nics
        .push(serde_json::from_value(second).expect("nic parses"));
    spec.nics[0].slot_number = Some(160);
    spec.nics[1].slot_number = Some(192);
    // The boot disk's controller behind a root port too (VMware puts scsi0 at 160 or
    // 224): SeaBIOS must find and boot it there.
    spec.controllers[0].slot_number = Some(224);
    // An ISO in a CD/DVD drive on SATA (q35 has no IDE): a read-only CD-ROM.
    let iso = tmp.path().join("media.iso");
    std::fs::write(&iso, vec![0x5a_u8; 2048 * 64]).expect("write iso");
    let cd = serde_json::json!({"name": "cd0", "path": iso, "format": "raw",
        "controller": "sata", "bus": 0, "unit": 1, "readonly": true, "cdrom": true});
    spec.disks
        .push(serde_json::from_value(cd).expect("cd parses"));
    spec.fw_cfg.insert(
        "opt/hvx/config".into(),
        "ip.ens160=10.1.0.5/24\nip.ens192=10.2.0.6/24\n".into(),
    );

    let vm = Vm::start(&spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start");
    let mut log = SerialLog::new(&vm.paths().serial_log);
    let mut disks = Vec::new();
    for _ in 0..2 {
        disks.push(
            log.wait_for("HVX-GUEST disk ", BOOT)
                .await
                .expect("disk line"),
        );
    }
    let mut nics = Vec::new();
    for _ in 0..2 {
        nics.push(
            log.wait_for("HVX-GUEST nic ", BOOT)
                .await
                .expect("nic line"),
        );
    }
    let mut ips = Vec::new();
    for _ in 0..2 {
        ips.push(log.wait_for("HVX-GUEST ip ", BOOT).await.expect("ip line"));
    }
    log.wait_for("HVX-GUEST ready", BOOT).await.expect("ready");
    vm.stop_and_cleanup().await.expect("stop");

    let cd = disks
        .iter()
        .find(|l| l.contains("name=sr0"))
        .unwrap_or_else(|| panic!("no CD-ROM among {disks:?}"));
    assert!(
        cd.contains("driver=ahci") && cd.contains("sectors=256"),
        "{cd}"
    );
    let boot = disks
        .iter()
        .find(|l| l.contains("driver=vmw_pvscsi"))
        .unwrap_or_else(|| panic!("no pvscsi disk among {disks:?}"));
    assert!(
        !boot.contains("pci=0000:00:"),
        "not behind its root port: {boot}"
    );
    let nic_of = |mac: &str| {
        nics.iter()
            .find(|l| l.contains(&format!("mac={mac}")))
            .unwrap_or_else(|| panic!("no nic line for {mac}: {nics:?}"))
            .clone()
    };
    let first = nic_of("00:50:56:12:34:56");
    let second = nic_of("00:50:56:12:34:57");
    assert!(first.contains("slotname=ens160"), "{first}");
    assert!(second.contains("slotname=ens192"), "{second}");
    ips.sort();
    assert_eq!(
        ips.iter().map(|l| l.trim()).collect::<Vec<_>>(),
        [
            "HVX-GUEST ip name=ens160 addr=10.1.0.5/24 source=static",
            "HVX-GUEST ip name=ens192 addr=10.2.0.6/24 source=static",
        ]
    );
}
