//! The operator trusts only launcher pods it made: a pod carrying hvx labels counts
//! only if its controller owner is the live VmApplication, its name is the one hvx
//! gives, and its launch spec (and any disk or migration marker) carries a valid seal
//! (`hvx_api::seal`). The check sits in the pod cache's accessors
//! (`stores::Stores::launcher_pods`, `pods_of_app`), so every decision (grouping,
//! disk moves, taps, cleanup, migrations) sees only such pods. This module writes
//! sealed pods and patches, warns once about each pod it ignores, and frees a VM's pod
//! name taken by a pod it did not make.

use crate::context::Context;
use crate::error::Error;
use futures::{Stream, StreamExt};
use hvx_api::VmApplication;
use hvx_api::labels::LABEL_APP;
use hvx_api::seal::{Sealed, Subject};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use std::collections::HashSet;
use std::sync::Arc;

/// Event reason of a pod the operator ignores.
pub const REASON_IGNORED: &str = "UntrustedPodIgnored";
/// Event reason of a pod deleted because it held a VM's pod name.
pub const REASON_REPLACED: &str = "UntrustedPodReplaced";

/// Creates a launcher pod hvx built, sealed. A create, never an apply: an apply onto
/// a pod of that name that someone else made would adopt it. Already there: the cache
/// was behind (or a squatter: the next pass finds it and replaces it).
pub async fn create_pod(ctx: &Context, owner_uid: &str, mut pod: Pod) -> Result<(), Error> {
    ctx.stores.seal_key().seal_pod(&mut pod, owner_uid);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let params = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, &pod).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(pod = %pod.name_any(), "launcher pod already exists");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The merge patch that sets (or with None removes) sealed values of `pod`, their
/// seals included, so a value and its seal change in one write. Pure.
pub fn sealed_patch(
    key: &hvx_api::seal::SealKey,
    pod: &Pod,
    changes: &[(Sealed, Option<&str>)],
) -> serde_json::Value {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let owner_uid = hvx_api::seal::vmapp_owner(pod)
        .map(|(_, uid)| uid.to_string())
        .unwrap_or_default();
    let subject = Subject {
        namespace: &ns,
        pod: &name,
        owner_uid: &owner_uid,
    };
    let mut annotations = serde_json::Map::new();
    let mut labels = serde_json::Map::new();
    for (item, value) in changes {
        annotations.extend(key.patch_annotations(&subject, *item, *value));
        if *item == Sealed::MigrationTarget {
            labels.insert(item.key().into(), (*value).into());
        }
    }
    serde_json::json!({ "metadata": { "annotations": annotations, "labels": labels } })
}

/// Sets (or removes) sealed values on a pod hvx made.
pub async fn patch_sealed(
    ctx: &Context,
    pod: &Pod,
    changes: &[(Sealed, Option<&str>)],
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let patch = sealed_patch(ctx.stores.seal_key(), pod, changes);
    api.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Removes the pod named `name` in `app`'s namespace if it carries hvx labels but hvx
/// did not make it (or it was edited since): it holds the name the VM's launcher pod
/// needs. Returns the VM's reason meanwhile, None when the name is free or hvx's.
pub async fn replace_squatter(
    ctx: &Context,
    app: &VmApplication,
    name: &str,
) -> Result<Option<String>, Error> {
    let ns = app.namespace().unwrap_or_default();
    let Some((pod, why)) = ctx.stores.untrusted_pod(&ns, name) else {
        return Ok(None);
    };
    let reason =
        format!("pod {name} was not made by hvx or was changed since ({why}); it is replaced");
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Some(reason));
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // Only that pod: one made anew meanwhile (a new uid) is judged again.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {}
        Err(e) => return Err(e.into()),
    }
    tracing::warn!(namespace = %ns, pod = %name, %why, "deleted a pod holding a VM's launcher pod name");
    hvx_operator_core::events::publish(
        ctx,
        app,
        EventType::Warning,
        REASON_REPLACED,
        &format!("deleted pod {name}: {why}; the VM's launcher pod is made anew"),
    )
    .await;
    Ok(Some(reason))
}

/// The event text for an ignored pod.
pub fn ignored_note(pod: &Pod, why: &hvx_api::seal::Untrusted) -> String {
    format!(
        "ignored pod {}: it carries hvx launcher labels but {why}; hvx takes nothing from it",
        pod.name_any()
    )
}

/// Publishes one Warning event per pod carrying hvx launcher labels that hvx ignores:
/// on its VmApplication (named by its `hvx.dev/app` label, else its owner) if that
/// exists in the pod's namespace, else on the pod. Pods being deleted are skipped.
pub async fn warn_untrusted(ctx: Arc<Context>, pods: impl Stream<Item = Arc<Pod>>) {
    let mut warned: HashSet<String> = HashSet::new();
    futures::pin_mut!(pods);
    while let Some(pod) = pods.next().await {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uid = pod.uid().unwrap_or_default();
        if warned.contains(&uid) {
            continue;
        }
        let Err(why) = ctx.stores.pod_trust(&pod) else {
            continue;
        };
        // Bounded: at worst a long-lived forged pod is named a second time.
        if warned.len() >= 10_000 {
            warned.clear();
        }
        warned.insert(uid);
        let ns = pod.namespace().unwrap_or_default();
        let note = ignored_note(&pod, &why);
        tracing::warn!(namespace = %ns, pod = %pod.name_any(), %why, "ignoring a pod hvx did not make");
        let app_name = pod
            .labels()
            .get(LABEL_APP)
            .cloned()
            .or_else(|| hvx_api::seal::vmapp_owner(&pod).map(|(n, _)| n.to_string()));
        match app_name.and_then(|n| ctx.stores.app(&ns, &n)) {
            Some(app) => {
                hvx_operator_core::events::publish(
                    &ctx,
                    app.as_ref(),
                    EventType::Warning,
                    REASON_IGNORED,
                    &note,
                )
                .await
            }
            None => {
                hvx_operator_core::events::publish(
                    &ctx,
                    pod.as_ref(),
                    EventType::Warning,
                    REASON_IGNORED,
                    &note,
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sealed_patch_changes_value_and_seal_together() {
        let key = hvx_api::seal::SealKey::new(b"0123456789abcdef0123456789abcdef");
        let pod: Pod = serde_json::from_value(json!({"metadata": {
            "name": "shop-web", "namespace": "prod",
            "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                 "name": "shop", "uid": "u-1", "controller": true}],
        }}))
        .expect("pod");
        let p = sealed_patch(
            &key,
            &pod,
            &[
                (Sealed::DisksOn, None),
                (Sealed::DisksMovedFrom, Some("n1")),
            ],
        );
        let seal = p["metadata"]["annotations"]["hvx.dev/disks-moved-from-seal"]
            .as_str()
            .expect("seal");
        let subject = Subject {
            namespace: "prod",
            pod: "shop-web",
            owner_uid: "u-1",
        };
        assert!(
            key.verify(&subject, Sealed::DisksMovedFrom, "n1", Some(seal))
                .is_ok()
        );
        assert_eq!(
            p["metadata"]["annotations"]["hvx.dev/disks-moved-from"],
            "n1"
        );
        assert!(p["metadata"]["annotations"]["hvx.dev/disks-on"].is_null());
        assert!(p["metadata"]["annotations"]["hvx.dev/disks-on-seal"].is_null());
        let t = sealed_patch(&key, &pod, &[(Sealed::MigrationTarget, None)]);
        assert!(t["metadata"]["labels"]["hvx.dev/migration-target"].is_null());
        assert!(t["metadata"]["annotations"]["hvx.dev/migration-target-seal"].is_null());
        assert!(
            t["metadata"]["labels"]
                .as_object()
                .is_some_and(|m| m.contains_key("hvx.dev/migration-target")),
            "a null removes the label"
        );
    }
}
