//! trellisd, the node agent: the CNI server with its IPAM and attach logic.
//! The datastores, routing backends, BGP and the Service proxy (policy
//! next) each stay a pure controller plus a reconciler over the
//! `trellis-dataplane` crate.

pub mod attach;
pub mod bgp;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod flannel;
pub mod health;
pub mod http;
pub mod kube;
pub mod lease;
pub mod masq;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod policy_log;
pub mod proxy;
pub mod proxy_health;
pub mod proxy_journal;
pub mod proxy_status;
pub mod reaper;
pub mod routes;
pub mod server;
pub mod service;
pub mod status;

pub use config::AgentConfig;
pub use service::CniService;
