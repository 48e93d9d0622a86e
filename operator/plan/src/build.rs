//! Pure builders: from a VmApplication (and what it references) to the launcher pods
//! that should exist. No I/O here, so every rule is unit-tested.

use crate::context::OperatorConfig;
use hvx_api::launch::{LaunchDisk, LaunchNic, LaunchSpec, tap_name};
use hvx_api::node::{KVM_DEVICE_RESOURCE, VM_CSI_DRIVER, VM_CSI_TREE};
use hvx_api::{Accelerator, VirtualMachine, VmApplication};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use std::collections::BTreeMap;

pub use hvx_api::labels::{
    ANNOTATION_LAUNCH_SPEC, LABEL_APP, LABEL_MIGRATION_TARGET, LABEL_ROLE, LABEL_VM,
    NODE_LABEL_ACCELERATOR, NODE_LABEL_AGENT, NODE_LABEL_POST_COPY, ROLE_LAUNCHER,
};

/// How long the launcher's readiness exec may take.
pub const READINESS_TIMEOUT_SECONDS: i32 = 10;

/// What a VM's references resolved to.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// OverlayDisk name -> (uid, digest).
    pub disks: BTreeMap<String, (String, Option<String>)>,
    /// VirtualNetwork name -> (uid, vni).
    pub networks: BTreeMap<String, (String, u32)>,
}

/// Why a VM cannot be built yet (not an error: the status says it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// An OverlayDisk does not exist (or is not Ready yet).
    Disk(String),
    /// A VirtualNetwork does not exist or has no VNI yet.
    Network(String),
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Disk(d) => write!(f, "waiting for OverlayDisk {d}"),
            Waiting::Network(n) => write!(f, "waiting for VirtualNetwork {n} to get a VNI"),
        }
    }
}

/// Stable VM identity: `<app uid>/<vm>`.
pub fn vm_id(app: &VmApplication, vm: &VirtualMachine) -> String {
    format!(
        "{}/{}",
        app.metadata.uid.as_deref().unwrap_or("no-uid"),
        vm.name
    )
}

pub use hvx_api::launch::pod_name;

/// The launch spec for one VM, or what it waits for.
pub fn launch_spec(
    app: &VmApplication,
    vm: &VirtualMachine,
    resolved: &Resolved,
) -> Result<LaunchSpec, Waiting> {
    let id = vm_id(app, vm);
    let mut disks = Vec::new();
    for d in &vm.disks {
        let (uid, digest) = resolved
            .disks
            .get(&d.overlay_disk.name)
            .ok_or_else(|| Waiting::Disk(d.overlay_disk.name.clone()))?;
        disks.push(LaunchDisk {
            name: d.name.clone(),
            disk_uid: uid.clone(),
            digest: digest.clone(),
        });
    }
    let mut nics = Vec::new();
    for n in &vm.nics {
        let (uid, vni) = resolved
            .networks
            .get(&n.network.name)
            .ok_or_else(|| Waiting::Network(n.network.name.clone()))?;
        nics.push(LaunchNic {
            name: n.name.clone(),
            network_uid: uid.clone(),
            vni: *vni,
            tap: tap_name(&id, &n.name),
        });
    }
    Ok(LaunchSpec {
        namespace: app.metadata.namespace.clone().unwrap_or_default(),
        application: app.metadata.name.clone().unwrap_or_default(),
        vm_id: id,
        vm: vm.clone(),
        disks,
        nics,
        incoming: None,
    })
}

/// The PodDisruptionBudget of a VM's launcher pods (None for evictionStrategy
/// Shutdown): no eviction allowed, so a drain waits until the VM migrated away
/// (LiveMigrate) or a human acted (None).
pub fn disruption_budget(app: &VmApplication, vm: &VirtualMachine) -> Option<serde_json::Value> {
    if vm.eviction_strategy == hvx_api::EvictionStrategy::Shutdown {
        return None;
    }
    let app_name = app.metadata.name.clone().unwrap_or_default();
    Some(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": pod_name(&app_name, &vm.name),
            "namespace": app.metadata.namespace.clone().unwrap_or_default(),
            "labels": {LABEL_APP: app_name, LABEL_VM: vm.name},
            "ownerReferences": [{
                "apiVersion": "hvx.dev/v1alpha1",
                "kind": "VmApplication",
                "name": app_name,
                "uid": app.metadata.uid.clone().unwrap_or_default(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        // `minAvailable: 1`, not `maxUnavailable: 0`: the disruption controller computes
        // the expected pod count of a maxUnavailable budget from the pods' controller's
        // scale subresource, which a VmApplication has no use for (it logged
        // CalculateExpectedPodCountFailed on every pass). A migration's target pod is
        // left out so that, while it runs beside the source, it cannot make the
        // source's eviction allowed.
        "spec": {
            "minAvailable": 1,
            "selector": {
                "matchLabels": {LABEL_APP: app_name, LABEL_VM: vm.name},
                "matchExpressions": [{"key": LABEL_MIGRATION_TARGET, "operator": "DoesNotExist"}],
            },
        }
    }))
}

/// Memory the pod needs beyond guest RAM: QEMU and launcher (~160 MiB), the TCG
/// translation cache (64 MiB, `hvx_vmm::argv::TCG_TB_MIB`; counted always because the
/// accelerator is probed on the node), per-vCPU threads, and page tables (~1/128 of
/// guest RAM).
pub fn overhead_mib(vm: &VirtualMachine) -> u32 {
    160 + 64 + 16 * vm.cpu.vcpus() + vm.memory_mib.div_ceil(128)
}

/// The launcher pod for one VM.
/// `home` is the node holding the VM's disk overlays from an earlier run: the pod
/// must go back there (until a migration moves the disks), or the VM would boot from
/// a fresh overlay and lose what it wrote.
pub fn launcher_pod(
    app: &VmApplication,
    spec: &LaunchSpec,
    config: &OperatorConfig,
    home: Option<&str>,
) -> Result<Pod, serde_json::Error> {
    let vm = &spec.vm;
    let app_name = spec.application.as_str();
    let launch_json = serde_json::to_string(spec)?;
    let memory = format!("{}Mi", vm.memory_mib + overhead_mib(vm));
    let cpu = format!(
        "{}m",
        config
            .cpu_millis_per_vcpu
            .saturating_mul(vm.cpu.vcpus())
            .max(10)
    );

    let mut node_selector: BTreeMap<String, String> = BTreeMap::new();
    if config.require_agent_label {
        node_selector.insert(NODE_LABEL_AGENT.into(), "ready".into());
    }
    if vm.accelerator == Accelerator::Kvm {
        node_selector.insert(NODE_LABEL_ACCELERATOR.into(), "kvm".into());
    }
    let placement = vm.placement.clone().unwrap_or_default();
    node_selector.extend(placement.node_selector.clone().unwrap_or_default());

    let anti: Vec<String> = placement.anti_affinity.clone().unwrap_or_default();
    let mut affinity = serde_json::Map::new();
    if !anti.is_empty() {
        affinity.insert(
            "podAntiAffinity".into(),
            json!({"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchExpressions": [
                    {"key": LABEL_APP, "operator": "In", "values": [app_name]},
                    {"key": LABEL_VM, "operator": "In", "values": anti},
                ]},
                "topologyKey": "kubernetes.io/hostname",
            }]}),
        );
    }
    if let Some(node) = home {
        affinity.insert(
            "nodeAffinity".into(),
            json!({"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [node]},
                ]}],
            }}),
        );
    }
    let affinity = (!affinity.is_empty()).then_some(affinity);

    let owner = json!({
        "apiVersion": "hvx.dev/v1alpha1",
        "kind": "VmApplication",
        "name": app_name,
        "uid": app.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    });

    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(app_name, &vm.name),
            "namespace": spec.namespace,
            "labels": {LABEL_APP: app_name, LABEL_VM: vm.name, LABEL_ROLE: ROLE_LAUNCHER},
            "annotations": {ANNOTATION_LAUNCH_SPEC: launch_json},
            "ownerReferences": [owner],
        },
        "spec": {
            // No hostNetwork: the VM's NIC taps stay in the node's namespace on the
            // overlay bridge, and the node agent passes QEMU open fds of them.
            // No hostPID: QEMU lives in the pod's own PID namespace, which the kernel
            // empties when the launcher (its init) dies; the node agent finds QEMU by
            // its command line (`hvx_node_agent::agent::vms::live_qemu`).
            // The operator decides about restarts (runStrategy), not the kubelet.
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": i64::from(vm.shutdown_grace_seconds) + 30,
            "nodeSelector": node_selector,
            "tolerations": placement.tolerations.clone().unwrap_or_default(),
            "affinity": affinity,
            "containers": [{
                "name": "launcher",
                "image": config.launcher_image,
                "imagePullPolicy": config.image_pull_policy,
                "command": ["hvx-launcher", "run"],
                "env": [
                    {"name": "HVX_LAUNCH_SPEC", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{ANNOTATION_LAUNCH_SPEC}']")}}},
                    {"name": "HVX_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "HVX_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    // The launcher has its node agent check the spec's seal for this
                    // pod before it boots (`hvx_api::seal`). The owner's uid is a
                    // literal: a container's env cannot change after creation.
                    {"name": "HVX_LAUNCH_SEAL", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{}']", hvx_api::seal::Sealed::LaunchSpec.seal_key())}}},
                    {"name": "HVX_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "HVX_OWNER_UID", "value": app.metadata.uid.clone().unwrap_or_default()},
                    // A migration target's QEMU listens on its pod's address.
                    {"name": "HVX_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                // A refused spec's reason shows in the pod's status.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                // One devices.hvx.dev/kvm unit: /dev/kvm from the node agent's device
                // plugin where KVM works (extended resources need requests = limits).
                "resources": {
                    "requests": {"cpu": cpu, "memory": memory, KVM_DEVICE_RESOURCE: "1"},
                    "limits": {"memory": memory, KVM_DEVICE_RESOURCE: "1"},
                },
                // Pod Security `baseline` (and `restricted` but for running as uid 0,
                // which owns the files the agent made, and the seccomp profile, left
                // to QEMU's own `-sandbox on`: the runtime default blocks syscalls
                // post-copy needs). Devices come from the device plugin, taps as fds.
                "securityContext": {
                    "privileged": false,
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                },
                // The kubelet's 1 s default timed the exec out on busy nodes (it forks
                // a process in the container); three misses in a row before a running
                // VM counts as not ready, so one slow probe does not flip its PDB.
                "readinessProbe": {
                    "exec": {"command": ["hvx-launcher", "probe"]},
                    "periodSeconds": 2,
                    "timeoutSeconds": READINESS_TIMEOUT_SECONDS,
                    "failureThreshold": 3,
                },
                "volumeMounts": [
                    {"name": "store", "mountPath": "/var/lib/hvx"},
                    {"name": "run", "mountPath": "/run/hvx"},
                ],
            }],
            // Only this VM's directories, from its node's agent (the `vm.hvx.dev` CSI
            // driver checks that this is the pod hvx sealed for the VM), at the paths
            // they have on the node: qcow2 backing files name absolute store paths.
            "volumes": [
                {"name": "store", "csi": {"driver": VM_CSI_DRIVER, "volumeAttributes": {VM_CSI_TREE: "store"}}},
                {"name": "run", "csi": {"driver": VM_CSI_DRIVER, "volumeAttributes": {VM_CSI_TREE: "run"}}},
            ],
        }
    });
    serde_json::from_value(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> VmApplication {
        let mut app: VmApplication = serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
            "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1"},
            "spec": {"vms": [{
                "name": "web", "memoryMib": 1024, "cpu": {"sockets": 2, "coresPerSocket": 2},
                "accelerator": "Kvm",
                "disks": [{"name": "root", "overlayDisk": {"name": "web-root"}, "controller": "pvscsi", "unit": 0}],
                "nics": [{"name": "ethernet0", "network": {"name": "net"}, "macAddress": "00:50:56:a1:00:01"}],
                "placement": {"antiAffinity": ["db"], "nodeSelector": {"zone": "a"}}
            }]}
        }))
        .expect("app");
        app.metadata.uid = Some("u-1".into());
        app
    }

    fn resolved() -> Resolved {
        let mut r = Resolved::default();
        r.disks
            .insert("web-root".into(), ("d-1".into(), Some("sha256:ab".into())));
        r.networks.insert("net".into(), ("n-1".into(), 4097));
        r
    }

    #[test]
    fn launch_spec_carries_slot_numbers_and_cdroms_to_the_launcher() {
        let mut app = app();
        app.spec.vms[0].nics[0].pci_slot_number = Some(192);
        app.spec.vms[0].disks[0].cdrom = true;
        app.spec.vms[0].disks[0].read_only = true;
        let vm = &app.spec.vms[0];
        let ls = launch_spec(&app, vm, &resolved()).expect("resolved");
        // The launcher reads the JSON form: the fields must survive it.
        let json = serde_json::to_value(&ls).expect("serialises");
        assert_eq!(json["vm"]["nics"][0]["pciSlotNumber"], 192);
        assert_eq!(json["vm"]["disks"][0]["cdrom"], true);
        let back: LaunchSpec = serde_json::from_value(json).expect("parses");
        assert_eq!(back.vm.nics[0].pci_slot_number, Some(192));
        assert!(back.vm.disks[0].cdrom);
    }

    #[test]
    fn launch_spec_waits_for_missing_references() {
        let app = app();
        let vm = &app.spec.vms[0];
        let mut r = resolved();
        r.networks.clear();
        assert_eq!(
            launch_spec(&app, vm, &r),
            Err(Waiting::Network("net".into()))
        );
        r.disks.clear();
        assert_eq!(
            launch_spec(&app, vm, &r),
            Err(Waiting::Disk("web-root".into()))
        );
    }

    #[test]
    fn launcher_pod_reserves_resources_and_places_the_vm() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("resolved");
        assert_eq!(spec.vm_id, "u-1/web");
        assert_eq!(spec.nics[0].vni, 4097);
        assert_eq!(spec.nics[0].tap, tap_name("u-1/web", "ethernet0"));
        let cfg = OperatorConfig {
            cpu_millis_per_vcpu: 250,
            ..Default::default()
        };
        let pod = serde_json::to_value(launcher_pod(&app, &spec, &cfg, None).expect("pod"))
            .expect("json");
        assert!(pod["spec"]["affinity"]["nodeAffinity"].is_null());
        let back = serde_json::to_value(launcher_pod(&app, &spec, &cfg, Some("n2")).expect("pod"))
            .expect("json");
        assert_eq!(
            back["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchFields"][0]["values"],
            json!(["n2"]),
            "a restarted VM goes back to the node holding its overlays"
        );
        assert_eq!(pod["metadata"]["name"], "shop-web");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["resources"]["requests"]["cpu"], "1000m", "4 vCPUs x 250m");
        // 1024 guest + 160 + 64 + 16*4 + 1024/128
        assert_eq!(c["resources"]["requests"]["memory"], "1320Mi");
        assert_eq!(c["resources"]["requests"]["devices.hvx.dev/kvm"], "1");
        assert_eq!(c["resources"]["limits"]["devices.hvx.dev/kvm"], "1");
        assert_eq!(pod["spec"]["nodeSelector"]["hvx.dev/accelerator"], "kvm");
        assert_eq!(pod["spec"]["nodeSelector"]["hvx.dev/agent"], "ready");
        assert_eq!(pod["spec"]["nodeSelector"]["zone"], "a");
        let expr = &pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0]["labelSelector"]["matchExpressions"];
        assert_eq!(expr[1]["values"], json!(["db"]));
        let launch: LaunchSpec = serde_json::from_str(
            pod["metadata"]["annotations"][ANNOTATION_LAUNCH_SPEC]
                .as_str()
                .expect("annotation"),
        )
        .expect("launch spec round-trips");
        assert_eq!(launch, spec);
    }

    #[test]
    fn launcher_pods_use_their_own_network_namespace() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("resolved");
        let pod = serde_json::to_value(
            launcher_pod(&app, &spec, &OperatorConfig::default(), None).expect("pod"),
        )
        .expect("json");
        assert!(pod["spec"]["hostNetwork"].is_null(), "{}", pod["spec"]);
        assert!(pod["spec"]["dnsPolicy"].is_null());
        let env = pod["spec"]["containers"][0]["env"].as_array().expect("env");
        assert!(
            env.iter().any(|e| e["name"] == "HVX_POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
            "a migration target listens on its pod IP"
        );
    }

    #[test]
    fn long_pod_names_are_shortened_stably() {
        let long = "a".repeat(60);
        let n = pod_name(&long, "database");
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, pod_name(&long, "database"));
        assert_ne!(n, pod_name(&long, "databasf"));
        assert_eq!(pod_name("shop", "db"), "shop-db");
    }

    /// Whether an equality-based selector (`k=v`, `!k`, comma-separated) matches labels.
    fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
        selector
            .split(',')
            .all(|term| match term.strip_prefix('!') {
                Some(key) => !labels.contains_key(key),
                None => term
                    .split_once('=')
                    .is_some_and(|(k, v)| labels.get(k).map(String::as_str) == Some(v)),
            })
    }

    #[test]
    fn the_consoles_selector_finds_the_launcher_pod_and_not_a_migration_target() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("spec");
        let mut pod = launcher_pod(&app, &spec, &OperatorConfig::default(), None).expect("pod");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert!(selects(
            &hvx_api::labels::vm_pod_selector("shop", "web"),
            &labels
        ));
        assert!(selects(
            &hvx_api::labels::any_vm_pod_selector("web"),
            &labels
        ));
        assert!(!selects(
            &hvx_api::labels::vm_pod_selector("other", "web"),
            &labels
        ));
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_MIGRATION_TARGET.into(), "m-1".into());
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert!(!selects(
            &hvx_api::labels::vm_pod_selector("shop", "web"),
            &labels
        ));
    }

    #[test]
    fn disruption_budget_needs_no_scale_subresource_and_ignores_migration_targets() {
        let app = app();
        let pdb = disruption_budget(&app, &app.spec.vms[0]).expect("LiveMigrate has a PDB");
        // An integer minAvailable: the disruption controller needs no expected count.
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert!(pdb["spec"].get("maxUnavailable").is_none());
        assert_eq!(
            pdb["spec"]["selector"]["matchExpressions"][0],
            json!({"key": LABEL_MIGRATION_TARGET, "operator": "DoesNotExist"})
        );
    }

    #[test]
    fn launcher_pods_mount_no_host_path_and_share_no_pids() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("spec");
        let pod = serde_json::to_value(
            launcher_pod(&app, &spec, &OperatorConfig::default(), None).expect("pod"),
        )
        .expect("json");
        let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
        assert_eq!(volumes.len(), 2);
        assert!(
            pod["spec"].get("hostPID").is_none(),
            "no host PID namespace"
        );
        for v in volumes {
            assert!(v.get("hostPath").is_none(), "{v}");
            assert_eq!(v["csi"]["driver"], VM_CSI_DRIVER, "{v}");
        }
        let trees: Vec<_> = volumes
            .iter()
            .map(|v| v["csi"]["volumeAttributes"][VM_CSI_TREE].clone())
            .collect();
        assert_eq!(trees, vec![json!("store"), json!("run")]);
    }

    #[test]
    fn launcher_pods_meet_pod_security_baseline() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("spec");
        let pod = serde_json::to_value(
            launcher_pod(&app, &spec, &OperatorConfig::default(), None).expect("pod"),
        )
        .expect("json");
        for host_ns in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod["spec"].get(host_ns).is_none(), "{host_ns}");
        }
        for c in pod["spec"]["containers"].as_array().expect("containers") {
            let sc = &c["securityContext"];
            assert_eq!(sc["privileged"], false, "{sc}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
            assert!(sc["capabilities"].get("add").is_none(), "{sc}");
            assert!(c.get("ports").is_none_or(|p| {
                p.as_array()
                    .is_some_and(|p| p.iter().all(|p| p.get("hostPort").is_none()))
            }));
        }
    }

    #[test]
    fn readiness_probe_tolerates_a_slow_exec() {
        let app = app();
        let spec = launch_spec(&app, &app.spec.vms[0], &resolved()).expect("spec");
        let pod = serde_json::to_value(
            launcher_pod(&app, &spec, &OperatorConfig::default(), None).expect("pod"),
        )
        .expect("json");
        let probe = &pod["spec"]["containers"][0]["readinessProbe"];
        assert_eq!(probe["timeoutSeconds"], READINESS_TIMEOUT_SECONDS);
        assert!(probe["failureThreshold"].as_i64() > Some(1), "{probe}");
    }
}
