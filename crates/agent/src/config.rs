//! The agent's config file (JSON). Until the cluster datastore hands out
//! leased subnets, the node's pod subnet is set here.
//!
//! ```json
//! {"nodeName":"n1","subnet":"10.244.1.0/24","mtu":1500,"defaultMode":"bridge",
//!  "socket":"/run/trellis/trellisd.sock","dataDir":"/var/lib/trellis"}
//! ```

use ipnet::IpNet;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use trellis_cni::config::DEFAULT_AGENT_SOCKET;
use trellis_cni::AttachMode;
use trellis_model::HostRange;

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}
fn default_status_socket() -> PathBuf {
    PathBuf::from("/run/trellis/status.sock")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/trellis")
}
fn default_ttl() -> u64 {
    10
}
fn default_resync() -> u64 {
    5
}
fn default_http() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9750))
}
fn default_prefix() -> String {
    "/trellis/v1/".into()
}

/// How to reach etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdSection {
    /// Client endpoints, e.g. `https://10.0.0.5:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// CA certificate (PEM) for TLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}
fn default_config_map() -> String {
    "trellis-system/trellis-config".into()
}

/// How to reach the Kubernetes API (Kubernetes mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSection {
    /// A kubeconfig file; without one, the pod's service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, `https://IP:PORT` (required in a pod:
    /// the agent must not depend on the `kubernetes` Service it proxies).
    #[serde(default)]
    pub server: Option<String>,
    /// `NAMESPACE/NAME` of the ConfigMap holding `net-conf.json`.
    #[serde(default = "default_config_map")]
    pub config_map: String,
    /// The Service proxy (replacing kube-proxy).
    #[serde(default)]
    pub proxy: ProxySection,
    /// NetworkPolicy and ClusterNetworkPolicy.
    #[serde(default)]
    pub policy: PolicySection,
}

/// Network policy settings (`kubernetes.policy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySection {
    /// Enforce policies (off: another component does, or none).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Log denied packets (the agent's log and `/policy/denials`).
    #[serde(default)]
    pub log_denied: bool,
    /// At most this many logged packets per second and drop rule.
    #[serde(default = "default_log_rate")]
    pub log_rate_per_second: u64,
    /// The NFLOG group the agent reads them from (one no other program
    /// on the node binds).
    #[serde(default = "default_log_group")]
    pub log_group: u64,
}

fn default_log_rate() -> u64 {
    10
}

fn default_log_group() -> u64 {
    100
}

/// `kubernetes.policy.logRatePerSecond`
pub const LOG_RATE_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000;
/// `kubernetes.policy.logGroup`
pub const LOG_GROUP_RANGE: std::ops::RangeInclusive<u64> = 0..=65_535;

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            enabled: true,
            log_denied: false,
            log_rate_per_second: default_log_rate(),
            log_group: default_log_group(),
        }
    }
}

impl PolicySection {
    /// How denied packets are logged (`None`: they are not), checked.
    pub fn log(&self) -> Result<Option<trellis_policy::LogDenied>, String> {
        in_range(
            "kubernetes.policy.logRatePerSecond",
            self.log_rate_per_second,
            LOG_RATE_RANGE,
        )?;
        in_range(
            "kubernetes.policy.logGroup",
            self.log_group,
            LOG_GROUP_RANGE,
        )?;
        Ok(self.log_denied.then_some(trellis_policy::LogDenied {
            rate: self.log_rate_per_second as u32,
            group: self.log_group as u16,
        }))
    }
}

/// The Service proxy's settings (`kubernetes.proxy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxySection {
    /// Serve Services (off: routing only, e.g. beside kube-proxy).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `FIRST-LAST`: node ports this node serves (kube-apiserver's
    /// `--service-node-port-range`).
    #[serde(default = "default_node_port_range")]
    pub node_port_range: String,
    /// Shortest time between two syncs: a burst of changes is applied
    /// together; a lone change right away.
    #[serde(default = "default_min_sync")]
    pub min_sync_interval_ms: u64,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            enabled: true,
            node_port_range: default_node_port_range(),
            min_sync_interval_ms: default_min_sync(),
        }
    }
}

impl ProxySection {
    /// The node port range, checked.
    pub fn node_ports(&self) -> Result<(u16, u16), String> {
        let bad = || {
            format!(
                "field \"kubernetes.proxy.nodePortRange\": {:?} is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
                self.node_port_range
            )
        };
        let (a, b) = self.node_port_range.split_once('-').ok_or_else(bad)?;
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || a > b {
            return Err(bad());
        }
        Ok((a, b))
    }
}

fn yes() -> bool {
    true
}
fn default_node_port_range() -> String {
    "30000-32767".into()
}
fn default_min_sync() -> u64 {
    100
}
/// Allowed minimum sync intervals.
pub const MIN_SYNC_RANGE: std::ops::RangeInclusive<u64> = 0..=60_000;

fn default_bridge() -> String {
    "cni0".into()
}

/// Agent settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (default: the `NODE_NAME` environment variable, as
    /// a DaemonSet passes it from `spec.nodeName`).
    #[serde(default)]
    pub node_name: String,
    /// The node's pod subnet, when it is not leased from the datastore.
    #[serde(default)]
    pub subnet: Option<IpNet>,
    /// Pod MTU unless a network config overrides it; default: the underlay
    /// MTU minus the backend's overhead (1500 without a datastore).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The cluster datastore; with it the node leases its subnet and
    /// routes to the other nodes.
    #[serde(default)]
    pub etcd: Option<EtcdSection>,
    /// The Kubernetes API as the datastore (instead of `etcd`).
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// This node's underlay address (required with `etcd`).
    #[serde(default)]
    pub public_ip: Option<std::net::Ipv4Addr>,
    /// TTL of the node's subnet lease.
    #[serde(default = "default_ttl")]
    pub lease_ttl_seconds: u64,
    /// Period of the full resync that repairs drift.
    #[serde(default = "default_resync")]
    pub resync_seconds: u64,
    /// Attach mode for network configs that do not name one (default:
    /// routed with the bgp backend, like Calico; bridge otherwise).
    #[serde(default)]
    pub default_mode: Option<AttachMode>,
    /// This node's BGP role (AS, route-reflector cluster id); also set by
    /// `--bgp-as` / `--bgp-route-reflector-cluster-id`. A `Node` resource in
    /// the datastore overrides it.
    #[serde(default)]
    pub bgp: Option<trellis_model::bgp::NodeBgp>,
    /// Bridge name in bridge mode unless a network config overrides it.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The CNI socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// The status socket (`trellisctl status`).
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// Where allocations are kept.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `/healthz`, `/readyz` and `/metrics` (HTTP); loopback by default.
    #[serde(default = "default_http")]
    pub http_address: std::net::SocketAddr,
    /// Where sysctls are written: `/proc/sys`, or in an unprivileged
    /// container (whose `/proc/sys` is read-only) the host's
    /// `/proc/sys/net` mounted at `DIR/net` — the DaemonSet mounts it at
    /// `/host/proc/sys/net`.
    #[serde(default = "default_sysctl_dir")]
    pub sysctl_dir: PathBuf,
}

fn default_sysctl_dir() -> PathBuf {
    PathBuf::from("/proc/sys")
}

/// Allowed pod MTUs (IPv4's minimum to the largest a link can carry).
pub const MTU_RANGE: std::ops::RangeInclusive<u64> = 576..=65535;
/// Allowed lease TTLs: at least two keep-alives a TTL, at most a day.
pub const LEASE_TTL_RANGE: std::ops::RangeInclusive<u64> = 2..=86_400;
/// Allowed resync periods (0 would spin; more than a day repairs nothing).
pub const RESYNC_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

/// `value` of `field` must lie in `range`.
pub fn in_range(
    field: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), String> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(format!(
        "field \"{field}\": {value} is out of range {}..={}",
        range.start(),
        range.end()
    ))
}

/// A usable AS number: not 0 (RFC 7607), not AS_TRANS 23456 (RFC 6793),
/// not 4294967295 (RFC 7300).
pub fn check_asn(field: &str, asn: u32) -> Result<(), String> {
    match asn {
        0 | 23_456 | u32::MAX => Err(format!(
            "field \"{field}\": {asn} is a reserved AS number (0, 23456 and 4294967295 cannot be used)"
        )),
        _ => Ok(()),
    }
}

/// Config errors, naming the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("agent config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not valid JSON or a bad field.
    #[error("agent config {0}: {1}")]
    Parse(PathBuf, String),
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse_with_node_name(&text, std::env::var("NODE_NAME").ok())
            .map_err(|e| ConfigError::Parse(path.into(), e))
    }

    /// Parses and validates a config document.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with_node_name(text, None)
    }

    /// Parses and validates a config document; `node_name` is used when
    /// the document names no node.
    pub fn parse_with_node_name(text: &str, node_name: Option<String>) -> Result<Self, String> {
        let mut cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if cfg.node_name.is_empty() {
            cfg.node_name = node_name.unwrap_or_default();
        }
        let datastore = cfg.etcd.is_some() || cfg.kubernetes.is_some();
        if cfg.etcd.is_some() && cfg.kubernetes.is_some() {
            return Err("fields \"etcd\" and \"kubernetes\": choose one datastore".into());
        }
        match (&cfg.subnet, datastore) {
            (Some(_), true) => {
                return Err(
                    "field \"subnet\": the datastore gives the node its subnet; remove it".into(),
                )
            }
            (Some(s), false) => {
                HostRange::new(*s).map_err(|e| format!("field \"subnet\": {e}"))?;
            }
            (None, false) => {
                return Err(
                    "field \"subnet\" is missing (or set \"etcd\" or \"kubernetes\" to get one)"
                        .into(),
                )
            }
            (None, true) => {}
        }
        if let Some(k) = &cfg.kubernetes {
            match k.config_map.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {}
                _ => {
                    return Err(format!(
                        "field \"kubernetes.configMap\": {:?} is not NAMESPACE/NAME",
                        k.config_map
                    ))
                }
            }
            k.proxy.node_ports()?;
            k.policy.log()?;
            in_range(
                "kubernetes.proxy.minSyncIntervalMs",
                k.proxy.min_sync_interval_ms,
                MIN_SYNC_RANGE,
            )?;
            if let Some(s) = &k.server {
                if !s.starts_with("https://") && !s.starts_with("http://") {
                    return Err(format!(
                        "field \"kubernetes.server\": {s:?} is not an https:// (or http://) address"
                    ));
                }
            }
        }
        if let Some(e) = &cfg.etcd {
            if e.endpoints.is_empty() {
                return Err("field \"etcd.endpoints\" is empty".into());
            }
            if cfg.public_ip.is_none() {
                return Err("field \"publicIp\" is missing (required with \"etcd\")".into());
            }
            let tls = [&e.ca_file, &e.cert_file, &e.key_file]
                .iter()
                .filter(|f| f.is_some())
                .count();
            if tls != 0 && tls != 3 {
                return Err(
                    "fields \"etcd.caFile\", \"etcd.certFile\", \"etcd.keyFile\" go together"
                        .into(),
                );
            }
            if !e.prefix.starts_with('/') || !e.prefix.ends_with('/') {
                return Err(format!(
                    "field \"etcd.prefix\": {:?} must start and end with '/'",
                    e.prefix
                ));
            }
        }
        if let Some(m) = cfg.mtu {
            in_range("mtu", m.into(), MTU_RANGE)?;
        }
        in_range("leaseTtlSeconds", cfg.lease_ttl_seconds, LEASE_TTL_RANGE)?;
        in_range("resyncSeconds", cfg.resync_seconds, RESYNC_RANGE)?;
        if let Some(a) = cfg.bgp.as_ref().and_then(|b| b.as_number) {
            check_asn("bgp.asNumber", a)?;
        }
        trellis_cni::env::validate_ifname(&cfg.bridge).map_err(|_| {
            format!(
                "field \"bridge\": {:?} is not a valid interface name",
                cfg.bridge
            )
        })?;
        if cfg.node_name.is_empty() {
            return Err("field \"nodeName\" is missing and NODE_NAME is not set".into());
        }
        Ok(cfg)
    }

    /// The directory of `subnet`'s allocations.
    pub fn ipam_dir(&self, subnet: IpNet) -> PathBuf {
        self.data_dir
            .join("ipam")
            .join(subnet.to_string().replace('/', "_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = AgentConfig::parse(r#"{"nodeName":"n1","subnet":"10.244.1.0/24"}"#).expect("cfg");
        assert_eq!(c.mtu, None);
        assert_eq!(c.default_mode, None);
        assert_eq!(c.sysctl_dir, PathBuf::from("/proc/sys"));
        assert!(c
            .ipam_dir(c.subnet.expect("subnet"))
            .ends_with("ipam/10.244.1.0_24"));
        for (doc, needle) in [
            (r#"{"nodeName":"n1","subnet":"10.244.1.9/24"}"#, "subnet"),
            (
                r#"{"nodeName":"n1","subnet":"10.244.1.0/24","mtu":9}"#,
                "mtu",
            ),
            (
                r#"{"nodeName":"n1","subnet":"10.244.1.0/24","bogus":1}"#,
                "bogus",
            ),
            (r#"{"subnet":"10.244.1.0/24"}"#, "nodeName"),
            (r#"{"nodeName":"n1"}"#, "subnet"),
            (
                r#"{"nodeName":"n1","etcd":{"endpoints":["http://e:2379"]}}"#,
                "publicIp",
            ),
            (
                r#"{"nodeName":"n1","publicIp":"192.0.2.1","etcd":{"endpoints":[]}}"#,
                "etcd.endpoints",
            ),
            (
                r#"{"nodeName":"n1","publicIp":"192.0.2.1","etcd":{"endpoints":["http://e:2379"],"caFile":"/ca"}}"#,
                "etcd.certFile",
            ),
        ] {
            let e = AgentConfig::parse(doc).expect_err(doc);
            assert!(e.contains(needle), "{doc}: {e}");
        }
    }

    /// Every numeric field, just outside its range (and far outside),
    /// is refused with an error naming it; the edges are accepted.
    #[test]
    fn numeric_fields_out_of_range() {
        let base = r#""nodeName":"n1","subnet":"10.244.1.0/24""#;
        let cases: [(&str, &[&str], &[&str]); 4] = [
            (
                "mtu",
                &["0", "575", "65536", "4294967295"],
                &["576", "65535"],
            ),
            (
                "leaseTtlSeconds",
                &["0", "1", "86401", "18446744073709551615"],
                &["2", "86400"],
            ),
            (
                "resyncSeconds",
                &["0", "86401", "18446744073709551615"],
                &["1", "86400"],
            ),
            (
                "bgp",
                &[
                    r#"{"asNumber":0}"#,
                    r#"{"asNumber":23456}"#,
                    r#"{"asNumber":4294967295}"#,
                ],
                &[r#"{"asNumber":1}"#, r#"{"asNumber":4294967294}"#],
            ),
        ];
        for (field, bad, good) in cases {
            for v in bad {
                let doc = format!("{{{base},\"{field}\":{v}}}");
                let e = AgentConfig::parse(&doc).expect_err(&doc);
                assert!(e.contains(&format!("\"{field}")), "{doc}: {e}");
            }
            for v in good {
                let doc = format!("{{{base},\"{field}\":{v}}}");
                AgentConfig::parse(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
            }
        }
        // negative and non-integer values are refused by the decoder, naming the field
        for doc in [
            format!("{{{base},\"resyncSeconds\":-1}}"),
            format!("{{{base},\"mtu\":1.5}}"),
        ] {
            AgentConfig::parse(&doc).expect_err(&doc);
        }
    }

    #[test]
    fn proxy_settings_are_checked() {
        let k = |proxy: &str| {
            format!(
                r#"{{"nodeName":"n1","kubernetes":{{"server":"https://192.0.2.2:6443","proxy":{proxy}}}}}"#
            )
        };
        for (bad, needle) in [
            (
                r#"{"nodePortRange":"32767-30000"}"#,
                "kubernetes.proxy.nodePortRange",
            ),
            (
                r#"{"nodePortRange":"0-10"}"#,
                "kubernetes.proxy.nodePortRange",
            ),
            (
                r#"{"nodePortRange":"30000"}"#,
                "kubernetes.proxy.nodePortRange",
            ),
            (
                r#"{"nodePortRange":"1-65536"}"#,
                "kubernetes.proxy.nodePortRange",
            ),
            (
                r#"{"minSyncIntervalMs":60001}"#,
                "kubernetes.proxy.minSyncIntervalMs",
            ),
            (r#"{"enabled":"yes"}"#, "invalid type"),
            (r#"{"colour":1}"#, "unknown field"),
        ] {
            let doc = k(bad);
            let e = AgentConfig::parse(&doc).expect_err(&doc);
            assert!(e.contains(needle), "{doc}: {e}");
        }
        let cfg = AgentConfig::parse(&k(r#"{"nodePortRange":"20000-20100"}"#)).expect("ok");
        let p = &cfg.kubernetes.expect("k8s").proxy;
        assert!(p.enabled);
        assert_eq!(p.node_ports(), Ok((20000, 20100)));
    }

    #[test]
    fn policy_log_settings_are_checked() {
        let k = |policy: &str| {
            format!(
                r#"{{"nodeName":"n1","kubernetes":{{"server":"https://192.0.2.2:6443","policy":{policy}}}}}"#
            )
        };
        for (bad, needle) in [
            (
                r#"{"logDenied":true,"logRatePerSecond":0}"#,
                "kubernetes.policy.logRatePerSecond\": 0 is out of range 1..=100000",
            ),
            (
                r#"{"logGroup":65536}"#,
                "kubernetes.policy.logGroup\": 65536 is out of range",
            ),
            (r#"{"logDenied":"yes"}"#, "invalid type"),
            (r#"{"logRate":5}"#, "unknown field"),
        ] {
            let doc = k(bad);
            let e = AgentConfig::parse(&doc).expect_err(&doc);
            assert!(e.contains(needle), "{doc}: {e}");
        }
        let off = AgentConfig::parse(&k("{}")).expect("ok");
        assert_eq!(off.kubernetes.expect("k8s").policy.log(), Ok(None));
        let on = AgentConfig::parse(&k(
            r#"{"logDenied":true,"logRatePerSecond":5,"logGroup":7}"#,
        ))
        .expect("ok");
        assert_eq!(
            on.kubernetes.expect("k8s").policy.log(),
            Ok(Some(trellis_policy::LogDenied { rate: 5, group: 7 }))
        );
    }
}
