//! The cleanup finalizer, with waiting kept apart from failing: a cleanup that must
//! wait (launcher pods still terminating, a disk still used by an application) says
//! so and is looked at again soon, without an error in the log, the error metric or
//! the backoff. kube's `finalizer` helper only knows success (finalizer removed) and
//! error, so it is used for adding and removing the finalizer, after the cleanup here
//! said it is done.

use crate::error::Error;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
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
    finalizer::finalizer(api, crate::FINALIZER, obj, |event| async move {
        match event {
            Event::Apply(o) => apply(o).await,
            Event::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await
    .map_err(Error::from)
}
