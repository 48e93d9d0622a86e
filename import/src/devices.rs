//! VMware device names mapped to what hvx emulates, shared by the OVF and VMX parsers.
//! Anything without an equivalent gets the closest device and a warning saying so.

use crate::model::{ControllerKind, NicModel};

/// Maps a VMware NIC model name (VMX `virtualDev` or OVF `ResourceSubType`).
/// Returns the model and, when it was substituted, the warning to report.
pub fn nic_model(vmware: &str, who: &str) -> (NicModel, Option<String>) {
    match vmware.to_ascii_lowercase().as_str() {
        "vmxnet3" => (NicModel::Vmxnet3, None),
        "e1000" => (NicModel::E1000, None),
        "e1000e" => (NicModel::E1000e, None),
        // vlance/PCnet32 and the older vmxnet generations have no QEMU model that VMware
        // guests drive; e1000 has drivers in every guest that ran on ESX.
        other => (
            NicModel::E1000,
            Some(format!(
                "{who}: NIC model {other:?} has no equivalent; using e1000"
            )),
        ),
    }
}

/// The NIC model VMware picks when a VMX names none (`virtualDev` absent).
pub const VMX_DEFAULT_NIC: &str = "e1000";

/// Maps a VMware SCSI controller name (VMX `virtualDev`, OVF `ResourceSubType`).
pub fn scsi_kind(vmware: &str, who: &str) -> (ControllerKind, Option<String>) {
    match vmware.to_ascii_lowercase().as_str() {
        "pvscsi" | "virtualscsi" => (ControllerKind::Pvscsi, None),
        "lsilogic" => (ControllerKind::Lsilogic, None),
        "lsisas1068" | "lsilogicsas" => (ControllerKind::Lsisas, None),
        // BusLogic is emulated by no QEMU release; LSI Logic is what VMware itself tells
        // users to switch BusLogic guests to.
        other => (
            ControllerKind::Lsilogic,
            Some(format!(
                "{who}: SCSI controller {other:?} has no equivalent; using lsilogic"
            )),
        ),
    }
}

/// The SCSI controller VMware picks when a VMX names none.
pub const VMX_DEFAULT_SCSI: &str = "lsilogic";

/// Normalises a MAC to lower-case colon form; `None` when it is not a unicast MAC.
/// Accepts `:` or `-` separators as VMware and Windows tools write them.
pub fn normalize_mac(raw: &str) -> Option<String> {
    let parts: Vec<&str> = raw.trim().split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    let mac = parts.join(":").to_ascii_lowercase();
    let first = u8::from_str_radix(&mac[..2], 16).ok()?;
    (first & 1 == 0).then_some(mac)
}

/// A stable MAC in VMware's static range (`00:50:56:00:00:00`-`00:50:56:3f:ff:ff`) for
/// a NIC the export gave no MAC: the same input always gives the same address, so
/// importing twice does not change the guest's view.
pub fn generated_mac(seed: &str) -> String {
    // FNV-1a: no dependency, stable across releases and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in seed.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let v = h & 0x003f_ffff;
    format!(
        "00:50:56:{:02x}:{:02x}:{:02x}",
        (v >> 16) & 0xff,
        (v >> 8) & 0xff,
        v & 0xff
    )
}

/// Normalises a UUID written the VMware way (`56 4d 12 ... 9a-0b ...`, with spaces and a
/// dash in the middle) or the canonical way into lower-case `8-4-4-4-12`.
pub fn normalize_uuid(raw: &str) -> Option<String> {
    let hex: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '{' | '}'))
        .collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// Checks that a file name from a descriptor is a plain relative name: no directory
/// part, no `..`, not absolute, no control characters. Disk files of OVF and VMX live
/// beside the descriptor; anything else could point the importer at arbitrary files.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::limits::MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control)
        && !(name.len() >= 2 && name.as_bytes()[1] == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_models_map_and_warn() {
        assert_eq!(nic_model("VmxNet3", "n").0, NicModel::Vmxnet3);
        assert_eq!(nic_model("E1000e", "n"), (NicModel::E1000e, None));
        let (m, w) = nic_model("vlance", "ethernet1");
        assert_eq!(m, NicModel::E1000);
        assert_eq!(
            w.as_deref(),
            Some("ethernet1: NIC model \"vlance\" has no equivalent; using e1000")
        );
    }

    #[test]
    fn scsi_kinds_map_and_warn() {
        assert_eq!(scsi_kind("VirtualSCSI", "c").0, ControllerKind::Pvscsi);
        assert_eq!(scsi_kind("pvscsi", "c").0, ControllerKind::Pvscsi);
        assert_eq!(scsi_kind("lsilogicsas", "c").0, ControllerKind::Lsisas);
        assert_eq!(scsi_kind("lsisas1068", "c").0, ControllerKind::Lsisas);
        assert_eq!(scsi_kind("lsilogic", "c"), (ControllerKind::Lsilogic, None));
        let (k, w) = scsi_kind("buslogic", "scsi0");
        assert_eq!(k, ControllerKind::Lsilogic);
        assert!(w.is_some_and(|w| w.contains("buslogic")));
    }

    #[test]
    fn macs_are_normalised_and_multicast_refused() {
        assert_eq!(
            normalize_mac("00:50:56:AB:cd:0F").as_deref(),
            Some("00:50:56:ab:cd:0f")
        );
        assert_eq!(
            normalize_mac("00-0C-29-01-02-03").as_deref(),
            Some("00:0c:29:01:02:03")
        );
        assert_eq!(normalize_mac("01:00:5e:00:00:01"), None);
        assert_eq!(normalize_mac("00:50:56:ab:cd"), None);
        assert_eq!(normalize_mac("00:50:56:ab:cd:zz"), None);
    }

    #[test]
    fn generated_macs_are_stable_and_in_vmware_static_range() {
        let a = generated_mac("app/web/ethernet0");
        assert_eq!(a, generated_mac("app/web/ethernet0"));
        assert_ne!(a, generated_mac("app/web/ethernet1"));
        assert!(a.starts_with("00:50:56:"));
        let fourth = u8::from_str_radix(&a[9..11], 16).unwrap_or(0xff);
        assert!(fourth <= 0x3f, "{a}");
        assert!(normalize_mac(&a).is_some());
    }

    #[test]
    fn uuids_in_vmware_form_are_normalised() {
        assert_eq!(
            normalize_uuid("56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc").as_deref(),
            Some("564d1234-5678-9abc-def0-123456789abc")
        );
        assert_eq!(
            normalize_uuid("564D1234-5678-9ABC-DEF0-123456789ABC").as_deref(),
            Some("564d1234-5678-9abc-def0-123456789abc")
        );
        assert_eq!(normalize_uuid("not-a-uuid"), None);
    }

    #[test]
    fn only_plain_names_pass() {
        assert!(is_plain_name("disk-1.vmdk"));
        for bad in [
            "",
            ".",
            "..",
            "../x.vmdk",
            "/etc/passwd",
            "a/b.vmdk",
            "a\\b",
            "C:x",
            "a\nb",
        ] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }
}
