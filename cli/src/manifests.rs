//! The neutral model mapped to hvx.dev/v1alpha1 objects. Pure: no I/O, no cluster.

use crate::error::{CliError, Result};
use crate::names::{dns_label, unique};
use crate::vm_spec::virtual_machine;
use hvx_api::{
    BlankSource, Dhcp, DiskFormat, DiskSource, DnsConfig, HttpSource, OvaSource, OverlayDisk,
    OverlayDiskSpec, Subnet, UploadSource, VirtualNetwork, VirtualNetworkSpec, VmApplication,
    VmApplicationSpec,
};
use hvx_import::{ImageFormat, ImportedDisk, Loaded, NetworkConfig, SourceKind};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// Label every generated object carries, naming the application it was imported for.
pub const APP_LABEL: &str = "hvx.dev/application";

/// How the generated OverlayDisks get their bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSourceMode {
    /// `upload`: bytes come from `kubectl hvx import --upload`.
    Upload,
    /// The export is served at this URL: `ova` sources (member of the OVA at the URL)
    /// for an OVA, `http` sources (URL + `/` + file name) otherwise.
    Url(String),
}

/// Choices the user makes on the command line.
#[derive(Clone, Debug)]
pub struct MapOptions {
    /// Namespace of every object (omitted from metadata when `None`).
    pub namespace: Option<String>,
    /// Application name override.
    pub name: Option<String>,
    /// Disk sources.
    pub disk_source: DiskSourceMode,
    /// Subnet per VMware network name (or its Kubernetes name).
    pub subnets: BTreeMap<String, String>,
}

/// Everything `import` writes.
#[derive(Clone, Debug)]
pub struct Manifests {
    /// One per VMware network.
    pub networks: Vec<VirtualNetwork>,
    /// One per disk file.
    pub disks: Vec<OverlayDisk>,
    /// The application.
    pub app: VmApplication,
    /// Parser warnings plus the mapping's own lossy decisions.
    pub warnings: Vec<String>,
    /// OverlayDisk name to the disk file it is an image of.
    pub disk_files: BTreeMap<String, String>,
}

/// Maps a loaded export to hvx objects, then validates the application the way the
/// API server and the operator will.
pub fn build(loaded: &Loaded, options: &MapOptions) -> Result<Manifests> {
    let app = &loaded.app;
    let mut warnings = app.warnings.clone();
    let app_name = match &options.name {
        Some(n) => {
            let label = dns_label(n, 50, "app");
            if &label != n {
                return Err(CliError::Usage(format!(
                    "--name {n:?} is not a DNS label (try {label:?})"
                )));
            }
            label
        }
        None => dns_label(&app.name, 50, "app"),
    };
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: options.namespace.clone(),
        labels: Some(BTreeMap::from([(APP_LABEL.to_owned(), app_name.clone())])),
        ..ObjectMeta::default()
    };

    // Networks: VMware name -> VirtualNetwork name. The subnet comes from --subnet,
    // else from the export (vCloud's IP scope), else a placeholder with a warning.
    let mut net_names: BTreeMap<String, String> = BTreeMap::new();
    let mut networks = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for (i, vmware) in app.networks.iter().enumerate() {
        let taken: Vec<String> = net_names.values().cloned().collect();
        let name = unique(dns_label(vmware, 63, "network"), &taken);
        let config = app.network_configs.iter().find(|c| &c.name == vmware);
        let flag = options
            .subnets
            .get(vmware)
            .or_else(|| options.subnets.get(&name));
        let spec = match (flag, config) {
            (Some(c), _) => network_spec(c),
            (None, Some(config)) if config.cidr.is_some() => {
                network_from_export(vmware, config, &mut warnings)
            }
            (None, _) => {
                let c = format!("192.168.{}.0/24", 100 + i.min(155));
                warnings.push(format!(
                    "network {vmware:?}: its subnet is not in the export; VirtualNetwork {name} serves DHCP on {c} (set the real one with --subnet {vmware:?}=CIDR)"
                ));
                network_spec(&c)
            }
        };
        match spec {
            Ok(spec) => networks.push(VirtualNetwork::new(&name, spec)),
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        }
        if let Some(n) = networks.last_mut() {
            n.metadata = meta(&name);
        }
        net_names.insert(vmware.clone(), name);
    }

    // Disks: one OverlayDisk per file.
    let mut disk_names: BTreeMap<String, String> = BTreeMap::new();
    let mut disks = Vec::new();
    let mut disk_files = BTreeMap::new();
    for file in &app.disk_files {
        let stem = file
            .name
            .rsplit_once('.')
            .map_or(file.name.as_str(), |(s, _)| s);
        let taken: Vec<String> = disk_names.values().cloned().collect();
        // Disk files usually start with the VM or application name already.
        let stem_label = dns_label(stem, 63, "disk");
        let prefixed = if stem_label == app_name || stem_label.starts_with(&format!("{app_name}-"))
        {
            stem_label
        } else {
            dns_label(&format!("{app_name}-{stem}"), 63, "disk")
        };
        let name = unique(prefixed, &taken);
        let capacity = app
            .vms
            .iter()
            .flat_map(|vm| vm.disks.iter())
            .find(|d| d.file == file.name)
            .and_then(|d| d.capacity_bytes);
        let source = disk_source(
            loaded.kind,
            &options.disk_source,
            &file.name,
            file.size_bytes,
        );
        let mut disk = OverlayDisk::new(
            &name,
            OverlayDiskSpec {
                source,
                format: match file.format {
                    ImageFormat::Vmdk => DiskFormat::Vmdk,
                    ImageFormat::Raw => DiskFormat::Raw,
                    ImageFormat::Detect => DiskFormat::Auto,
                },
                capacity: capacity.map(quantity),
                checksum: loaded.sha256_of(&file.name),
                snapshots: None,
            },
        );
        disk.metadata = meta(&name);
        disks.push(disk);
        disk_names.insert(file.name.clone(), name.clone());
        disk_files.insert(name, file.name.clone());
    }

    // Blank disks: one empty OverlayDisk of the declared capacity per OVF Disk; each
    // VM using it gets its own empty overlay on the cluster.
    for d in app
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter())
        .filter(|d| d.blank)
    {
        let key = disk_key(d);
        if disk_names.contains_key(&key) {
            continue;
        }
        let id = d
            .file
            .strip_prefix(hvx_import::BLANK_PREFIX)
            .unwrap_or(&d.file);
        let taken: Vec<String> = disk_names.values().cloned().collect();
        let name = unique(dns_label(&format!("{app_name}-{id}"), 63, "disk"), &taken);
        let Some(capacity) = d.capacity_bytes.filter(|c| *c > 0) else {
            problems.push(format!("blank disk {id}: no capacity"));
            continue;
        };
        let mut disk = OverlayDisk::new(
            &name,
            OverlayDiskSpec {
                source: DiskSource {
                    blank: Some(BlankSource {}),
                    ..DiskSource::default()
                },
                format: DiskFormat::Auto,
                capacity: Some(quantity(capacity)),
                checksum: None,
                snapshots: None,
            },
        );
        disk.metadata = meta(&name);
        disks.push(disk);
        disk_names.insert(key, name);
    }

    // VMs.
    let mut vm_names: Vec<String> = Vec::new();
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    for vm in &app.vms {
        let name = unique(dns_label(&vm.name, 50, "vm"), &vm_names);
        if name != vm.name {
            warnings.push(format!(
                "VM {:?} is named {name} (Kubernetes names are DNS labels)",
                vm.name
            ));
        }
        renamed.insert(vm.name.clone(), name.clone());
        vm_names.push(name);
    }
    let mut vms = Vec::new();
    for (vm, name) in app.vms.iter().zip(&vm_names) {
        // Every VM's problems are collected: the user fixes them all in one go.
        match virtual_machine(vm, name, &net_names, &disk_names, &renamed, &mut warnings) {
            Ok(v) => vms.push(v),
            Err(CliError::Invalid(p)) => problems.extend(p),
            Err(e) => problems.push(e.to_string()),
        }
    }
    let spec = VmApplicationSpec { vms };
    if problems.is_empty() {
        problems.extend(
            hvx_api::validate::application(&spec)
                .iter()
                .map(ToString::to_string),
        );
    }
    if !problems.is_empty() {
        return Err(CliError::Invalid(problems));
    }
    let mut application = VmApplication::new(&app_name, spec);
    application.metadata = meta(&app_name);
    application.metadata.annotations = Some(annotations(loaded));
    Ok(Manifests {
        networks,
        disks,
        app: application,
        warnings,
        disk_files,
    })
}

/// Annotation naming the export the application was imported from.
pub const SOURCE_ANNOTATION: &str = "import.hvx.dev/source";

fn annotations(loaded: &Loaded) -> BTreeMap<String, String> {
    // VMware's PCI slot numbers are in the spec (`pciSlotNumber`), not annotations.
    BTreeMap::from([(
        SOURCE_ANNOTATION.to_owned(),
        format!("{:?} {}", loaded.kind, loaded.app.name),
    )])
}

/// The key of a VM disk in the disk-name map: its file, or for a blank disk its id
/// behind a NUL (never in a file name, which the importer checked is plain).
pub(crate) fn disk_key(d: &ImportedDisk) -> String {
    if d.blank {
        format!("\0{}", d.file)
    } else {
        d.file.clone()
    }
}

/// A VirtualNetwork as vCloud Director had the network: its subnet and gateway, its
/// DHCP pool (when vCloud served DHCP), its DNS suffix and servers. Static addresses
/// are on the NICs (`ipAddress`), which reserves them in the network's DHCP.
fn network_from_export(
    vmware: &str,
    config: &NetworkConfig,
    warnings: &mut Vec<String>,
) -> Result<VirtualNetworkSpec> {
    let cidr = config.cidr.as_deref().unwrap_or_default();
    let mut spec = network_spec(cidr)?;
    let Some(subnet) = spec.subnets.first_mut() else {
        return Ok(spec);
    };
    if config.gateway.is_some() {
        subnet.gateway.clone_from(&config.gateway);
    }
    subnet.dhcp = Some(match &config.dhcp_range {
        Some((start, end)) => Dhcp {
            enabled: true,
            range_start: Some(start.clone()),
            range_end: Some(end.clone()),
            lease_seconds: config
                .dhcp_lease_seconds
                .unwrap_or(3600)
                .clamp(120, 604_800),
            reservations: None,
        },
        // vCloud served no DHCP: the guests have static addresses, and a DHCP pool
        // over the subnet could hand theirs out to someone else.
        None => Dhcp {
            enabled: false,
            range_start: None,
            range_end: None,
            lease_seconds: 3600,
            reservations: None,
        },
    });
    if config.dhcp_range.is_none() {
        warnings.push(format!(
            "network {vmware:?}: vCloud served no DHCP on it, so neither does the VirtualNetwork (its guests keep their static addresses; vCloud static pools: {})",
            if config.static_ranges.is_empty() {
                "none".to_string()
            } else {
                config
                    .static_ranges
                    .iter()
                    .map(|(a, b)| format!("{a}-{b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    let domain = config
        .dns_suffix
        .as_deref()
        .map(str::to_ascii_lowercase)
        .filter(|d| {
            d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
        });
    let upstreams: Vec<String> = config
        .dns_servers
        .iter()
        .filter(|s| Some(*s) != config.gateway.as_ref())
        .take(4)
        .cloned()
        .collect();
    if domain.is_some() || !upstreams.is_empty() {
        spec.dns = Some(DnsConfig {
            domain,
            records: None,
            upstreams: (!upstreams.is_empty()).then_some(upstreams),
        });
    }
    Ok(spec)
}

fn network_spec(cidr: &str) -> Result<VirtualNetworkSpec> {
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| CliError::Usage(format!("subnet {cidr:?} is not a CIDR")))?;
    let ip: std::net::Ipv4Addr = addr
        .parse()
        .map_err(|_| CliError::Usage(format!("subnet {cidr:?} is not an IPv4 CIDR")))?;
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| CliError::Usage(format!("subnet {cidr:?}: prefix must be /8 to /30")))?;
    let mask = u32::MAX << (32 - prefix);
    let network = u32::from(ip) & mask;
    if network != u32::from(ip) {
        return Err(CliError::Usage(format!(
            "subnet {cidr:?} has host bits set (did you mean {}/{prefix}?)",
            std::net::Ipv4Addr::from(network)
        )));
    }
    Ok(VirtualNetworkSpec {
        subnets: vec![Subnet {
            name: "default".into(),
            cidr: cidr.to_owned(),
            gateway: Some(std::net::Ipv4Addr::from(network + 1).to_string()),
            dhcp: Some(Dhcp {
                enabled: true,
                range_start: None,
                range_end: None,
                lease_seconds: 3600,
                reservations: None,
            }),
        }],
        vlan: None,
        mtu: None,
        dns: None,
        firewall: None,
        external: None,
        broadcast_limit_pps: None,
    })
}

fn disk_source(
    kind: SourceKind,
    mode: &DiskSourceMode,
    file: &str,
    size: Option<u64>,
) -> DiskSource {
    match (mode, kind) {
        (DiskSourceMode::Upload, _) => DiskSource {
            upload: Some(UploadSource { size_bytes: size }),
            ..DiskSource::default()
        },
        (DiskSourceMode::Url(url), SourceKind::Ova) => DiskSource {
            ova: Some(OvaSource {
                url: Some(url.clone()),
                member: file.to_owned(),
            }),
            ..DiskSource::default()
        },
        (DiskSourceMode::Url(base), _) => DiskSource {
            http: Some(HttpSource {
                url: format!("{}/{file}", base.trim_end_matches('/')),
                ca_secret: None,
            }),
            ..DiskSource::default()
        },
    }
}

/// Bytes as a Kubernetes quantity, in the largest binary unit that divides them.
pub fn quantity(bytes: u64) -> Quantity {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return Quantity(format!("{}{unit}", bytes >> shift));
        }
    }
    Quantity(bytes.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_use_the_largest_exact_unit() {
        assert_eq!(quantity(16 << 30).0, "16Gi");
        assert_eq!(quantity(512 << 20).0, "512Mi");
        assert_eq!(quantity(1000).0, "1000");
        assert_eq!(quantity(0).0, "0");
    }

    #[test]
    fn network_specs_check_the_cidr() {
        let spec = network_spec("10.1.2.0/24").expect("valid");
        assert_eq!(spec.subnets[0].gateway.as_deref(), Some("10.1.2.1"));
        assert!(spec.subnets[0].dhcp.as_ref().is_some_and(|d| d.enabled));
        for bad in [
            "10.1.2.5/24",
            "10.1.2.0",
            "10.1.2.0/31",
            "x/24",
            "10.0.0.0/4",
        ] {
            assert!(network_spec(bad).is_err(), "{bad}");
        }
    }
}
