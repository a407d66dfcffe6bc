//! What the Service proxy shows: its section of the status document
//! (kept per Service, serialized) and the addresses it tells the BGP
//! speaker about.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use trellis_model::bgp::ServiceAddrKind;
use trellis_model::status::ProxyStatus;
use trellis_proxy::Service;

/// What the status document shows of the proxy, kept per Service: a
/// sync updates the rows of the Services it touched, not all of them.
#[derive(Debug, Default)]
pub struct StatusView {
    pub(crate) synced: bool,
    /// each Service's row, serialized and LZ4-compressed (one allocation,
    /// not dozens: see [`row`])
    pub(crate) services: BTreeMap<String, Box<[u8]>>,
    pub(crate) conflicts: Vec<String>,
    pub(crate) last_sync_us: u64,
    pub(crate) syncs: u64,
    pub(crate) error: Option<String>,
}

impl StatusView {
    /// The status document's section.
    pub fn snapshot(&self) -> ProxyStatus {
        ProxyStatus {
            synced: self.synced,
            services: self
                .services
                .values()
                .filter_map(|r| lz4_flex::decompress_size_prepended(r).ok())
                .filter_map(|r| serde_json::from_slice(&r).ok())
                .collect(),
            conflicts: self.conflicts.clone(),
            last_sync_us: self.last_sync_us,
            syncs: self.syncs,
            error: self.error.clone(),
        }
    }
}

/// A Service's row as [`StatusView`] keeps it.
pub(crate) fn row(r: &trellis_model::status::ProxyService) -> Box<[u8]> {
    let json = serde_json::to_vec(r).unwrap_or_default();
    lz4_flex::compress_prepend_size(&json).into_boxed_slice()
}

/// Service addresses this node advertises as /32 when the BGP
/// configuration asks for their range: those of `externalTrafficPolicy:
/// Local` Services with a ready endpoint here (Calico's rule; the ranges
/// themselves go from every node).
pub type LocalAddrs = tokio::sync::watch::Receiver<Arc<BTreeMap<IpAddr, ServiceAddrKind>>>;

/// The status view, shared with the status socket. Cheap to clone.
pub type SharedStatus = Arc<Mutex<StatusView>>;

/// A Service's IPv4 addresses (the proxy serves IPv4 only), each with
/// what it is.
pub(crate) fn advertised(s: &Service) -> Vec<(IpAddr, ServiceAddrKind)> {
    let kinds = [
        (&s.cluster_ips, ServiceAddrKind::ClusterIp),
        (&s.external_ips, ServiceAddrKind::ExternalIp),
        (&s.lb_ips, ServiceAddrKind::LoadBalancerIp),
    ];
    kinds
        .into_iter()
        .flat_map(|(ips, kind)| ips.iter().map(move |a| (*a, kind)))
        .filter(|(a, _)| a.is_ipv4())
        .collect()
}
