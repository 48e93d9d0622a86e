//! The cleanup finalizer, with waiting kept apart from failing: a cleanup that must
//! wait (launcher pods still terminating, a disk still used by an application) says
//! so and is looked at again soon, without an error in the log, the error metric or
//! the backoff. kube's `finalizer` helper only knows success (finalizer removed) and
//! error, so it is used for removing the finalizer, after the cleanup here said it
//! is done. Adding the finalizer is done here, and the first `apply` runs in the same
//! pass on the object the patch returned (the helper waits for the patch's watch event
//! first: a whole round trip through the API server's watch before a new object got
//! its first status).

use crate::error::Error;
use kube::api::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What a cleanup pass found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Everything hvx made for the object is gone: the finalizer may go.
    Done,
    /// Not yet, and why (logged at debug level; looked at again after `retry`).
    Waiting {
        /// What it waits for.
        reason: String,
        /// When to look again (watch events may come first).
        retry: Duration,
    },
}

impl Cleanup {
    /// Waiting while any of `users` (VmApplications that still reference the object)
    /// exists; `None` when there is none.
    pub fn wait_for_users(users: &[String]) -> Option<Self> {
        (!users.is_empty()).then(|| {
            Cleanup::waiting(format!(
                "in use by VmApplication {}; deleting after it",
                users.join(", ")
            ))
        })
    }

    /// Waiting for `reason`, looked at again in 2 s.
    pub fn waiting(reason: impl Into<String>) -> Self {
        Cleanup::Waiting {
            reason: reason.into(),
            retry: Duration::from_secs(2),
        }
    }
}

/// When a live object without the finalizer gets its first `apply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstApply {
    /// After the finalizer is on the object: for controllers whose first pass makes
    /// state outside Kubernetes (agents' networks, disk bases, migrations), which
    /// only the finalizer's cleanup would remove.
    AfterFinalizer,
    /// Before the finalizer is added (in the same pass, with no watch round trip in
    /// between): for a pass that makes nothing but objects owned through
    /// ownerReferences (garbage collected should the object go before the finalizer
    /// lands) and its status. A new object then gets its first status one API round
    /// trip sooner.
    WithFinalizer,
}

/// Runs `apply` for a live object (once it carries the finalizer, or alongside adding
/// it: `first`) and `cleanup` for a deleted one, removing the finalizer once `cleanup`
/// is done.
pub async fn reconcile<K, ApplyFut, CleanupFut>(
    api: &Api<K>,
    obj: Arc<K>,
    first: FirstApply,
    apply: impl FnOnce(Arc<K>) -> ApplyFut,
    cleanup: impl FnOnce(Arc<K>) -> CleanupFut,
) -> Result<Action, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    ApplyFut: Future<Output = Result<Action, Error>>,
    CleanupFut: Future<Output = Result<Cleanup, Error>>,
{
    let deleting = obj.meta().deletion_timestamp.is_some();
    let ours = obj.finalizers().iter().any(|f| f == crate::FINALIZER);
    if deleting && ours {
        if let Cleanup::Waiting { reason, retry } = cleanup(obj.clone()).await? {
            tracing::debug!(object = %obj.name_any(), %reason, "cleanup waiting");
            return Ok(Action::requeue(retry));
        }
        // Done: the helper's cleanup arm only removes the finalizer.
        return finalizer::finalizer(api, crate::FINALIZER, obj, |_| async {
            Ok::<_, Error>(Action::await_change())
        })
        .await
        .map_err(Error::from);
    }
    if deleting {
        // Not ours to clean up (the finalizer went, or never came).
        return Ok(Action::await_change());
    }
    if ours {
        return apply(obj).await;
    }
    let (name, params) = (obj.name_any(), PatchParams::default());
    let patch = Patch::<()>::Json(add_finalizer_patch(&*obj));
    let add = api.patch(&name, &params, &patch);
    let added = match first {
        FirstApply::AfterFinalizer => match add.await {
            Ok(updated) => return apply(Arc::new(updated)).await,
            Err(e) => e,
        },
        FirstApply::WithFinalizer => {
            // The pass first, then the finalizer: two writes to one object at once make
            // the API server retry one of them internally (both commit against the
            // same revision), which delays the status the user waits for.
            let applied = apply(obj).await;
            match add.await {
                Ok(_) => return applied,
                Err(e) => e,
            }
        }
    };
    match added {
        // The cache was behind (the finalizers differ from what it holds: a failed
        // `test` is 422), or the object went: the newer state comes through the watch.
        kube::Error::Api(e) if matches!(e.code, 404 | 409 | 422) => {
            Ok(Action::requeue(STALE_RETRY))
        }
        e => Err(e.into()),
    }
}

/// A JSON patch adding the finalizer to `obj` as the cache holds it. Its tests make
/// it conditional without a resourceVersion (a status written meanwhile, by this same
/// pass, must not fail it): the same object (uid), and the finalizers as cached, so a
/// list from a stale cache never replaces one someone else added to meanwhile. A
/// `test` for null passes where the field is absent.
pub fn add_finalizer_patch<K: Resource>(obj: &K) -> json_patch::Patch {
    let current = obj.finalizers();
    let mut ops = vec![json!({"op": "test", "path": "/metadata/uid", "value": obj.meta().uid})];
    if current.is_empty() {
        ops.push(json!({"op": "test", "path": "/metadata/finalizers", "value": null}));
        ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [crate::FINALIZER]}));
    } else {
        ops.push(json!({"op": "test", "path": "/metadata/finalizers", "value": current}));
        ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": crate::FINALIZER}));
    }
    // Every op above is well-formed, so this never falls back to the empty patch.
    serde_json::from_value(serde_json::Value::Array(ops)).unwrap_or_default()
}

/// When an object whose cached copy was stale is looked at again.
const STALE_RETRY: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use hvx_api::VmApplication;

    fn app(finalizers: &[&str]) -> VmApplication {
        let spec = serde_json::from_value(json!({"vms": []})).unwrap_or_else(|e| panic!("{e}"));
        let mut a = VmApplication::new("a", spec);
        a.metadata.uid = Some("u-1".into());
        if !finalizers.is_empty() {
            a.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        }
        a
    }

    #[test]
    fn the_finalizer_patch_tests_the_uid_and_the_cached_finalizers() {
        let p = serde_json::to_value(add_finalizer_patch(&app(&[]))).unwrap_or_default();
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": "u-1"},
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [crate::FINALIZER]},
            ])
        );
        let p =
            serde_json::to_value(add_finalizer_patch(&app(&["x.dev/keep"]))).unwrap_or_default();
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/metadata/uid", "value": "u-1"},
                {"op": "test", "path": "/metadata/finalizers", "value": ["x.dev/keep"]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": crate::FINALIZER},
            ])
        );
    }
}
