//! Cleanup owed to lost nodes: what a finalizer would have asked a node's agent to do
//! when that node was Lost (`liveness`), recorded so that the deletion completes now
//! and the work is done when the node's agent is back (or dropped when the Node object
//! is deleted). One ConfigMap per node in the hvx namespace (`hvx-owed-<node>`,
//! labelled `hvx.dev/owed-cleanup`), one data key per owed call: each writer adds or
//! removes only its own key (JSON merge patches), so controllers recording at once
//! never overwrite each other, and the record is deleted with a resourceVersion
//! precondition, so an entry added meanwhile is never lost. Deleted with the
//! namespace at `helm uninstall`.
//!
//! Every call is keyed by UIDs, never by names, so a replay cannot touch an object
//! created later under the same name.

use crate::Context;
use crate::error::Error;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// Label on every owed-cleanup record.
pub const LABEL: &str = "hvx.dev/owed-cleanup";
/// Annotation naming the node a record is owed by (names may be shortened).
pub const NODE_ANNOTATION: &str = "hvx.dev/node";
/// Prefix of the record names.
pub const PREFIX: &str = "hvx-owed-";

/// The record name of `node`: `hvx-owed-<node>`, or, for names too long for that, a
/// prefix of it with a hash of the whole name (the annotation keeps the node).
pub fn record_name(node: &str) -> String {
    let name = format!("{PREFIX}{node}");
    if name.len() <= 253 {
        return name;
    }
    let hash = format!("{:016x}", hvx_api::launch::fnv1a(node));
    let keep: String = name.chars().take(253 - 17).collect();
    format!("{}-{hash}", keep.trim_end_matches(['-', '.']))
}

/// One agent call owed to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all_fields = "camelCase")]
pub enum OwedCall {
    /// Remove a deleted VirtualNetwork (only if the node still carries it under this
    /// UID: the agent deletes by VNI, which a newer network may hold there).
    DeleteNetwork {
        /// The VirtualNetwork's UID.
        network_uid: String,
        /// Its VNI.
        vni: u32,
    },
    /// Drop a deleted OverlayDisk's base reference.
    ReleaseDisk {
        /// The OverlayDisk's UID.
        disk_uid: String,
    },
    /// Delete a deleted application's VM overlay (the agent refuses while its QEMU
    /// runs: retried until the returning kubelet has stopped it).
    DeleteOverlay {
        /// The VM id (application UID / VM name).
        vm_uid: String,
        /// The VM disk's name.
        disk_name: String,
    },
}

/// One owed call and what it was for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwedEntry {
    /// The call.
    pub call: OwedCall,
    /// The deleted object it cleans up after (`Kind namespace/name`), for people.
    pub object: String,
    /// That object's UID.
    pub object_uid: String,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
}

impl OwedEntry {
    /// The data key of this entry: the call's kind and a hash of the call, so the same
    /// call recorded twice is one entry.
    pub fn key(&self) -> String {
        let (kind, text) = match &self.call {
            OwedCall::DeleteNetwork { network_uid, vni } => {
                ("network", format!("{network_uid}/{vni}"))
            }
            OwedCall::ReleaseDisk { disk_uid } => ("disk", disk_uid.clone()),
            OwedCall::DeleteOverlay { vm_uid, disk_name } => {
                ("overlay", format!("{vm_uid}/{disk_name}"))
            }
        };
        format!("{kind}-{:016x}", hvx_api::launch::fnv1a(&text))
    }
}

/// The entries of a record: (key, entry or why it cannot be read).
pub fn entries(cm: &ConfigMap) -> Vec<(String, Result<OwedEntry, String>)> {
    cm.data
        .iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::from_str::<OwedEntry>(v).map_err(|e| e.to_string()),
            )
        })
        .collect()
}

/// The node a record is owed by.
pub fn node_of(cm: &ConfigMap) -> Option<String> {
    cm.metadata
        .annotations
        .as_ref()?
        .get(NODE_ANNOTATION)
        .cloned()
}

/// Records `owed` for `node` (adding to what is recorded already).
pub async fn record(ctx: &Context, node: &str, owed: &[OwedEntry]) -> Result<(), Error> {
    if owed.is_empty() {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let name = record_name(node);
    let mut data = BTreeMap::new();
    for e in owed {
        let text = serde_json::to_string(e).map_err(|source| Error::Serialize {
            what: "owed cleanup entry",
            source,
        })?;
        data.insert(e.key(), text);
    }
    let patch = json!({"data": data});
    // Patch first (the record usually exists once a node is lost); create when absent;
    // patch again if a concurrent writer created it between the two.
    for _ in 0..2 {
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ctx.config.namespace,
                         "labels": {LABEL: "true"},
                         "annotations": {NODE_ANNOTATION: node}},
            "data": data,
        }))
        .map_err(|source| Error::Serialize {
            what: "owed cleanup record",
            source,
        })?;
        match api.create(&PostParams::default(), &cm).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Build {
        object: format!("ConfigMap {name}"),
        reason: "created and deleted concurrently; recorded next pass".into(),
    })
}

/// Every owed-cleanup record of the hvx namespace.
pub async fn list(ctx: &Context) -> Result<Vec<ConfigMap>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    Ok(api.list(&ListParams::default().labels(LABEL)).await?.items)
}

/// Removes done entries from a record (the rest stay).
pub async fn forget(ctx: &Context, name: &str, keys: &[String]) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let nulls: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| (k.clone(), serde_json::Value::Null))
        .collect();
    match api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "data": nulls })),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a record as it was read (`resource_version`): false when it changed since
/// (an entry was added; kept for the next round).
pub async fn delete(
    ctx: &Context,
    name: &str,
    resource_version: Option<String>,
) -> Result<bool, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(call: OwedCall) -> OwedEntry {
        OwedEntry {
            call,
            object: "VirtualNetwork prod/front".into(),
            object_uid: "n-1".into(),
            recorded_at: "2026-12-07T18:00:00Z".into(),
        }
    }

    #[test]
    fn entries_round_trip_through_a_record_and_keys_are_stable_data_keys() {
        let net = entry(OwedCall::DeleteNetwork {
            network_uid: "n-1".into(),
            vni: 4097,
        });
        let text = serde_json::to_value(&net).unwrap_or_default();
        assert_eq!(
            text["call"],
            json!({"call": "DeleteNetwork", "networkUid": "n-1", "vni": 4097})
        );
        let overlay = entry(OwedCall::DeleteOverlay {
            vm_uid: "u-1/db".into(),
            disk_name: "root".into(),
        });
        assert_eq!(net.key(), net.clone().key());
        assert_ne!(net.key(), overlay.key());
        for k in [net.key(), overlay.key()] {
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'),
                "{k}"
            );
        }
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "hvx-owed-n2", "annotations": {NODE_ANNOTATION: "n2"}},
            "data": {net.key(): serde_json::to_string(&net).unwrap_or_default(),
                     "junk": "{not json"},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(node_of(&cm).as_deref(), Some("n2"));
        let read = entries(&cm);
        assert_eq!(read.len(), 2);
        assert!(
            read.iter()
                .any(|(k, e)| *k == net.key() && e.as_ref() == Ok(&net))
        );
        assert!(read.iter().any(|(k, e)| k == "junk" && e.is_err()));
    }

    #[test]
    fn record_names_fit_object_names() {
        assert_eq!(record_name("n2"), "hvx-owed-n2");
        let long = "a".repeat(253);
        let name = record_name(&long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, record_name(&"a".repeat(252)));
    }
}
