//! The commands that talk to the cluster: apply the imported objects, create a
//! migration, request snapshots, attach to a console.

use crate::error::{CliError, Result};
use crate::manifests::Manifests;
use crate::objects;
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of every server-side apply, so re-imports update what they own.
pub const FIELD_MANAGER: &str = "kubectl-hvx";

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> CliError {
    let action = action.into();
    move |source| CliError::Kube { action, source }
}

/// A client from the usual kubeconfig / in-cluster config.
pub async fn client() -> Result<Client> {
    Client::try_default()
        .await
        .map_err(kube_err("cannot load a kubeconfig"))
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<()>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(kube_err(format!("cannot apply {} {name}", K::kind(&()))))?;
    Ok(())
}

/// Server-side applies networks, disks, then the application.
pub async fn apply_all(client: &Client, namespace: &str, m: &Manifests) -> Result<()> {
    for n in &m.networks {
        apply::<VirtualNetwork>(client, namespace, n).await?;
    }
    for d in &m.disks {
        apply::<OverlayDisk>(client, namespace, d).await?;
    }
    apply::<VmApplication>(client, namespace, &m.app).await
}

/// Finds the application holding `vm` when the user did not name one.
pub async fn application_of(client: &Client, namespace: &str, vm: &str) -> Result<String> {
    let api: Api<VmApplication> = Api::namespaced(client.clone(), namespace);
    let apps = api
        .list(&ListParams::default())
        .await
        .map_err(kube_err("cannot list VmApplications"))?;
    let found = objects::apps_with_vm(&apps.items, vm);
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::NotFound(format!(
            "no VmApplication in namespace {namespace} has a VM named {vm}"
        ))),
        many => Err(CliError::Usage(format!(
            "VM {vm} is in several applications ({}); pass --app",
            many.join(", ")
        ))),
    }
}

/// Creates the migration; returns its generated name.
pub async fn create_migration(client: &Client, namespace: &str, m: &VmMigration) -> Result<String> {
    let api: Api<VmMigration> = Api::namespaced(client.clone(), namespace);
    let created = api
        .create(&PostParams::default(), m)
        .await
        .map_err(kube_err("cannot create the VmMigration"))?;
    Ok(created.metadata.name.unwrap_or_default())
}

/// Requests snapshot `name` on every OverlayDisk of application `app`. Returns the
/// disks changed.
pub async fn snapshot_app(
    client: &Client,
    namespace: &str,
    app: &str,
    name: &str,
) -> Result<Vec<String>> {
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), namespace);
    let application = apps
        .get(app)
        .await
        .map_err(kube_err(format!("cannot read VmApplication {app}")))?;
    let disks: Api<OverlayDisk> = Api::namespaced(client.clone(), namespace);
    let mut changed = Vec::new();
    for disk_name in objects::app_disks(&application) {
        let disk = disks
            .get(&disk_name)
            .await
            .map_err(kube_err(format!("cannot read OverlayDisk {disk_name}")))?;
        if let Some(patch) = objects::snapshot_patch(&disk, name) {
            disks
                .patch(&disk_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(kube_err(format!(
                    "cannot request a snapshot of {disk_name}"
                )))?;
            changed.push(disk_name);
        }
    }
    Ok(changed)
}

/// Every Node (`kubectl hvx doctor`, `status`).
pub async fn nodes(client: &Client) -> Result<Vec<k8s_openapi::api::core::v1::Node>> {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(kube_err("cannot list nodes"))?
        .items)
}

/// What `kubectl hvx status` shows: applications and migrations of `namespace` (all
/// when `None`) and the nodes (left empty when the caller may not list them).
pub async fn status_inputs(
    client: &Client,
    namespace: Option<&str>,
) -> Result<crate::status::Inputs> {
    fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let apps = scoped::<VmApplication>(client, namespace)
        .list(&ListParams::default())
        .await
        .map_err(kube_err("cannot list VmApplications"))?
        .items;
    let migrations = scoped::<VmMigration>(client, namespace)
        .list(&ListParams::default())
        .await
        .map_err(kube_err("cannot list VmMigrations"))?
        .items;
    let nodes = match nodes(client).await {
        Ok(n) => n,
        Err(CliError::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 403 => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(crate::status::Inputs {
        apps,
        migrations,
        nodes,
    })
}
