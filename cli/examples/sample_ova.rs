//! Writes the sample VMware application as an OVA, the way vSphere exports one: a
//! VirtualSystemCollection `sample-shop` with two VMs (web, db) on "VM Network",
//! each with its own streamOptimized VMDK (the hvx test guest) on a pvscsi
//! controller and a vmxnet3 NIC with a VMware MAC, plus the `.mf` checksums.
//!
//! `cargo run -p kubectl-hvx --example sample_ova -- <disk-stream.vmdk> <out.ova>`

use hvx_storage::ova::{OvfApp, OvfDisk, OvfNic, OvfVm, render_ovf, write_ova};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(vmdk), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: sample_ova <disk-stream.vmdk> <out.ova>".into());
    };
    let vmdk = PathBuf::from(vmdk);
    let size = std::fs::metadata(&vmdk)?.len();
    // The guest disk's capacity (its VMDK header says 127 MiB).
    let capacity = 260_096 * 512;
    let vm = |name: &str, mac: &str| OvfVm {
        name: name.into(),
        cpus: 1,
        memory_mib: 256,
        disks: vec![OvfDisk {
            file_name: format!("{name}-disk1.vmdk"),
            file_size: size,
            capacity_bytes: capacity,
            controller: "VirtualSCSI".into(),
        }],
        nics: vec![OvfNic {
            network: "VM Network".into(),
            model: "VmxNet3".into(),
            mac: mac.into(),
        }],
    };
    let app = OvfApp {
        name: "sample-shop".into(),
        networks: vec!["VM Network".into()],
        vms: vec![
            vm("db", "00:50:56:a2:00:02"),
            vm("web", "00:50:56:a2:00:01"),
        ],
    };
    let ovf = render_ovf(&app);
    write_ova(
        &PathBuf::from(&out),
        "sample-shop",
        &ovf,
        &[
            ("db-disk1.vmdk".into(), vmdk.clone()),
            ("web-disk1.vmdk".into(), vmdk),
        ],
    )?;
    println!("{out}");
    Ok(())
}
