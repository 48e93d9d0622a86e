//! Lease-based leader election (coordination.k8s.io/v1), so several operator replicas
//! can run and exactly one reconciles. The leader renews every `renew`; a replica
//! takes over once the lease has not been renewed for `duration`. Losing the lease
//! ends the process: a clean restart is simpler to reason about than stopping
//! controllers in place.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::time::Duration;

/// Election settings.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
}

/// Whether `holder` may take a lease last renewed at `renewed` and valid for
/// `duration`, at `now`.
pub fn can_acquire(
    holder: Option<&str>,
    me: &str,
    renewed: Option<Timestamp>,
    duration: Duration,
    now: Timestamp,
) -> bool {
    match (holder, renewed) {
        (None, _) | (_, None) => true,
        (Some(h), _) if h == me => true,
        (Some(_), Some(t)) => {
            now.as_millisecond() - t.as_millisecond() > duration.as_millis() as i64
        }
    }
}

/// Tries once to acquire or renew the lease. Returns whether this replica leads.
pub async fn try_acquire(client: &Client, e: &Election) -> Result<bool, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &e.namespace);
    let now = Timestamp::now();
    let secs = e.duration.as_secs() as i32;
    let Some(lease) = leases.get_opt(&e.name).await? else {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": e.name, "namespace": e.namespace},
            "spec": {"holderIdentity": e.identity, "leaseDurationSeconds": secs,
                     "acquireTime": MicroTime(now), "renewTime": MicroTime(now), "leaseTransitions": 0}
        }))
        .map_err(kube::Error::SerdeError)?;
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(err) => Err(err),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref();
    if !can_acquire(
        holder,
        &e.identity,
        spec.renew_time.as_ref().map(|t| t.0),
        e.duration,
        now,
    ) {
        return Ok(false);
    }
    let transitions =
        spec.lease_transitions.unwrap_or(0) + i32::from(holder != Some(e.identity.as_str()));
    // Optimistic concurrency: the patch carries the resourceVersion we read, so two
    // replicas racing for an expired lease cannot both win.
    let patch = json!({
        "metadata": {"resourceVersion": lease.resource_version()},
        "spec": {"holderIdentity": e.identity, "leaseDurationSeconds": secs, "renewTime": MicroTime(now),
                 "leaseTransitions": transitions}
    });
    match leases
        .patch(&e.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

/// Waits until this replica leads, then keeps renewing in the background; the
/// returned future resolves if leadership is lost.
pub async fn lead(client: Client, e: Election) -> impl std::future::Future<Output = ()> {
    loop {
        match try_acquire(&client, &e).await {
            Ok(true) => break,
            Ok(false) => tracing::info!(lease = %e.name, "another replica leads; waiting"),
            Err(err) => tracing::warn!(error = %err, "leader election"),
        }
        tokio::time::sleep(e.duration / 3).await;
    }
    tracing::info!(identity = %e.identity, "became leader");
    async move {
        let mut failures_since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(e.duration / 3).await;
            match try_acquire(&client, &e).await {
                Ok(true) => failures_since = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "renewing lease");
                    if failures_since.elapsed() > e.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_or_own_leases_can_be_taken() {
        let t0 = Timestamp::from_second(1_000).expect("ts");
        let d = Duration::from_secs(15);
        let at = |s: i64| Timestamp::from_second(1_000 + s).expect("ts");
        assert!(can_acquire(None, "a", None, d, t0));
        assert!(can_acquire(Some("a"), "a", Some(t0), d, at(1)));
        assert!(!can_acquire(Some("b"), "a", Some(t0), d, at(10)));
        assert!(can_acquire(Some("b"), "a", Some(t0), d, at(16)));
    }
}
