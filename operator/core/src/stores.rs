//! Shared caches of the objects the controllers read: one watch per kind for the whole
//! operator, feeding both the controllers' triggers and these stores, so no reconcile
//! pass lists or gets what a watch already delivers (a pass used to list Nodes, Pods,
//! VmMigrations and VirtualNetworks from the API server; with 1000 applications that
//! was most of the load).
//!
//! Reads that must see the newest state (an allocation that must not collide, the
//! status a pass builds on) still go to the API server; everything else reads here.
//! Objects are stored without `managedFields` (memory).

use futures::{Stream, StreamExt};
use hvx_api::labels::{LABEL_APP, LABEL_ROLE, NODE_LABEL_AGENT, ROLE_LAUNCHER};
use hvx_api::migration::VmMigration;
use hvx_api::seal::{SealKey, Untrusted};
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// How many change notifications a subscriber may lag behind before the watch waits.
const SUBSCRIBER_BUFFER: usize = 4096;

/// Read-only views of every kind the controllers use.
///
/// Launcher pods are the one kind a namespace user can create and edit with hvx's
/// labels on it, so they are read only through [`Stores::launcher_pods`],
/// [`Stores::pods_of_app`] and [`Stores::pod_trust`]: these hand out only pods hvx
/// made (`hvx_api::seal::check_pod`), and no controller can forget to ask.
#[derive(Clone)]
pub struct Stores {
    /// Every node.
    pub nodes: Store<Node>,
    /// Pods labelled `hvx.dev/role=launcher` of every namespace, forged ones included.
    pods: Store<Pod>,
    /// The key launcher pods' metadata is sealed with.
    seal: SealKey,
    /// Verdicts by pod uid, for the resourceVersion they were made for.
    verdicts: Arc<std::sync::Mutex<std::collections::HashMap<String, (String, bool)>>>,
    /// Every VmMigration.
    pub migrations: Store<VmMigration>,
    /// Every VirtualNetwork.
    pub networks: Store<VirtualNetwork>,
    /// Every OverlayDisk.
    pub disks: Store<OverlayDisk>,
    /// Every VmApplication.
    pub apps: Store<VmApplication>,
    /// The node agents' Leases (hvx namespace, label `hvx.dev/agent-lease`).
    pub leases: Store<Lease>,
}

impl Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("nodes", &self.nodes.state().len())
            .field("pods", &self.pods.state().len())
            .field("apps", &self.apps.state().len())
            .finish_non_exhaustive()
    }
}

impl Stores {
    /// Views of these stores; launcher pods are checked with `seal`.
    pub fn new(
        nodes: Store<Node>,
        pods: Store<Pod>,
        migrations: Store<VmMigration>,
        networks: Store<VirtualNetwork>,
        disks: Store<OverlayDisk>,
        apps: Store<VmApplication>,
        seal: SealKey,
    ) -> Self {
        Self {
            nodes,
            pods,
            seal,
            verdicts: Arc::default(),
            migrations,
            networks,
            disks,
            apps,
            leases: empty_store(),
        }
    }

    /// These stores with `leases` as the agents' Leases (the operator's feed; tests).
    pub fn with_leases(mut self, leases: Store<Lease>) -> Self {
        self.leases = leases;
        self
    }

    /// An agent Lease by namespace and name.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Arc<Lease>> {
        self.leases.get(&ObjectRef::new(name).within(ns))
    }

    /// The key launcher pods are sealed with (for pods and patches being written).
    pub fn seal_key(&self) -> &SealKey {
        &self.seal
    }

    /// Whether hvx made `pod` and may act on it; why not otherwise.
    pub fn pod_trust(&self, pod: &Pod) -> Result<(), Untrusted> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let live = hvx_api::seal::vmapp_owner(pod)
            .and_then(|(name, _)| self.app(ns, name))
            .and_then(|a| a.metadata.uid.clone());
        hvx_api::seal::check_pod(&self.seal, pod, live.as_deref())
    }

    /// [`Self::pod_trust`] as a yes/no, remembered per pod version (a pass reads every
    /// pod of an application; the seal check hashes the launch spec).
    fn trusted(&self, pod: &Pod) -> bool {
        let (Some(uid), Some(version)) = (
            pod.metadata.uid.as_deref(),
            pod.metadata.resource_version.as_deref(),
        ) else {
            return self.pod_trust(pod).is_ok();
        };
        // The live owner's uid is part of the version: a recreated application (same
        // name, new uid) changes the verdict.
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let live = hvx_api::seal::vmapp_owner(pod)
            .and_then(|(name, _)| self.app(ns, name))
            .and_then(|a| a.metadata.uid.clone());
        let version = format!("{version}/{}", live.unwrap_or_default());
        if let Some((v, ok)) = self
            .verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            && *v == version
        {
            return *ok;
        }
        let ok = self.pod_trust(pod).is_ok();
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if verdicts.len() > 2 * self.pods.state().len() + 64 {
            let live: std::collections::HashSet<String> = self
                .pods
                .state()
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            verdicts.retain(|u, _| live.contains(u));
        }
        verdicts.insert(uid.to_string(), (version, ok));
        ok
    }

    /// A pod carrying hvx launcher labels that hvx did not make (or that was edited
    /// since), by namespace and name, with the reason: a VM's pod name taken by it.
    pub fn untrusted_pod(&self, ns: &str, name: &str) -> Option<(Arc<Pod>, Untrusted)> {
        let pod = self.pods.get(&ObjectRef::new(name).within(ns))?;
        let why = self.pod_trust(&pod).err()?;
        Some((pod, why))
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// Name -> InternalIP of every node whose agent reported ready.
    pub fn agent_nodes(&self) -> BTreeMap<String, String> {
        self.nodes
            .state()
            .iter()
            .filter(|n| n.labels().get(NODE_LABEL_AGENT).map(String::as_str) == Some("ready"))
            .filter_map(|n| Some((n.metadata.name.clone()?, internal_ip(n)?)))
            .collect()
    }

    /// Labels of the nodes [`Self::agent_nodes`] lists.
    pub fn agent_node_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.nodes
            .state()
            .iter()
            .filter(|n| n.labels().get(NODE_LABEL_AGENT).map(String::as_str) == Some("ready"))
            .filter_map(|n| Some((n.metadata.name.clone()?, n.labels().clone())))
            .collect()
    }

    /// Launcher pods hvx made, of a namespace (all namespaces with `None`).
    pub fn launcher_pods(&self, ns: Option<&str>) -> Vec<Arc<Pod>> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| ns.is_none_or(|ns| p.metadata.namespace.as_deref() == Some(ns)))
            .filter(|p| self.trusted(p))
            .collect()
    }

    /// Launcher pods hvx made for one application.
    pub fn pods_of_app(&self, ns: &str, app: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.labels().get(LABEL_APP).map(String::as_str) == Some(app)
            })
            .filter(|p| self.trusted(p))
            .collect()
    }

    /// A VirtualNetwork by namespace and name.
    pub fn network(&self, ns: &str, name: &str) -> Option<Arc<VirtualNetwork>> {
        self.networks.get(&ObjectRef::new(name).within(ns))
    }

    /// An OverlayDisk by namespace and name.
    pub fn disk(&self, ns: &str, name: &str) -> Option<Arc<OverlayDisk>> {
        self.disks.get(&ObjectRef::new(name).within(ns))
    }

    /// A VmApplication by namespace and name.
    pub fn app(&self, ns: &str, name: &str) -> Option<Arc<VmApplication>> {
        self.apps.get(&ObjectRef::new(name).within(ns))
    }

    /// The VmApplications of a namespace.
    pub fn apps_in(&self, ns: &str) -> Vec<Arc<VmApplication>> {
        self.apps
            .state()
            .into_iter()
            .filter(|a| a.metadata.namespace.as_deref() == Some(ns))
            .collect()
    }

    /// The VmApplications of a namespace that may still use what they reference: all
    /// but those deleted whose cleanup finished (finalizer gone, removal on its way).
    pub fn apps_using_in(&self, ns: &str) -> Vec<Arc<VmApplication>> {
        self.apps_in(ns)
            .into_iter()
            .filter(|a| {
                a.metadata.deletion_timestamp.is_none()
                    || a.finalizers().iter().any(|f| f == crate::FINALIZER)
            })
            .collect()
    }

    /// Waits until every store has its first full list (a pass that ran earlier would
    /// take an empty cache for "nothing exists").
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.migrations.wait_until_ready().await?;
        self.networks.wait_until_ready().await?;
        self.disks.wait_until_ready().await?;
        self.apps.wait_until_ready().await?;
        self.leases.wait_until_ready().await?;
        Ok(())
    }
}

/// A store with nothing in it that counts as filled (no watch behind it).
fn empty_store<K>() -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut w: Writer<K> = Writer::default();
    w.apply_watcher_event(&watcher::Event::Init);
    w.apply_watcher_event(&watcher::Event::InitDone);
    w.as_reader()
}

/// Label on the node agents' Leases (the operator watches only those).
pub const AGENT_LEASE_LABEL: &str = "hvx.dev/agent-lease";

/// The node's InternalIP (agents serve on the host network).
pub fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// One kind's watch: the store it fills and the streams that tell controllers of
/// changes. Every subscription must be consumed (by a controller), or the watch stalls.
pub struct Feed<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store: Store<K>,
    writer: Writer<K>,
    api: Api<K>,
    config: watcher::Config,
}

impl<K> Debug for Feed<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("kind", &K::kind(&()))
            .field("objects", &self.store.state().len())
            .finish_non_exhaustive()
    }
}

impl<K> Feed<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    /// A feed of `api`'s objects matching `config`.
    pub fn new(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
        Self {
            store,
            writer,
            api,
            config,
        }
    }

    /// The store.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A change stream for one controller.
    pub fn subscribe(&self) -> ReflectHandle<K> {
        self.writer
            .subscribe()
            .expect("store_shared writers always have a dispatcher")
    }

    /// The watch that fills the store and feeds the subscribers; run it for the life of
    /// the controllers (it retries with the watcher's default backoff).
    pub fn run(self) -> impl Stream<Item = ()> + Send {
        let kind = K::kind(&()).to_string();
        let stream = watcher(self.api, self.config)
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None);
        stream.reflect_shared(self.writer).map(move |r| {
            if let Err(e) = r {
                tracing::warn!(kind = %kind, error = %e, "watch failed; retrying");
            }
        })
    }
}

/// A watch of launcher pods (the one Pod watch of the operator).
pub fn launcher_pod_config() -> watcher::Config {
    watcher::Config::default().labels(&format!("{LABEL_ROLE}={ROLE_LAUNCHER}"))
}

/// How long start-up waits for the first lists before it logs that it still waits.
pub const READY_LOG_AFTER: Duration = Duration::from_secs(30);

/// All feeds of the operator.
#[derive(Debug)]
pub struct Feeds {
    /// Nodes.
    pub nodes: Feed<Node>,
    /// Launcher pods.
    pub pods: Feed<Pod>,
    /// VmMigrations.
    pub migrations: Feed<VmMigration>,
    /// VirtualNetworks.
    pub networks: Feed<VirtualNetwork>,
    /// OverlayDisks.
    pub disks: Feed<OverlayDisk>,
    /// VmApplications.
    pub apps: Feed<VmApplication>,
    /// Node agents' Leases in the hvx namespace.
    pub leases: Feed<Lease>,
}

impl Feeds {
    /// One feed per kind, cluster-wide (the agents' Leases: in `namespace`).
    pub fn new(client: &Client, namespace: &str) -> Self {
        Self {
            nodes: Feed::new(Api::all(client.clone()), watcher::Config::default()),
            pods: Feed::new(Api::all(client.clone()), launcher_pod_config()),
            migrations: Feed::new(Api::all(client.clone()), watcher::Config::default()),
            networks: Feed::new(Api::all(client.clone()), watcher::Config::default()),
            disks: Feed::new(Api::all(client.clone()), watcher::Config::default()),
            apps: Feed::new(Api::all(client.clone()), watcher::Config::default()),
            leases: Feed::new(
                Api::namespaced(client.clone(), namespace),
                watcher::Config::default().labels(AGENT_LEASE_LABEL),
            ),
        }
    }

    /// The stores; launcher pods are checked with `seal`.
    pub fn stores(&self, seal: SealKey) -> Stores {
        Stores::new(
            self.nodes.store(),
            self.pods.store(),
            self.migrations.store(),
            self.networks.store(),
            self.disks.store(),
            self.apps.store(),
            seal,
        )
        .with_leases(self.leases.store())
    }
}

/// What of an object can make its own controller act: a new generation (spec) or a
/// deletion. Not the status (only that controller writes it) nor the finalizers (the
/// controller adds its own, and acts on nothing else's): waking the controller for
/// its own writes would cost a second pass per write, and with a thousand objects
/// created at once those passes queue in front of the new objects' first ones. A
/// finalizer someone removed by hand comes back at the object's next periodic pass.
fn trigger_hash<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// `stream` without the changes that cannot make its controller act (`trigger_hash`):
/// for a kind whose status only its controller writes. The first sight of every object
/// (uid) passes, so a new leader still looks at everything once.
pub fn own_changes_only<K, S>(stream: S, store: Store<K>) -> impl Stream<Item = Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    S: Stream<Item = Arc<K>>,
{
    let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    stream.filter(move |obj| {
        let key = obj.meta().uid.clone().unwrap_or_default();
        let hash = trigger_hash(obj.as_ref());
        let changed = seen.insert(key, hash) != Some(hash);
        // Deleted objects' entries go once the table is twice the live count.
        if seen.len() > 2 * store.state().len() + 64 {
            let live: std::collections::HashSet<String> = store
                .state()
                .iter()
                .filter_map(|o| o.meta().uid.clone())
                .collect();
            seen.retain(|uid, _| live.contains(uid));
        }
        futures::future::ready(changed)
    })
}
