//! Events about hvx objects, as every controller publishes them.

use crate::context::Context;
use kube::Resource;
use kube::runtime::events::{Event, EventType};

/// Publishes an event about `obj` (its note cut to 1000 characters). A failure is
/// logged, never returned: an event is a courtesy, not part of the reconcile.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    match ctx.recorder().publish(&event, &obj.object_ref(&())).await {
        Ok(()) => {}
        // A namespace being deleted takes no new events; its objects' last words are
        // not worth a warning each.
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("being terminated") => {
            tracing::debug!(error = %e, "event not published: namespace terminating");
        }
        Err(e) => tracing::warn!(error = %e, "publishing event"),
    }
}
