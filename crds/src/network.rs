//! `VirtualNetwork`: an L2 overlay segment (VXLAN with head-end replication) with the
//! services a vSphere port group plus an edge router gave the application.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An L2 network joining VM NICs across nodes.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "hvx.dev",
    version = "v1alpha1",
    kind = "VirtualNetwork",
    namespaced,
    status = "VirtualNetworkStatus",
    shortname = "vnet",
    category = "hvx",
    printcolumn = r#"{"name":"VNI","type":"integer","jsonPath":".status.vni"}"#,
    printcolumn = r#"{"name":"Subnet","type":"string","jsonPath":".spec.subnets[0].cidr"}"#,
    printcolumn = r#"{"name":"Ports","type":"integer","jsonPath":".status.portCount"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualNetworkSpec {
    /// IPv4 subnets on this segment. The first one is where DHCP serves by default.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub subnets: Vec<Subnet>,
    /// Access VLAN this segment stood for on VMware; segments with the same VLAN and
    /// network name are the same L2 domain. Guest-tagged frames pass through unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan: Option<u16>,
    /// Guest MTU. Defaults to 1500; when the node underlay cannot carry 1500 plus the
    /// VXLAN header, DHCP pushes a lower MTU and TCP MSS is clamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9000))]
    pub mtu: Option<u16>,
    /// DNS served to the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Firewall between VMs (micro-segmentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<Firewall>,
    /// Routing to other VirtualNetworks and out of the cluster, and the L2 segment
    /// outside the cluster the network joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalAccess>,
    /// Broadcast frames per second each VM NIC may send; the excess is dropped at
    /// its port (storm control: a looping guest cannot flood the segment). Default
    /// 1000; 0 turns the limit off. Multicast is not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000000))]
    pub broadcast_limit_pps: Option<u32>,
}

/// Broadcast frames per second per VM NIC when `broadcastLimitPps` is not set.
pub const DEFAULT_BROADCAST_LIMIT_PPS: u32 = 1000;

/// One IPv4 subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.gateway) || cidr(self.cidr).containsIP(self.gateway)", "message": "gateway must lie inside cidr"},
    {"rule": "!has(self.dhcp) || !has(self.dhcp.rangeStart) || cidr(self.cidr).containsIP(self.dhcp.rangeStart)", "message": "dhcp.rangeStart must lie inside cidr"},
    {"rule": "!has(self.dhcp) || !has(self.dhcp.rangeEnd) || cidr(self.cidr).containsIP(self.dhcp.rangeEnd)", "message": "dhcp.rangeEnd must lie inside cidr"},
    {"rule": "!has(self.dhcp) || !has(self.dhcp.reservations) || self.dhcp.reservations.all(r, cidr(self.cidr).containsIP(r.ipAddress))", "message": "dhcp reservations must lie inside cidr"}
]))]
pub struct Subnet {
    /// Subnet name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// IPv4 prefix, e.g. `10.10.0.0/24`.
    #[schemars(length(max = 18))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isCIDR(self) && cidr(self).ip().family() == 4", "message": "cidr must be an IPv4 CIDR"},
        {"rule": "isCIDR(self) && cidr(self).prefixLength() >= 8 && cidr(self).prefixLength() <= 30", "message": "cidr prefix length must be between /8 and /30"},
        {"rule": "isCIDR(self) && cidr(self).masked() == cidr(self)", "message": "cidr must not have host bits set"}
    ]))]
    pub cidr: String,
    /// Router address the VMs use (served by the overlay's virtual router).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "gateway must be an IPv4 address"}]))]
    pub gateway: Option<String>,
    /// DHCP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<Dhcp>,
}

/// DHCP on a subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dhcp {
    /// Serve DHCP.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// First address of the dynamic pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "rangeStart must be an IPv4 address"}]))]
    pub range_start: Option<String>,
    /// Last address of the dynamic pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "rangeEnd must be an IPv4 address"}]))]
    pub range_end: Option<String>,
    /// Lease time in seconds.
    #[serde(default = "default_lease")]
    #[schemars(range(min = 120, max = 604800))]
    pub lease_seconds: u32,
    /// Fixed addresses by MAC (VMs' `ipAddress` fields are added automatically).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reservations: Option<Vec<DhcpReservation>>,
}

fn yes() -> bool {
    true
}
fn default_lease() -> u32 {
    3600
}

/// A DHCP reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DhcpReservation {
    /// Client MAC.
    #[schemars(
        length(max = 17),
        regex(pattern = r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$")
    )]
    pub mac_address: String,
    /// Address to hand out.
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "ipAddress must be an IPv4 address"}]))]
    pub ip_address: String,
    /// Hostname option: one RFC 1123 label (letters, digits, '-' inside). It is
    /// written into dnsmasq's host files, so nothing else may pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub hostname: Option<String>,
}

/// DNS on the network: VM names are registered automatically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Search domain handed out by DHCP; VMs resolve as `<vm>.<domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub domain: Option<String>,
    /// Extra records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub records: Option<Vec<DnsRecord>>,
    /// Upstream resolvers for everything else (default: the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub upstreams: Option<Vec<String>>,
}

/// A DNS record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'A' || isIP(self.value)", "message": "an A record's value must be an IPv4 address"}
]))]
pub struct DnsRecord {
    /// Name, relative to the domain or fully qualified.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Record type.
    #[serde(rename = "type")]
    pub type_: DnsRecordType,
    /// Value.
    #[schemars(length(min = 1, max = 253))]
    pub value: String,
}

/// Supported record types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DnsRecordType {
    /// IPv4 address.
    A,
    /// Alias.
    #[serde(rename = "CNAME")]
    Cname,
    /// Text.
    #[serde(rename = "TXT")]
    Txt,
}

/// Firewall between VMs, enforced on every node's bridge (nftables bridge family).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Firewall {
    /// Action for IPv4 traffic no rule matches. ARP, DHCP and DNS to the network's own
    /// services are always allowed.
    #[serde(default)]
    pub default_action: FirewallAction,
    /// Rules, first match wins.
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub rules: Vec<FirewallRule>,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FirewallAction {
    /// Let it through.
    #[default]
    Allow,
    /// Drop it.
    Deny,
}

/// One firewall rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirewallRule {
    /// Rule name, shown in counters and logs.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// What to do with matching traffic.
    pub action: FirewallAction,
    /// Source: VMs or a CIDR. Empty means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Endpoints>,
    /// Destination: VMs or a CIDR. Empty means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Endpoints>,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports (TCP/UDP only). Empty means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub ports: Option<Vec<u16>>,
}

/// A set of endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    /// VM names (`app/vm` for VMs of another application in the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub vms: Option<Vec<String>>,
    /// IPv4 CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 18))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isCIDR(self)", "message": "cidr must be an IPv4 CIDR"}]))]
    pub cidr: Option<String>,
}

/// IP protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// Any IPv4 protocol.
    #[default]
    Any,
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// ICMP.
    #[serde(rename = "ICMP")]
    Icmp,
}

/// Traffic leaving the segment, and the segment outside the cluster it joins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.uplink) && has(self.vtep))", "message": "external: set uplink or vtep, not both (one way out of the cluster per network)"},
    {"rule": "!has(self.gateway) || self.gateway || (has(self.dhcp) && !self.dhcp)", "message": "external: dhcp needs the hvx gateway (it serves leases from the gateway address); set dhcp: false when gateway is false"},
    {"rule": "!has(self.gateway) || self.gateway || (!(has(self.egressNat) && self.egressNat) && !has(self.routedNetworks) && !has(self.exposedPorts))", "message": "external: egressNat, routedNetworks and exposedPorts need the hvx gateway"},
    {"rule": "!has(self.nodeSelector) || has(self.uplink) || has(self.vtep)", "message": "external: nodeSelector picks the node carrying an uplink or vtep; set one of them"}
]))]
pub struct ExternalAccess {
    /// Masquerade VM traffic leaving the overlay through the node (egress NAT).
    #[serde(default)]
    pub egress_nat: bool,
    /// Other VirtualNetworks the virtual router connects this one to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub routed_networks: Option<Vec<String>>,
    /// VM ports exposed as Kubernetes Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub exposed_ports: Option<Vec<ExposedPort>>,
    /// Join an existing L2 segment through a node interface (optionally a VLAN on
    /// it). Exactly one node carries it (see `nodeSelector`), so the segment and the
    /// overlay never form a loop; VMs on other nodes reach it through the overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<Uplink>,
    /// Join an existing L2 segment through a VXLAN tunnel to a VTEP outside the
    /// cluster (a switch or host of the old datacenter). The VTEP must send to the
    /// carrying node's InternalIP (list every node `nodeSelector` matches there, for
    /// failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<ExternalVtep>,
    /// Labels of the nodes that may carry the uplink or tunnel; the first ready hvx
    /// node by name among them carries it (the next one takes over when it goes).
    /// Default: any hvx node. With an uplink, every matching node needs the
    /// interface: a node without it refuses and the network reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// Serve DHCP from hvx (default true). Set false when the outside segment has
    /// its DHCP server; it then serves the VMs on every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// Serve the subnets' gateway addresses from hvx's distributed router (default
    /// true). Set false when the outside segment has the router: `subnets[].gateway`
    /// is then its address, and hvx serves no DHCP, DNS, NAT or routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<bool>,
}

/// A node interface bridged into the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Uplink {
    /// Node interface name, e.g. `eth1`. It must carry no node addresses (it becomes a
    /// bridge port) and its MTU must fit the network's.
    #[schemars(length(min = 1, max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[A-Za-z0-9_-][A-Za-z0-9_.-]*$')", "message": "interface must be a Linux interface name: up to 15 letters, digits, '-', '_' or '.', not starting with '.'"}
    ]))]
    pub interface: String,
    /// 802.1Q VLAN on the interface: hvx creates the sub-interface (the node kernel
    /// needs the 8021q module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1 && self <= 4094", "message": "vlan must be between 1 and 4094"}
    ]))]
    pub vlan: Option<u16>,
}

/// A VXLAN tunnel endpoint outside the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalVtep {
    /// The VTEP's IPv4 address, reachable from the nodes' InternalIPs.
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isIP(self) && ip(self).family() == 4", "message": "address must be an IPv4 address"}
    ]))]
    pub address: String,
    /// UDP port of the tunnel (default 4789).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1 && self <= 65535", "message": "port must be between 1 and 65535"}
    ]))]
    pub port: Option<u16>,
    /// The segment's VNI on the external VTEP.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 1 && self <= 16777215", "message": "vni must be between 1 and 16777215"}
    ]))]
    pub vni: u32,
}

/// A VM port published as a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExposedPort {
    /// VM name.
    #[schemars(length(min = 1, max = 50))]
    pub vm: String,
    /// Guest port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Protocol.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// Service port (defaults to the guest port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub service_port: Option<u16>,
    /// Service type.
    #[serde(default)]
    pub service_type: ServiceType,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// Kubernetes Service type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Cluster-internal.
    #[default]
    ClusterIP,
    /// On every node's port.
    NodePort,
    /// Through the cloud's load balancer.
    LoadBalancer,
}

/// Observed state of a network.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNetworkStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// VXLAN network identifier allocated by the operator (stable for the object's life).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Number of attached VM NICs.
    #[serde(default)]
    pub port_count: u32,
    /// Nodes carrying the network and the VM NICs attached on each.
    #[serde(default)]
    pub nodes: Vec<NetworkNodeStatus>,
    /// Ready, Valid, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One node's view of a network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkNodeStatus {
    /// Node name.
    pub node: String,
    /// Node's VXLAN tunnel endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<String>,
    /// `vm/nic` names attached there.
    #[serde(default)]
    pub ports: Vec<String>,
}
