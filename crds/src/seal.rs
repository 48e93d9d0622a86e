//! Sealed launcher pod metadata: what the operator and the launcher trust on a pod
//! (the launch spec, where the VM's disks are, which migration a pod is the target of)
//! lives on an object every user with `edit` in the namespace can change. Each such
//! value carries an HMAC-SHA256 seal under a key only hvx holds (a Secret in the
//! release namespace, mounted into the operator and the agents), computed over the
//! value together with the pod's namespace, its name and the uid of the VmApplication
//! that owns it. A forged pod, an edited annotation or a value copied onto another
//! pod fails the check; see "Trust boundaries" in docs/architecture.md.

use crate::labels::{ANNOTATION_LAUNCH_SPEC, LABEL_APP, LABEL_MIGRATION_TARGET, LABEL_VM};
use crate::launch::{pod_name, target_pod_name};
use k8s_openapi::api::core::v1::Pod;
use ring::hmac;
use std::path::Path;

/// On a launcher pod: the node holding the VM's disks, to be moved to wherever the
/// pod is bound.
pub const ANNOTATION_DISKS_ON: &str = "hvx.dev/disks-on";
/// On a launcher pod: the node its disks were moved from, whose copy is deleted once
/// the VM runs.
pub const ANNOTATION_DISKS_MOVED_FROM: &str = "hvx.dev/disks-moved-from";

/// The shortest key accepted (bytes): 256 bits, the HMAC's output size.
pub const MIN_KEY_BYTES: usize = 32;

/// A value of pod metadata that is sealed, and where its seal is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed {
    /// The launch spec annotation.
    LaunchSpec,
    /// The disks-on annotation.
    DisksOn,
    /// The disks-moved-from annotation.
    DisksMovedFrom,
    /// The migration-target label.
    MigrationTarget,
}

impl Sealed {
    /// Every sealed item.
    pub const ALL: [Sealed; 4] = [
        Sealed::LaunchSpec,
        Sealed::DisksOn,
        Sealed::DisksMovedFrom,
        Sealed::MigrationTarget,
    ];

    /// The annotation (or label) holding the value.
    pub fn key(self) -> &'static str {
        match self {
            Sealed::LaunchSpec => ANNOTATION_LAUNCH_SPEC,
            Sealed::DisksOn => ANNOTATION_DISKS_ON,
            Sealed::DisksMovedFrom => ANNOTATION_DISKS_MOVED_FROM,
            Sealed::MigrationTarget => LABEL_MIGRATION_TARGET,
        }
    }

    /// The annotation holding the value's seal.
    pub fn seal_key(self) -> &'static str {
        match self {
            Sealed::LaunchSpec => "hvx.dev/launch-spec-seal",
            Sealed::DisksOn => "hvx.dev/disks-on-seal",
            Sealed::DisksMovedFrom => "hvx.dev/disks-moved-from-seal",
            Sealed::MigrationTarget => "hvx.dev/migration-target-seal",
        }
    }

    fn is_label(self) -> bool {
        self == Sealed::MigrationTarget
    }

    /// The value on `pod`, if it carries one.
    pub fn value(self, pod: &Pod) -> Option<&str> {
        let map = if self.is_label() {
            pod.metadata.labels.as_ref()
        } else {
            pod.metadata.annotations.as_ref()
        };
        map?.get(self.key()).map(String::as_str)
    }
}

/// What a seal binds a value to besides itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's name.
    pub pod: &'a str,
    /// The uid of the VmApplication owning the pod.
    pub owner_uid: &'a str,
}

/// Why a seal or a key is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The key file cannot be read.
    #[error("reading the seal key {path}: {message}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The key is too short to be a secret.
    #[error("the seal key {path} has {len} bytes; at least 32 are needed")]
    ShortKey {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// A value without its seal.
    #[error("{0} carries no seal")]
    Missing(&'static str),
    /// A seal that does not match the value, the pod or the owner.
    #[error("the seal of {0} does not match (edited, copied from another pod, or not made by hvx)")]
    Mismatch(&'static str),
}

/// The key seals are made with. Debug never prints it.
#[derive(Clone)]
pub struct SealKey(hmac::Key);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// A key from its bytes (tests; the binaries read a file).
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// A random key that lives as long as this process: for an operator run in
    /// tests, whose pods no agent has to check.
    pub fn ephemeral() -> Result<Self, SealError> {
        let bytes: [u8; 32] = ring::rand::generate(&ring::rand::SystemRandom::new())
            .map_err(|_| SealError::KeyFile {
                path: "the system's random source".into(),
                message: "no random bytes".into(),
            })?
            .expose();
        Ok(Self::new(&bytes))
    }

    /// The key in `path` (surrounding whitespace ignored), at least
    /// [`MIN_KEY_BYTES`] long.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read(path).map_err(|e| SealError::KeyFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let key = text.trim_ascii();
        if key.len() < MIN_KEY_BYTES {
            return Err(SealError::ShortKey {
                path: path.display().to_string(),
                len: key.len(),
            });
        }
        Ok(Self::new(key))
    }

    /// The seal of `value` of `item` on the pod `subject` names (hex).
    pub fn seal(&self, subject: &Subject<'_>, item: Sealed, value: &str) -> String {
        hex(hmac::sign(&self.0, &message(subject, item, value)).as_ref())
    }

    /// Checks `seal` against `value` (constant time).
    pub fn verify(
        &self,
        subject: &Subject<'_>,
        item: Sealed,
        value: &str,
        seal: Option<&str>,
    ) -> Result<(), SealError> {
        let seal = seal.ok_or(SealError::Missing(item.key()))?;
        let tag = unhex(seal).ok_or(SealError::Mismatch(item.key()))?;
        hmac::verify(&self.0, &message(subject, item, value), &tag)
            .map_err(|_| SealError::Mismatch(item.key()))
    }

    /// Seals every sealed value `pod` carries (its namespace and name must be set):
    /// call it on a pod just built, before it is written.
    pub fn seal_pod(&self, pod: &mut Pod, owner_uid: &str) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let subject = Subject {
            namespace: &namespace,
            pod: &name,
            owner_uid,
        };
        let seals: Vec<(&str, String)> = Sealed::ALL
            .iter()
            .filter_map(|item| {
                let value = item.value(pod)?;
                Some((item.seal_key(), self.seal(&subject, *item, value)))
            })
            .collect();
        let annotations = pod.metadata.annotations.get_or_insert_default();
        for (k, v) in seals {
            annotations.insert(k.to_string(), v);
        }
    }

    /// The annotations a merge patch sets so that `item` becomes `value` (None:
    /// removed) on the pod `subject` names, seal included.
    pub fn patch_annotations(
        &self,
        subject: &Subject<'_>,
        item: Sealed,
        value: Option<&str>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let seal = value.map(|v| self.seal(subject, item, v));
        if !item.is_label() {
            m.insert(item.key().into(), value.into());
        }
        m.insert(item.seal_key().into(), seal.into());
        m
    }
}

fn message(subject: &Subject<'_>, item: Sealed, value: &str) -> Vec<u8> {
    // Length-prefixed fields: no two different tuples give the same bytes.
    let mut m = b"hvx-seal/v1".to_vec();
    for part in [
        subject.namespace,
        subject.pod,
        subject.owner_uid,
        item.key(),
        value,
    ] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Why the operator ignores a pod carrying hvx labels.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Untrusted {
    /// No controller ownerReference to a VmApplication.
    #[error("it has no controller ownerReference to a VmApplication")]
    NoOwner,
    /// The owner named does not exist (in the pod's namespace).
    #[error("its owner VmApplication {0} does not exist in its namespace")]
    OwnerMissing(String),
    /// The owner reference's uid is not the live object's.
    #[error("its ownerReference uid {got} is not the uid of VmApplication {name} ({live})")]
    OwnerUid {
        /// The owner's name.
        name: String,
        /// The uid on the pod.
        got: String,
        /// The live object's uid.
        live: String,
    },
    /// The app label does not name the owner.
    #[error("its label hvx.dev/app does not name its owner {0}")]
    AppLabel(String),
    /// No VM label.
    #[error("it has no label hvx.dev/vm")]
    NoVmLabel,
    /// Not a name the operator gives.
    #[error("its name {got} is not the one hvx gives this VM's pods ({expected})")]
    Name {
        /// The pod's name.
        got: String,
        /// What the operator would name it.
        expected: String,
    },
    /// A sealed value without a valid seal.
    #[error("{0}")]
    Seal(SealError),
}

/// The name of the controller owner, if it is a VmApplication: (name, uid).
pub fn vmapp_owner(pod: &Pod) -> Option<(&str, &str)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .filter(|o| o.kind == "VmApplication" && o.api_version.starts_with("hvx.dev/"))
        .map(|o| (o.name.as_str(), o.uid.as_str()))
}

/// Whether the operator may act on a pod carrying hvx labels: its controller owner is
/// the live VmApplication (`live_owner_uid`: the uid of the VmApplication of that name
/// in the pod's namespace, None if there is none), its labels and name are those the
/// operator gives, and every sealed value it carries has a valid seal. Pure.
pub fn check_pod(key: &SealKey, pod: &Pod, live_owner_uid: Option<&str>) -> Result<(), Untrusted> {
    let (owner, uid) = vmapp_owner(pod).ok_or(Untrusted::NoOwner)?;
    let live = live_owner_uid.ok_or_else(|| Untrusted::OwnerMissing(owner.to_string()))?;
    if uid != live {
        return Err(Untrusted::OwnerUid {
            name: owner.to_string(),
            got: uid.to_string(),
            live: live.to_string(),
        });
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(LABEL_APP).map(String::as_str) != Some(owner) {
        return Err(Untrusted::AppLabel(owner.to_string()));
    }
    let vm = labels.get(LABEL_VM).ok_or(Untrusted::NoVmLabel)?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    // A migration's target pod is named after its migration (the name ends in a prefix
    // of the migration's uid) and keeps that name once the migration completed.
    let expected = pod_name(owner, vm);
    let suffix = name.rsplit('-').next().unwrap_or_default();
    let as_target = target_pod_name(owner, vm, suffix);
    if name != expected && (name != as_target || suffix.len() != 6) {
        return Err(Untrusted::Name {
            got: name,
            expected,
        });
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let subject = Subject {
        namespace: &namespace,
        pod: &name,
        owner_uid: uid,
    };
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    // The launch spec must be there; the others only when present.
    if Sealed::LaunchSpec.value(pod).is_none() {
        return Err(Untrusted::Seal(SealError::Missing(ANNOTATION_LAUNCH_SPEC)));
    }
    for item in Sealed::ALL {
        if let Some(value) = item.value(pod) {
            key.verify(
                &subject,
                item,
                value,
                annotations.get(item.seal_key()).map(String::as_str),
            )
            .map_err(Untrusted::Seal)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> SealKey {
        SealKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn pod() -> Pod {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "shop-web", "namespace": "prod",
                "labels": {LABEL_APP: "shop", LABEL_VM: "web", "hvx.dev/role": "launcher"},
                "annotations": {ANNOTATION_LAUNCH_SPEC: "{\"vmId\":\"u-1/web\"}", ANNOTATION_DISKS_ON: "n1"},
                "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                     "name": "shop", "uid": "u-1", "controller": true}],
            }
        }))
        .expect("pod");
        key().seal_pod(&mut pod, "u-1");
        pod
    }

    fn annotate(pod: &mut Pod, k: &str, v: &str) {
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(k.into(), v.into());
    }

    #[test]
    fn a_pod_hvx_made_and_sealed_is_trusted() {
        assert_eq!(check_pod(&key(), &pod(), Some("u-1")), Ok(()));
    }

    #[test]
    fn forged_owners_labels_and_names_are_refused() {
        let p = pod();
        assert!(matches!(
            check_pod(&key(), &p, None),
            Err(Untrusted::OwnerMissing(_))
        ));
        assert!(matches!(
            check_pod(&key(), &p, Some("u-2")),
            Err(Untrusted::OwnerUid { .. })
        ));
        let mut no_owner = p.clone();
        no_owner.metadata.owner_references = None;
        assert_eq!(
            check_pod(&key(), &no_owner, Some("u-1")),
            Err(Untrusted::NoOwner)
        );
        let mut not_controller = p.clone();
        if let Some(o) = not_controller.metadata.owner_references.as_mut() {
            o[0].controller = Some(false);
        }
        assert_eq!(
            check_pod(&key(), &not_controller, Some("u-1")),
            Err(Untrusted::NoOwner)
        );
        let mut other_vm = p.clone();
        other_vm
            .metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_VM.into(), "db".into());
        assert!(matches!(
            check_pod(&key(), &other_vm, Some("u-1")),
            Err(Untrusted::Name { .. })
        ));
        let mut other_app = p.clone();
        other_app
            .metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_APP.into(), "bank".into());
        assert_eq!(
            check_pod(&key(), &other_app, Some("u-1")),
            Err(Untrusted::AppLabel("shop".into()))
        );
    }

    #[test]
    fn edited_or_unsealed_values_are_refused() {
        let mut edited = pod();
        annotate(&mut edited, ANNOTATION_LAUNCH_SPEC, "{\"vmId\":\"u-9/db\"}");
        assert_eq!(
            check_pod(&key(), &edited, Some("u-1")),
            Err(Untrusted::Seal(SealError::Mismatch(ANNOTATION_LAUNCH_SPEC)))
        );
        let mut moved = pod();
        annotate(&mut moved, ANNOTATION_DISKS_MOVED_FROM, "n3");
        assert_eq!(
            check_pod(&key(), &moved, Some("u-1")),
            Err(Untrusted::Seal(SealError::Missing(
                ANNOTATION_DISKS_MOVED_FROM
            )))
        );
        let mut target = pod();
        target
            .metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_MIGRATION_TARGET.into(), "m1".into());
        target.metadata.name = Some("shop-web-abc123".into());
        assert!(check_pod(&key(), &target, Some("u-1")).is_err());
        // Sealed by someone with another key.
        let mut other_key = pod();
        SealKey::new(b"another key of thirty-two bytes!").seal_pod(&mut other_key, "u-1");
        assert!(check_pod(&key(), &other_key, Some("u-1")).is_err());
    }

    #[test]
    fn a_seal_copied_to_another_pod_or_namespace_does_not_verify() {
        let p = pod();
        let mut copy = p.clone();
        copy.metadata.namespace = Some("other".into());
        assert!(matches!(
            check_pod(&key(), &copy, Some("u-1")),
            Err(Untrusted::Seal(SealError::Mismatch(_)))
        ));
        let spec = Sealed::LaunchSpec.value(&p).expect("spec");
        let seal =
            p.metadata.annotations.as_ref().expect("a")[Sealed::LaunchSpec.seal_key()].clone();
        let elsewhere = Subject {
            namespace: "prod",
            pod: "shop-db",
            owner_uid: "u-1",
        };
        assert!(
            key()
                .verify(&elsewhere, Sealed::LaunchSpec, spec, Some(&seal))
                .is_err()
        );
        // Same bytes under another item do not verify either.
        let here = Subject {
            namespace: "prod",
            pod: "shop-web",
            owner_uid: "u-1",
        };
        assert!(
            key()
                .verify(&here, Sealed::LaunchSpec, spec, Some(&seal))
                .is_ok()
        );
        assert!(
            key()
                .verify(&here, Sealed::DisksOn, spec, Some(&seal))
                .is_err()
        );
        assert!(
            key()
                .verify(&here, Sealed::LaunchSpec, spec, Some("zz"))
                .is_err()
        );
    }

    #[test]
    fn a_migration_target_with_a_sealed_label_and_its_name_is_trusted() {
        let mut t = pod();
        t.metadata.name = Some(target_pod_name("shop", "web", "abc123-ffff"));
        assert_eq!(t.metadata.name.as_deref(), Some("shop-web-abc123"));
        t.metadata
            .labels
            .get_or_insert_default()
            .insert(LABEL_MIGRATION_TARGET.into(), "m1".into());
        key().seal_pod(&mut t, "u-1");
        assert_eq!(check_pod(&key(), &t, Some("u-1")), Ok(()));
        // Once the migration completed the label goes; the name stays.
        t.metadata
            .labels
            .get_or_insert_default()
            .remove(LABEL_MIGRATION_TARGET);
        assert_eq!(check_pod(&key(), &t, Some("u-1")), Ok(()));
        t.metadata.name = Some("shop-web-abc12".into());
        key().seal_pod(&mut t, "u-1");
        assert!(matches!(
            check_pod(&key(), &t, Some("u-1")),
            Err(Untrusted::Name { .. })
        ));
    }

    #[test]
    fn patches_carry_the_value_and_its_seal_or_remove_both() {
        let subject = Subject {
            namespace: "prod",
            pod: "shop-web",
            owner_uid: "u-1",
        };
        let k = key();
        let set = k.patch_annotations(&subject, Sealed::DisksMovedFrom, Some("n1"));
        assert_eq!(set[ANNOTATION_DISKS_MOVED_FROM], "n1");
        let seal = set[Sealed::DisksMovedFrom.seal_key()]
            .as_str()
            .expect("seal");
        assert!(
            k.verify(&subject, Sealed::DisksMovedFrom, "n1", Some(seal))
                .is_ok()
        );
        let unset = k.patch_annotations(&subject, Sealed::MigrationTarget, None);
        assert_eq!(unset.len(), 1, "a label's value is not an annotation");
        assert!(unset[Sealed::MigrationTarget.seal_key()].is_null());
    }

    #[test]
    fn short_or_missing_key_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("hvx-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("key");
        std::fs::write(&f, "short\n").expect("write");
        assert!(matches!(
            SealKey::from_file(&f),
            Err(SealError::ShortKey { len: 5, .. })
        ));
        std::fs::write(&f, format!("{}\n", "k".repeat(40))).expect("write");
        assert!(SealKey::from_file(&f).is_ok());
        assert!(matches!(
            SealKey::from_file(&dir.join("absent")),
            Err(SealError::KeyFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
