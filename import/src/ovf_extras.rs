//! What an OVF VirtualSystem holds beyond CPUs, memory, disks and NICs: devices hvx
//! does not emulate and VMware settings the guest sees. None of it is carried; all of
//! it is named in a warning, so nothing is dropped without a word.

use crate::model::{Firmware, ImportedVm};
use crate::ovf::{Envelope, attr, child, child_text};
use crate::ovf_storage::iso_of;
use crate::ovf_vm::{Item, config_value, rt};
use roxmltree::Node;

/// Devices hvx does not emulate, and the first serial port, which becomes the VM's
/// console. A drive holding an image of the export names it, so the image is not lost
/// without a word (CD/DVD drives with an ISO image are imported as CD-ROMs).
pub(crate) fn other_devices(
    items: &[Item],
    vm: &mut ImportedVm,
    envelope: &Envelope,
    warnings: &mut Vec<String>,
    used_files: &mut Vec<String>,
) {
    let name = vm.name.clone();
    let vm_name = name.as_str();
    for item in items {
        let subtype = item
            .text("ResourceSubType")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let what = match item.resource_type {
            rt::FLOPPY => "floppy drive",
            rt::CD | rt::DVD if iso_of(item, envelope).is_some() => continue,
            rt::CD | rt::DVD => "CD/DVD drive",
            rt::SERIAL if vm.console_serial_port.is_none() => {
                serial_console(item, vm, warnings);
                continue;
            }
            rt::SERIAL => "serial port (hvx gives a VM one, its console)",
            rt::PARALLEL => "parallel port",
            rt::USB => "USB controller",
            rt::SOUND => "sound card",
            rt::OTHER if subtype.contains("soundcard") => "sound card",
            // VMCI, video and the rest are either recreated by the VMM or invisible to
            // the guest's configuration; NVRAM is reported by `vmware_extras`.
            _ => continue,
        };
        let file = item
            .text("HostResource")
            .and_then(|h| h.strip_prefix("ovf:").unwrap_or(h).strip_prefix("/file/"))
            .and_then(|id| envelope.files.get(id));
        match file {
            Some(f) => {
                used_files.push(f.name.clone());
                warnings.push(format!(
                    "{vm_name}: {} ({what}) with image {:?} shipped in the export has no equivalent; neither is imported",
                    item.name, f.name
                ));
            }
            None => warnings.push(format!(
                "{vm_name}: {} ({what}) has no equivalent; not imported",
                item.name
            )),
        }
    }
}

/// The first serial port is the guest's COM1 (ttyS0) here too: hvx connects it to the
/// VM's console socket and serial log. Where VMware sent it (a file, a named pipe, a
/// network URI, a host device) is not kept, and the warning says so.
fn serial_console(item: &Item, vm: &mut ImportedVm, warnings: &mut Vec<String>) {
    vm.console_serial_port = Some(item.name.clone());
    let backing = item
        .config("backing.fileName")
        .or_else(|| item.config("backing.serviceURI"))
        .or_else(|| item.config("backing.pipeName"))
        .or_else(|| item.config("backing.deviceName"))
        .or_else(|| item.text("HostResource"))
        .or_else(|| item.text("Connection"));
    let was = backing.map_or(String::new(), |b| format!(" (VMware sent it to {b:?})"));
    warnings.push(format!(
        "{}: {} is the VM's console: COM1 (ttyS0) goes to the hvx console and serial log{was}",
        vm.name, item.name
    ));
}

/// VMware settings outside the device list that change what the guest sees.
pub(crate) fn vmware_extras(
    system: Node,
    hw: Node,
    items: &[Item],
    envelope: &Envelope,
    (vm, firmware): (&str, Firmware),
    warnings: &mut Vec<String>,
    used_files: &mut Vec<String>,
) {
    let on = |k: &str| config_value(hw, k).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if on("nestedHVEnabled") || on("vhv.enable") {
        warnings.push(format!(
            "{vm}: nested hardware virtualisation (nestedHVEnabled) is not exposed; hypervisors inside the guest will not start"
        ));
    }
    // EFI variables: an NVRAM item (vSphere 7+), or the nvram ExtraConfig key.
    let nvram_item = items.iter().find(|i| {
        i.text("ResourceSubType")
            .is_some_and(|s| s.eq_ignore_ascii_case("vmware.nvram"))
    });
    let nvram_file = nvram_item
        .and_then(|i| i.text("HostResource"))
        .and_then(|h| h.strip_prefix("ovf:").unwrap_or(h).strip_prefix("/file/"))
        .and_then(|id| envelope.files.get(id))
        .map(|f| f.name.clone());
    // A BIOS VM's nvram key names a file the export does not carry: nothing is lost.
    let efi_nvram = (firmware == Firmware::Efi)
        .then(|| config_value(hw, "nvram"))
        .flatten();
    if nvram_item.is_some() || nvram_file.is_some() || efi_nvram.is_some() {
        let name = nvram_file
            .clone()
            .or(efi_nvram.map(str::to_owned))
            .unwrap_or_else(|| "NVRAM".into());
        if let Some(f) = nvram_file {
            used_files.push(f);
        }
        warnings.push(format!(
            "{vm}: the EFI NVRAM {name:?} (boot entries, secure boot keys) is not imported; OVMF starts with default variables and boots the disk's default loader"
        ));
    }
    guest_visible_extra_config(hw, vm, warnings);
    let properties = system
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "Property")
        .count();
    if properties > 0 {
        warnings.push(format!(
            "{vm}: {properties} vApp properties (ProductSection) are not delivered to the guest (no OVF environment); set what the guest needs by hand"
        ));
    }
    if let Some(gc) = child(system, "GuestCustomizationSection")
        && child_text(gc, "Enabled").is_some_and(|e| e == "true")
    {
        warnings.push(format!(
            "{vm}: vCloud guest customization is not run; the guest keeps the name and settings it has on its disk"
        ));
    }
}

/// ExtraConfig keys the guest reads or sees the effect of (guestinfo data, disk
/// UUIDs, SMBIOS and CPUID overrides) that the import does not carry; display, tools
/// and monitor tuning keys are left out of the warning on purpose.
fn guest_visible_extra_config(hw: Node, vm: &str, warnings: &mut Vec<String>) {
    const GUEST_VISIBLE: [&str; 8] = [
        "guestinfo.",
        "disk.enableuuid",
        "smbios.",
        "hypervisor.cpuid.",
        "cpuid.",
        "acpi.",
        "board-id",
        "machine.id",
    ];
    // Read by the importer itself.
    const HANDLED: [&str; 1] = ["cpuid.corespersocket"];
    let mut keys: Vec<&str> = hw
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "ExtraConfig")
        .filter_map(|c| attr(c, "key"))
        .filter(|k| {
            let k = k.to_ascii_lowercase();
            GUEST_VISIBLE.iter().any(|p| k.starts_with(p)) && !HANDLED.contains(&k.as_str())
        })
        .collect();
    keys.dedup();
    if keys.is_empty() {
        return;
    }
    let shown: Vec<&str> = keys.iter().copied().take(8).collect();
    let more = keys.len().saturating_sub(shown.len());
    warnings.push(format!(
        "{vm}: ExtraConfig {}{} not carried (guestinfo values, disk UUIDs, SMBIOS/CPUID overrides the guest may rely on)",
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more are")
        } else if keys.len() == 1 {
            " is".to_string()
        } else {
            " are".to_string()
        }
    ));
}
