//! The kubelet plugin watcher's side of a plugin: what the agent answers on a
//! registration socket in `<kubelet root>/plugins_registry/` (the CSI driver
//! `vm.hvx.dev` and the device plugin `devices.hvx.dev/kvm` both register this way).

use hvx_proto::pluginregistration as reg;
use std::path::PathBuf;

/// One plugin's registration: its type, name, socket and API versions.
#[derive(Clone, Debug)]
pub struct PluginRegistration {
    /// `CSIPlugin` or `DevicePlugin`.
    pub kind: &'static str,
    /// The driver or resource name.
    pub name: &'static str,
    /// The plugin's own socket, as a path on the kubelet's host.
    pub endpoint: PathBuf,
    /// The plugin API versions served.
    pub versions: &'static [&'static str],
}

#[tonic::async_trait]
impl reg::registration_server::Registration for PluginRegistration {
    async fn get_info(
        &self,
        _: tonic::Request<reg::InfoRequest>,
    ) -> Result<tonic::Response<reg::PluginInfo>, tonic::Status> {
        Ok(tonic::Response::new(reg::PluginInfo {
            r#type: self.kind.into(),
            name: self.name.into(),
            endpoint: self.endpoint.to_string_lossy().into_owned(),
            supported_versions: self.versions.iter().map(|v| (*v).into()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: tonic::Request<reg::RegistrationStatus>,
    ) -> Result<tonic::Response<reg::RegistrationStatusResponse>, tonic::Status> {
        let r = req.get_ref();
        if r.plugin_registered {
            tracing::info!(
                kind = self.kind,
                name = self.name,
                "the kubelet registered the plugin"
            );
        } else {
            tracing::error!(kind = self.kind, name = self.name, error = %r.error, "the kubelet refused the plugin");
        }
        Ok(tonic::Response::new(reg::RegistrationStatusResponse {}))
    }
}
