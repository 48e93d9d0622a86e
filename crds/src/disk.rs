//! `OverlayDisk`: a disk image brought into the node-local copy-on-write store.
//!
//! The image is imported once per node into a content-addressed base; every VM disk
//! that references the OverlayDisk gets its own qcow2 overlay on top of that base.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A disk image and the overlays VMs write to.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hvx.dev",
    version = "v1alpha1",
    kind = "OverlayDisk",
    namespaced,
    status = "OverlayDiskStatus",
    shortname = "odisk",
    category = "hvx",
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".status.format"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.virtualSize"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.source.blank) || has(self.capacity)", "message": "a blank disk needs capacity (its size)"},
    {"rule": "!has(self.source.blank) || !has(self.checksum)", "message": "a blank disk has no source bytes to check: remove checksum"}
]))]
pub struct OverlayDiskSpec {
    /// Where the image comes from. Immutable: a new image is a new OverlayDisk.
    // Both rules sit here: a field-level `extend` replaces the type's own
    // `x-kubernetes-validations`, it does not merge with them.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "source is immutable"},
        {"rule": "[has(self.http), has(self.pvc), has(self.upload), has(self.ova), has(self.clone), has(self.blank)].filter(x, x).size() == 1",
         "message": "exactly one of http, pvc, upload, ova, clone, blank must be set"}
    ]))]
    pub source: DiskSource,
    /// Image format; `Auto` detects it from the content (never from the file name).
    #[serde(default)]
    pub format: DiskFormat,
    /// Virtual size of the disk. Defaults to the image's; a larger value grows the
    /// overlays (online), a smaller one is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    /// Expected content digest (`sha256:<hex>`) of the source bytes; a mismatch fails
    /// the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub checksum: Option<String>,
    /// Snapshots the user asked for, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub snapshots: Option<Vec<SnapshotRequest>>,
}

/// Exactly one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSource {
    /// Download over HTTP(S), resumed after interruptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A file on a PersistentVolumeClaim. Not supported by this hvx version (no
    /// importer mounts claims): refused at admission with a clear message. The field
    /// stays so that message, not an unknown-field error, is what users see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "false", "message": "pvc sources are not supported by this hvx version: use http, ova, upload or clone"}]))]
    pub pvc: Option<PvcSource>,
    /// Uploaded by `kubectl hvx import --upload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSource>,
    /// A member of an OVA archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ova: Option<OvaSource>,
    /// Another OverlayDisk (or one of its snapshots), cloned copy-on-write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneSource>,
    /// An empty disk of `capacity` (required): a zeroed disk of that size on every node
    /// that runs a VM using it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankSource>,
}

/// HTTP(S) source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSource {
    /// URL of the image (or of the OVA, with `ova`).
    #[schemars(length(max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isURL(self) && url(self).getScheme() in ['http', 'https']", "message": "url must be an http or https URL"}]))]
    pub url: String,
    /// Secret with a `ca.crt` to trust, for private servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
}

/// PVC source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PvcSource {
    /// Claim name.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Relative path of the image file on the volume.
    #[schemars(length(min = 1, max = 1024))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "!self.startsWith('/') && !self.split('/').exists(p, p == '..')", "message": "path must be relative and stay inside the volume"}]))]
    pub path: String,
}

/// Upload source: the disk waits in `WaitingForUpload` until bytes arrive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadSource {
    /// Size in bytes the client will send, when known (enables progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// A disk inside an OVA served over HTTP(S): the node agent downloads the archive
/// (same egress policy as `http`), checks the member against the OVA's manifest when
/// it lists it, and imports the member. An OVA on your machine is imported with
/// `kubectl hvx import --upload`, which makes `upload` disks instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "has(self.url)", "message": "an ova source needs url (the OVA's http or https URL); to import an OVA from your machine use `kubectl hvx import --upload`"}]))]
pub struct OvaSource {
    /// URL of the OVA (required; optional in the schema only so that leaving it out
    /// gets the message above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isURL(self) && url(self).getScheme() in ['http', 'https']", "message": "url must be an http or https URL"}]))]
    pub url: Option<String>,
    /// Member file name inside the OVA (a plain name, as the OVF's References list it).
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^/\\]+$"))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self != '.' && self != '..'", "message": "member must be a file name"}]))]
    pub member: String,
}

/// Clone source: the named OverlayDisk (same namespace) is imported on the node and
/// the clone shares its content-addressed base; clones of clones are followed (at
/// most 8 deep). The clone waits (Pending) while the named disk does not exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneSource {
    /// OverlayDisk to clone.
    #[schemars(length(min = 1, max = 253))]
    pub overlay_disk: String,
    /// Snapshot of it to clone from. Not supported by this hvx version (refused at
    /// admission): a clone has the named disk's base content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "false", "message": "cloning a snapshot is not supported by this hvx version: clone the disk itself"}]))]
    pub snapshot: Option<String>,
}

/// Blank source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlankSource {}

/// Image formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DiskFormat {
    /// Detect from the content.
    #[default]
    Auto,
    /// VMDK (monolithicSparse, streamOptimized, twoGbMaxExtentSparse/Flat, monolithicFlat).
    Vmdk,
    /// VHD (fixed or dynamic).
    Vhd,
    /// VHDX.
    Vhdx,
    /// qcow2 without backing file or external data file.
    Qcow2,
    /// Raw.
    Raw,
}

/// A snapshot the user asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Snapshot name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Import phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DiskPhase {
    /// Waiting for a node to import onto.
    Pending,
    /// Waiting for `kubectl hvx import --upload`.
    WaitingForUpload,
    /// Bytes are arriving.
    Importing,
    /// Format checked, base converted: overlays can be made.
    Ready,
    /// Import failed: see conditions.
    Failed,
}

/// Observed state of a disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverlayDiskStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DiskPhase>,
    /// Progress of the import, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Bytes imported so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Bytes to import, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Detected format and subformat, e.g. `vmdk/streamOptimized`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Virtual size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<Quantity>,
    /// Space the base takes on a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<Quantity>,
    /// Content digest of the base (`sha256:<hex>`): nodes share bases by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Nodes holding the base.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Snapshots taken.
    #[serde(default)]
    pub snapshots: Vec<SnapshotStatus>,
    /// Ready, Valid, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Name.
    pub name: String,
    /// Parent snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// When it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Ready to revert to or clone from.
    #[serde(default)]
    pub ready: bool,
}
