//! Whether a node's agent is there: Alive, Suspect or Lost.
//!
//! Each agent renews a Lease `hvx-agent-<node>` in the hvx namespace every few seconds
//! (`hvx-node-agent`, `lease.rs`). A node is Lost only when both signals stopped: its
//! Lease has not been renewed for `lease + grace` and its Node's Ready condition is not
//! True (the kubelet stopped reporting too: the node controller set it Unknown, or it
//! never reported) for at least `grace`. One signal alone makes it Suspect, and
//! cleanup then waits: an agent restarting or a kubelet hiccup never has work deferred.
//!
//! Clocks: the Lease's renewTime is written by the agent's clock, the Node's heartbeat
//! by the kubelet's; neither is compared with this process' clock. Only whether they
//! *change* is used, and when this process saw them change is timed by its own clock
//! (as the Kubernetes node lifecycle controller does). So an agent whose clock is an
//! hour ahead or behind is judged the same as one with a true clock, and a new leader
//! declares nothing lost before it has watched for one full `lease + grace` window.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// Prefix of the per-node agent Lease names (`hvx-agent-<node>`).
pub const LEASE_PREFIX: &str = "hvx-agent-";

/// The Lease the agent of `node` renews; `None` when the name would be longer than an
/// object name may be (such nodes are judged by their Node alone).
pub fn lease_name(node: &str) -> Option<String> {
    let name = format!("{LEASE_PREFIX}{node}");
    (name.len() <= 253).then_some(name)
}

/// Detection thresholds (flags of the operator, chart `operator.extraArgs`).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct LivenessSettings {
    /// Seconds a node agent's Lease stays valid without renewal (agents renew every
    /// quarter of it; a Lease declaring a longer duration is given that).
    #[arg(long, env = "HVX_NODE_LEASE_SECONDS", default_value_t = crate::defaults::NODE_LEASE_SECONDS)]
    pub node_lease_seconds: u64,
    /// Seconds past an expired Lease, with the Node not Ready for as long, before the
    /// node is Lost and cleanup owed to it is recorded instead of waited for.
    #[arg(long, env = "HVX_NODE_LOST_GRACE_SECONDS", default_value_t = crate::defaults::NODE_LOST_GRACE_SECONDS)]
    pub node_lost_grace_seconds: u64,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        Self {
            node_lease_seconds: crate::defaults::NODE_LEASE_SECONDS,
            node_lost_grace_seconds: crate::defaults::NODE_LOST_GRACE_SECONDS,
        }
    }
}

/// What the operator concludes about a node's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Its agent renews its Lease (or, without a Lease, its kubelet reports Ready):
    /// call it.
    Alive,
    /// One signal stopped, or both not for long enough: wait, defer nothing.
    Suspect(String),
    /// Both stopped for long enough: work owed to it is recorded, not waited for.
    Lost(String),
}

/// The Node's Ready condition as the API server has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeReady {
    /// Ready=True: the kubelet reports and is ready.
    True,
    /// Ready=False: the kubelet reports (it is up) but not ready.
    False,
    /// Ready=Unknown (the node controller heard nothing) or no Ready condition (the
    /// kubelet never reported).
    Unknown,
}

/// What this process last saw of a node, timed by its own clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The Lease's renewTime as last seen (the agent's clock; compared only for change).
    pub lease_renew: Option<String>,
    /// Whether a Lease existed when last seen.
    pub has_lease: bool,
    /// When this process saw the renewTime change (or the Lease first).
    pub lease_changed_at: Timestamp,
    /// The Ready condition's lastHeartbeatTime as last seen (the kubelet's clock).
    pub heartbeat: Option<String>,
    /// Since when (this process' clock) the Node has been seen not reporting Ready
    /// without a new heartbeat; `None` while it is Ready or its heartbeat moves.
    pub node_down_since: Option<Timestamp>,
    /// A NodeLost event was published for the current loss.
    pub announced: bool,
}

/// The Ready condition and its heartbeat of `node`.
pub fn node_ready(node: &Node) -> (NodeReady, Option<String>) {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match ready {
        None => (NodeReady::Unknown, None),
        Some(c) => (
            match c.status.as_str() {
                "True" => NodeReady::True,
                "False" => NodeReady::False,
                _ => NodeReady::Unknown,
            },
            c.last_heartbeat_time
                .as_ref()
                .map(|t| t.0.as_millisecond().to_string()),
        ),
    }
}

/// The renewTime of `lease` (as text, for change detection) and the duration it
/// declares.
pub fn lease_renewal(lease: &Lease) -> (Option<String>, Option<u64>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.as_microsecond().to_string()),
        spec.and_then(|s| s.lease_duration_seconds)
            .and_then(|d| u64::try_from(d).ok()),
    )
}

/// Folds one look at a node into what was seen before (pure). A changed renewTime or
/// heartbeat counts as a sign of life at `now`, whatever time it names.
pub fn observe(
    prev: Option<&Seen>,
    lease_renew: Option<&str>,
    has_lease: bool,
    ready: NodeReady,
    heartbeat: Option<&str>,
    now: Timestamp,
) -> Seen {
    let lease_changed_at = match prev {
        Some(p) if p.has_lease == has_lease && p.lease_renew.as_deref() == lease_renew => {
            p.lease_changed_at
        }
        // First sight (a new leader) or a change: life now.
        _ => now,
    };
    let heartbeat_moved = prev.is_some_and(|p| p.heartbeat.as_deref() != heartbeat);
    let node_down_since = match (ready, prev.and_then(|p| p.node_down_since)) {
        // The kubelet reports: Ready, or not ready but alive (False is posted by it).
        (NodeReady::True | NodeReady::False, _) => None,
        (NodeReady::Unknown, _) if heartbeat_moved => None,
        (NodeReady::Unknown, Some(since)) => Some(since),
        (NodeReady::Unknown, None) => Some(now),
    };
    let alive_again = lease_changed_at == now && prev.is_some() || node_down_since.is_none();
    Seen {
        lease_renew: lease_renew.map(str::to_string),
        has_lease,
        lease_changed_at,
        heartbeat: heartbeat.map(str::to_string),
        node_down_since,
        announced: prev.is_some_and(|p| p.announced) && !alive_again,
    }
}

fn age(since: Timestamp, now: Timestamp) -> Duration {
    let ms = now.as_millisecond().saturating_sub(since.as_millisecond());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Decides a node's liveness from what was seen (pure). `lease_seconds` is the
/// duration the Lease declares, if any (the longer of it and the setting counts).
pub fn decide(
    seen: &Seen,
    lease_seconds: Option<u64>,
    settings: &LivenessSettings,
    now: Timestamp,
) -> Liveness {
    let lease = Duration::from_secs(
        settings
            .node_lease_seconds
            .max(lease_seconds.unwrap_or(0))
            .max(1),
    );
    let grace = Duration::from_secs(settings.node_lost_grace_seconds);
    let node_down = seen.node_down_since.map(|since| age(since, now));
    if !seen.has_lease {
        // An agent of an older version renews no Lease: the Node alone decides, over
        // the same whole window.
        return match node_down {
            None => Liveness::Alive,
            Some(d) if d >= lease + grace => Liveness::Lost(format!(
                "no agent lease, and its Node has not been Ready for {}s",
                d.as_secs()
            )),
            Some(d) => Liveness::Suspect(format!(
                "no agent lease, and its Node has not been Ready for {}s",
                d.as_secs()
            )),
        };
    }
    let silent = age(seen.lease_changed_at, now);
    if silent <= lease {
        return Liveness::Alive;
    }
    match node_down {
        Some(d) if silent >= lease + grace && d >= grace => Liveness::Lost(format!(
            "agent lease not renewed for {}s and Node not Ready for {}s",
            silent.as_secs(),
            d.as_secs()
        )),
        Some(d) => Liveness::Suspect(format!(
            "agent lease not renewed for {}s, Node not Ready for {}s",
            silent.as_secs(),
            d.as_secs()
        )),
        None => Liveness::Suspect(format!(
            "agent lease not renewed for {}s (the Node still reports)",
            silent.as_secs()
        )),
    }
}

/// The liveness of `node` now, from the caches (its Node and its agent's Lease),
/// folding this look into `ctx.node_seen`. A node without a Node object is Lost (it
/// left the cluster; nothing of hvx can run there).
pub fn of_node(ctx: &crate::Context, node: &str) -> Liveness {
    let now = Timestamp::now();
    let Some(obj) = ctx.stores.node(node) else {
        return Liveness::Lost("its Node object is gone".into());
    };
    let lease = lease_name(node).and_then(|n| ctx.stores.lease(&ctx.config.namespace, &n));
    let (renew, declared) = lease.as_deref().map(lease_renewal).unwrap_or_default();
    let (ready, heartbeat) = node_ready(&obj);
    let mut seen = ctx.node_seen.lock().unwrap_or_else(|p| p.into_inner());
    let next = observe(
        seen.get(node),
        renew.as_deref(),
        lease.is_some(),
        ready,
        heartbeat.as_deref(),
        now,
    );
    let verdict = decide(&next, declared, &ctx.config.liveness, now);
    seen.insert(node.to_string(), next);
    verdict
}

/// Marks the current loss of `node` as announced; true the first time (the caller
/// then publishes NodeLost).
pub fn first_announcement(ctx: &crate::Context, node: &str) -> bool {
    let mut seen = ctx.node_seen.lock().unwrap_or_else(|p| p.into_inner());
    match seen.get_mut(node) {
        Some(s) if !s.announced => {
            s.announced = true;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn settings() -> LivenessSettings {
        LivenessSettings::default()
    }

    /// Seen at every second from `from` to `to` (inclusive) with these inputs.
    fn watch(
        mut seen: Option<Seen>,
        from: i64,
        to: i64,
        lease: impl Fn(i64) -> Option<String>,
        ready: impl Fn(i64) -> (NodeReady, Option<String>),
    ) -> Seen {
        for t in from..=to {
            let l = lease(t);
            let (r, hb) = ready(t);
            seen = Some(observe(
                seen.as_ref(),
                l.as_deref(),
                true,
                r,
                hb.as_deref(),
                at(t),
            ));
        }
        seen.unwrap_or_else(|| panic!("watched"))
    }

    /// A Lease renewed every 5 s until `stop` (renewTime by the agent's clock,
    /// `skew` seconds off ours).
    fn renewing(stop: i64, skew: i64) -> impl Fn(i64) -> Option<String> {
        move |t| Some(((t.min(stop) / 5) * 5 + skew).to_string())
    }

    #[test]
    fn defaults_are_near_twenty_seconds() {
        assert_eq!(settings().node_lease_seconds, 20);
        assert_eq!(settings().node_lost_grace_seconds, 20);
    }

    #[test]
    fn a_renewing_agent_is_alive_whatever_its_node_says() {
        let s = watch(None, 0, 120, renewing(1000, 0), |_| {
            (NodeReady::Unknown, None)
        });
        assert_eq!(decide(&s, Some(20), &settings(), at(120)), Liveness::Alive);
    }

    #[test]
    fn a_silent_lease_with_a_reporting_node_is_only_suspect_forever() {
        let s = watch(None, 0, 600, renewing(10, 0), |t| {
            (NodeReady::True, Some((t / 10).to_string()))
        });
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(600)),
            Liveness::Suspect(_)
        ));
        // Ready=False is the kubelet talking too: not lost.
        let s = watch(None, 0, 600, renewing(10, 0), |_| (NodeReady::False, None));
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(600)),
            Liveness::Suspect(_)
        ));
    }

    #[test]
    fn both_silent_is_suspect_first_then_lost_after_lease_and_grace() {
        // Lease last renewed at 10 (seen changing at 10); Node Unknown from 15.
        let ready = |t: i64| {
            if t < 15 {
                (NodeReady::True, Some("1".to_string()))
            } else {
                (NodeReady::Unknown, Some("1".to_string()))
            }
        };
        let s = watch(None, 0, 30, renewing(10, 0), ready);
        // 20 s silent: within the lease.
        assert_eq!(decide(&s, Some(20), &settings(), at(30)), Liveness::Alive);
        let s = watch(Some(s), 31, 45, renewing(10, 0), ready);
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(45)),
            Liveness::Suspect(_)
        ));
        // 40 s silent (lease + grace) and Node down 35 s (>= grace): lost.
        let s = watch(Some(s), 46, 50, renewing(10, 0), ready);
        assert!(
            matches!(decide(&s, Some(20), &settings(), at(50)), Liveness::Lost(_)),
            "{:?}",
            decide(&s, Some(20), &settings(), at(50))
        );
        // The agent renews again: alive at once, and the loss may be announced anew.
        let mut lost = s.clone();
        lost.announced = true;
        let back = observe(
            Some(&lost),
            Some("55"),
            true,
            NodeReady::Unknown,
            Some("1"),
            at(55),
        );
        assert_eq!(
            decide(&back, Some(20), &settings(), at(55)),
            Liveness::Alive
        );
        assert!(!back.announced);
    }

    #[test]
    fn the_node_must_be_down_for_the_grace_too() {
        // Lease silent for a long time (agent crashed), Node only just went Unknown.
        let s = watch(None, 0, 200, renewing(0, 0), |t| {
            if t < 190 {
                (NodeReady::True, None)
            } else {
                (NodeReady::Unknown, None)
            }
        });
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(200)),
            Liveness::Suspect(_)
        ));
    }

    #[test]
    fn a_skewed_agent_clock_changes_nothing() {
        for skew in [-3600, 3600] {
            // Renewing with a clock an hour off: alive (not "an hour stale", not "an
            // hour in the future").
            let s = watch(None, 0, 100, renewing(1000, skew), |_| {
                (NodeReady::Unknown, None)
            });
            assert_eq!(
                decide(&s, Some(20), &settings(), at(100)),
                Liveness::Alive,
                "skew {skew}"
            );
            // Stopped at 100: lost 40 s later by this process' clock, not an hour off.
            let s = watch(Some(s), 101, 140, renewing(100, skew), |_| {
                (NodeReady::Unknown, None)
            });
            assert!(
                matches!(
                    decide(&s, Some(20), &settings(), at(140)),
                    Liveness::Lost(_)
                ),
                "skew {skew}"
            );
        }
    }

    #[test]
    fn a_new_leader_trusts_no_old_timestamp() {
        // First sight of a Lease whose renewTime is a day old: life now, not lost.
        let s = observe(None, Some("0"), true, NodeReady::Unknown, None, at(86_400));
        assert_eq!(
            decide(&s, Some(20), &settings(), at(86_400)),
            Liveness::Alive
        );
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(86_430)),
            Liveness::Suspect(_)
        ));
        assert!(matches!(
            decide(&s, Some(20), &settings(), at(86_440)),
            Liveness::Lost(_)
        ));
    }

    #[test]
    fn a_longer_declared_lease_is_honoured() {
        let s = observe(None, Some("0"), true, NodeReady::Unknown, None, at(0));
        assert!(matches!(
            decide(&s, Some(60), &settings(), at(50)),
            Liveness::Alive
        ));
        assert!(matches!(
            decide(&s, Some(60), &settings(), at(70)),
            Liveness::Suspect(_)
        ));
        assert!(matches!(
            decide(&s, Some(60), &settings(), at(80)),
            Liveness::Lost(_)
        ));
    }

    #[test]
    fn without_a_lease_the_node_alone_decides() {
        // An agent of an older version: no Lease.
        let look =
            |prev: Option<&Seen>, r, hb: Option<&str>, t| observe(prev, None, false, r, hb, at(t));
        let s = look(None, NodeReady::True, Some("1"), 0);
        assert_eq!(decide(&s, None, &settings(), at(0)), Liveness::Alive);
        let s = look(Some(&s), NodeReady::Unknown, Some("1"), 10);
        assert!(matches!(
            decide(&s, None, &settings(), at(30)),
            Liveness::Suspect(_)
        ));
        assert!(matches!(
            decide(&s, None, &settings(), at(50)),
            Liveness::Lost(_)
        ));
        // A heartbeat that moves while Unknown is the kubelet back.
        let s = look(Some(&s), NodeReady::Unknown, Some("2"), 60);
        assert_eq!(decide(&s, None, &settings(), at(60)), Liveness::Alive);
    }

    #[test]
    fn a_lease_appearing_or_vanishing_is_a_change() {
        let s = observe(None, None, false, NodeReady::Unknown, None, at(0));
        let s2 = observe(Some(&s), Some("5"), true, NodeReady::Unknown, None, at(100));
        assert_eq!(s2.lease_changed_at, at(100));
        assert_eq!(decide(&s2, None, &settings(), at(100)), Liveness::Alive);
    }

    #[test]
    fn lease_names_fit_object_names() {
        assert_eq!(lease_name("n1").as_deref(), Some("hvx-agent-n1"));
        assert_eq!(lease_name(&"a".repeat(250)), None);
    }
}
