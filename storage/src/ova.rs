//! OVF envelope generation and OVA packing (ovf first, then the SHA256 manifest, then
//! the disks), for exporting an application back to vSphere.
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, StorageError, io_err};
use crate::names::hex;
use crate::tar;

/// An application to describe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvfApp {
    pub name: String,
    pub networks: Vec<String>,
    pub vms: Vec<OvfVm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvfVm {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<OvfDisk>,
    pub nics: Vec<OvfNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvfDisk {
    /// Member name of the streamOptimized VMDK in the OVA.
    pub file_name: String,
    /// Size of that file in bytes.
    pub file_size: u64,
    pub capacity_bytes: u64,
    /// VMware controller subtype: "VirtualSCSI" (pvscsi), "lsilogic", "lsilogicsas".
    pub controller: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OvfNic {
    pub network: String,
    /// "VmxNet3", "E1000", "E1000e".
    pub model: String,
    pub mac: String,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the OVF envelope (OVF 1.0 schema as vSphere exports it).
pub fn render_ovf(app: &OvfApp) -> String {
    let mut x = String::new();
    let w = &mut x;
    let _ = writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        w,
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#
    );
    let disks: Vec<(usize, usize, &OvfDisk)> = app
        .vms
        .iter()
        .enumerate()
        .flat_map(|(v, vm)| {
            vm.disks
                .iter()
                .enumerate()
                .map(move |(d, disk)| (v, d, disk))
        })
        .collect();
    let _ = writeln!(w, "  <References>");
    for (v, d, disk) in &disks {
        let _ = writeln!(
            w,
            r#"    <File ovf:id="file-{v}-{d}" ovf:href="{}" ovf:size="{}"/>"#,
            esc(&disk.file_name),
            disk.file_size
        );
    }
    let _ = writeln!(w, "  </References>");
    let _ = writeln!(
        w,
        "  <DiskSection>\n    <Info>Virtual disk information</Info>"
    );
    for (v, d, disk) in &disks {
        let _ = writeln!(
            w,
            r#"    <Disk ovf:diskId="vmdisk-{v}-{d}" ovf:fileRef="file-{v}-{d}" ovf:capacity="{}" ovf:capacityAllocationUnits="byte" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>"#,
            disk.capacity_bytes
        );
    }
    let _ = writeln!(w, "  </DiskSection>");
    let _ = writeln!(w, "  <NetworkSection>\n    <Info>Logical networks</Info>");
    for n in &app.networks {
        let _ = writeln!(
            w,
            r#"    <Network ovf:name="{}"><Description>{}</Description></Network>"#,
            esc(n),
            esc(n)
        );
    }
    let _ = writeln!(w, "  </NetworkSection>");
    let _ = writeln!(
        w,
        r#"  <VirtualSystemCollection ovf:id="{}">"#,
        esc(&app.name)
    );
    let _ = writeln!(
        w,
        "    <Info>A collection of virtual machines</Info>\n    <Name>{}</Name>",
        esc(&app.name)
    );
    for (v, vm) in app.vms.iter().enumerate() {
        render_vm(w, v, vm);
    }
    let _ = writeln!(w, "  </VirtualSystemCollection>\n</Envelope>");
    x
}

fn item(w: &mut String, id: u32, rt: u32, name: &str, extra: &str) {
    let _ = writeln!(
        w,
        "        <Item><rasd:ElementName>{}</rasd:ElementName><rasd:InstanceID>{id}</rasd:InstanceID><rasd:ResourceType>{rt}</rasd:ResourceType>{extra}</Item>",
        esc(name)
    );
}

fn render_vm(w: &mut String, v: usize, vm: &OvfVm) {
    let _ = writeln!(w, r#"    <VirtualSystem ovf:id="{}">"#, esc(&vm.name));
    let _ = writeln!(
        w,
        "      <Info>A virtual machine</Info>\n      <Name>{}</Name>",
        esc(&vm.name)
    );
    let _ = writeln!(
        w,
        r#"      <OperatingSystemSection ovf:id="101" vmw:osType="otherLinux64Guest"><Info>Guest OS</Info></OperatingSystemSection>"#
    );
    let _ = writeln!(
        w,
        "      <VirtualHardwareSection>\n        <Info>Virtual hardware requirements</Info>"
    );
    let _ = writeln!(
        w,
        "        <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemIdentifier>{}</vssd:VirtualSystemIdentifier><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>",
        esc(&vm.name)
    );
    item(
        w,
        1,
        3,
        &format!("{} virtual CPU(s)", vm.cpus),
        &format!(
            "<rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:VirtualQuantity>{}</rasd:VirtualQuantity>",
            vm.cpus
        ),
    );
    item(
        w,
        2,
        4,
        &format!("{}MB of memory", vm.memory_mib),
        &format!(
            "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:VirtualQuantity>{}</rasd:VirtualQuantity>",
            vm.memory_mib
        ),
    );
    let mut id = 3u32;
    let controller = vm
        .disks
        .first()
        .map_or("VirtualSCSI", |d| d.controller.as_str());
    let ctrl_id = id;
    item(
        w,
        ctrl_id,
        6,
        "SCSI controller 0",
        &format!(
            "<rasd:Address>0</rasd:Address><rasd:ResourceSubType>{}</rasd:ResourceSubType>",
            esc(controller)
        ),
    );
    id += 1;
    for (d, _) in vm.disks.iter().enumerate() {
        item(
            w,
            id,
            17,
            &format!("Hard disk {}", d + 1),
            &format!(
                "<rasd:AddressOnParent>{d}</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk-{v}-{d}</rasd:HostResource><rasd:Parent>{ctrl_id}</rasd:Parent>"
            ),
        );
        id += 1;
    }
    for (n, nic) in vm.nics.iter().enumerate() {
        item(
            w,
            id,
            10,
            &format!("Network adapter {}", n + 1),
            &format!(
                "<rasd:Address>{}</rasd:Address><rasd:AddressOnParent>{}</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>{}</rasd:Connection><rasd:ResourceSubType>{}</rasd:ResourceSubType>",
                esc(&nic.mac),
                7 + n,
                esc(&nic.network),
                esc(&nic.model)
            ),
        );
        id += 1;
    }
    let _ = writeln!(w, "      </VirtualHardwareSection>\n    </VirtualSystem>");
}

/// The manifest: one `SHA256(name)= hex` line per file.
pub fn render_manifest(entries: &[(String, String)]) -> String {
    entries
        .iter()
        .map(|(name, digest)| format!("SHA256({name})= {digest}\n"))
        .collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Writes `out` as an OVA: `<base>.ovf`, `<base>.mf`, then `disks` (member name, file).
pub fn write_ova(
    out: &Path,
    base_name: &str,
    ovf: &str,
    disks: &[(String, PathBuf)],
) -> Result<()> {
    crate::format::check_plain_name(base_name)?;
    let ovf_name = format!("{base_name}.ovf");
    let mut manifest = vec![(ovf_name.clone(), hex(&Sha256::digest(ovf.as_bytes())))];
    for (name, path) in disks {
        crate::format::check_plain_name(name)?;
        manifest.push((name.clone(), sha256_file(path)?));
    }
    let mf = render_manifest(&manifest);
    let tmp = out.with_extension("ova.tmp");
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = std::io::BufWriter::new(file);
    let result = (|| {
        tar::append_file(
            &mut w,
            &ovf_name,
            &mut ovf.as_bytes(),
            ovf.len() as u64,
            out,
        )?;
        tar::append_file(
            &mut w,
            &format!("{base_name}.mf"),
            &mut mf.as_bytes(),
            mf.len() as u64,
            out,
        )?;
        for (name, path) in disks {
            let mut f = std::fs::File::open(path).map_err(io_err(path))?;
            let len = f.metadata().map_err(io_err(path))?.len();
            tar::append_file(&mut w, name, &mut f, len, out)?;
        }
        tar::finish(&mut w, out)?;
        let file = w.into_inner().map_err(|e| io_err(out)(e.into_error()))?;
        file.sync_all().map_err(io_err(out))
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, out).map_err(io_err(out)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Checks an OVA's manifest against its members (used by tests and by re-import).
pub fn verify_ova_manifest(ova: &Path) -> Result<Vec<String>> {
    let mut f = std::fs::File::open(ova).map_err(io_err(ova))?;
    let members = tar::index(&mut f, ova)?;
    let bad = |reason: String| StorageError::Ova {
        path: ova.to_path_buf(),
        reason,
    };
    let first = members.first().ok_or_else(|| bad("empty archive".into()))?;
    if !first.name.ends_with(".ovf") {
        return Err(bad(format!(
            "first member is {:?}, not the .ovf",
            first.name
        )));
    }
    let mf = members
        .iter()
        .find(|m| m.name.ends_with(".mf"))
        .ok_or_else(|| bad("no manifest".into()))?;
    let read = |m: &tar::Member| -> Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(ova).map_err(io_err(ova))?;
        f.seek(SeekFrom::Start(m.offset)).map_err(io_err(ova))?;
        let mut buf = Vec::new();
        f.take(m.size).read_to_end(&mut buf).map_err(io_err(ova))?;
        Ok(buf)
    };
    let text = String::from_utf8_lossy(&read(mf)?).into_owned();
    let mut checked = Vec::new();
    for line in text.lines() {
        let (lhs, digest) = line
            .split_once("= ")
            .ok_or_else(|| bad(format!("bad manifest line {line:?}")))?;
        let name = lhs
            .strip_prefix("SHA256(")
            .and_then(|n| n.strip_suffix(')'))
            .ok_or_else(|| bad(format!("bad manifest line {line:?}")))?;
        let m = members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| bad(format!("{name} missing")))?;
        let actual = hex(&Sha256::digest(read(m)?));
        if actual != digest.trim() {
            return Err(StorageError::Checksum {
                what: name.to_string(),
                expected: digest.trim().to_string(),
                actual,
            });
        }
        checked.push(name.to_string());
    }
    Ok(checked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn app() -> OvfApp {
        OvfApp {
            name: "shop & co".into(),
            networks: vec!["VM Network".into()],
            vms: vec![OvfVm {
                name: "web".into(),
                cpus: 2,
                memory_mib: 1024,
                disks: vec![OvfDisk {
                    file_name: "web-disk0.vmdk".into(),
                    file_size: 1000,
                    capacity_bytes: 1 << 30,
                    controller: "VirtualSCSI".into(),
                }],
                nics: vec![OvfNic {
                    network: "VM Network".into(),
                    model: "VmxNet3".into(),
                    mac: "00:50:56:01:02:03".into(),
                }],
            }],
        }
    }

    #[test]
    fn ovf_mentions_everything_escaped() {
        let x = render_ovf(&app());
        assert!(x.contains(r#"ovf:href="web-disk0.vmdk""#));
        assert!(x.contains("ovf:/disk/vmdisk-0-0"));
        assert!(x.contains("<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>"));
        assert!(x.contains("shop &amp; co"));
        assert!(x.contains(r#"ovf:capacity="1073741824""#));
    }

    #[test]
    fn ova_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.vmdk");
        std::fs::write(&disk, vec![5u8; 3000]).unwrap();
        let out = dir.path().join("app.ova");
        write_ova(
            &out,
            "app",
            &render_ovf(&app()),
            &[("web-disk0.vmdk".into(), disk)],
        )
        .unwrap();
        let checked = verify_ova_manifest(&out).unwrap();
        assert_eq!(checked, ["app.ovf", "web-disk0.vmdk"]);
    }
}
