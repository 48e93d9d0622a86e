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

/// Runs `apply` for a live object (once it carries the finalizer) and `cleanup` for a
/// deleted one, removing the finalizer once `cleanup` is done.
pub async fn reconcile<K, ApplyFut, CleanupFut>(
    api: &Api<K>,
    obj: Arc<K>,
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
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(crate::FINALIZER.to_string());
    // The resourceVersion makes the patch conditional: a list replaced from a stale
    // cache cannot drop a finalizer someone else added meanwhile.
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": obj.resource_version(),
    }});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(updated) => apply(Arc::new(updated)).await,
        // The cache was behind; the newer object is on its way through the watch.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::requeue(STALE_RETRY)),
        Err(e) => Err(e.into()),
    }
}

/// When an object whose cached copy was stale is looked at again.
const STALE_RETRY: Duration = Duration::from_millis(500);
