//! Shared state of the controllers.

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

/// Settings from flags and the Helm chart.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Image of the VM launcher pods.
    pub launcher_image: String,
    /// Pull policy for it (`Never` on clusters loaded without a registry).
    pub image_pull_policy: String,
    /// CPU request per vCPU in millicores. 1000 reserves a core per vCPU; lower values
    /// overcommit (TCG test clusters).
    pub cpu_millis_per_vcpu: u32,
    /// Node label selecting nodes whose agent is ready.
    pub require_agent_label: bool,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            launcher_image: "hvx/launcher:dev".into(),
            image_pull_policy: "IfNotPresent".into(),
            cpu_millis_per_vcpu: 1000,
            require_agent_label: true,
        }
    }
}

/// What every reconcile gets.
#[derive(Clone)]
pub struct Context {
    /// API client.
    pub client: Client,
    /// Settings.
    pub config: OperatorConfig,
    /// Event recorder identity.
    pub reporter: Reporter,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A recorder for events about objects.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }
}
