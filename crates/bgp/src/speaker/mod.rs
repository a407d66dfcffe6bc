//! The speaker: sessions (one task per peer around the pure FSM), a
//! listener (with per-peer TCP MD5 keys), and one core task that owns the
//! RIBs, the import policy, route reflection, graceful restart and the
//! Adj-RIB-Out of every peer. Kernel-free: best-path changes go out on a
//! channel as [`RouteEvent`]s.

mod core;
mod feed;
pub mod out;
mod session;

pub use feed::{Empty, RouteFeed};

use crate::fsm::State;
use crate::import::ImportPolicy;
use crate::wire::{Open, Update};
use ipnet::IpNet;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The speaker's own settings.
#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    /// Our AS.
    pub asn: u32,
    /// Our router id (the node's IPv4 address).
    pub router_id: Ipv4Addr,
    /// Where to accept connections (None: only dial out).
    pub listen: Option<SocketAddr>,
    /// Our cluster id: set when this speaker is a route reflector.
    pub cluster_id: Option<Ipv4Addr>,
    /// Hold time we offer.
    pub hold_time: u16,
    /// Connect-retry interval.
    pub connect_retry: Duration,
    /// Graceful-restart time we announce (0: none).
    pub restart_time: u16,
    /// We come back from a restart with forwarding state kept (R and F bits).
    pub restarting: bool,
    /// Import policy.
    pub policy: ImportPolicy,
}

/// The kind of a peer, for status output and reflection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    /// Node-to-node mesh.
    Mesh,
    /// A route reflector we are a client of.
    Reflector,
    /// A client of ours (we are the reflector).
    RrClient,
    /// A router outside the cluster (ToR, BIRD).
    External,
}

impl PeerKind {
    /// As printed.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Reflector => "reflector",
            Self::RrClient => "rr-client",
            Self::External => "external",
        }
    }
}

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Its address.
    pub addr: IpAddr,
    /// Its TCP port (179).
    pub port: u16,
    /// Its AS.
    pub asn: u32,
    /// Our AS on this session.
    pub local_as: u32,
    /// Kind (a reflector's clients are `RrClient`).
    pub kind: PeerKind,
    /// TCP MD5 password.
    pub password: Option<String>,
    /// Wait for the peer to connect; never dial.
    pub passive: bool,
    /// eBGP multihop (TTL 255 instead of 1).
    pub multihop: bool,
    /// Source address for our connections.
    pub local_addr: Option<IpAddr>,
    /// Most prefixes accepted from it (0: no limit).
    pub max_prefixes: usize,
}

/// A best-path change for the agent to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteEvent {
    /// Route `prefix` via `next_hop` (learned from `peer`).
    Best {
        /// Destination.
        prefix: IpNet,
        /// Next hop.
        next_hop: IpAddr,
        /// The peer it came from.
        peer: IpAddr,
    },
    /// No route to `prefix` any more.
    Gone {
        /// Destination.
        prefix: IpNet,
    },
    /// `peer` sent everything it has (End-of-RIB).
    EndOfRib {
        /// The peer.
        peer: IpAddr,
    },
}

/// One peer, as `trellisctl bgp status` shows it: the status document's
/// own type, so the agent passes it on unchanged.
pub type PeerStatus = trellis_model::status::BgpPeer;

/// Sessions report to the core with these.
#[derive(Debug)]
pub(crate) struct SessionMsg {
    peer: IpAddr,
    gen: u64,
    msg: FromSession,
}

#[derive(Debug)]
pub(crate) enum FromSession {
    State(State),
    Up {
        open: Box<Open>,
        local: Option<IpAddr>,
    },
    Down {
        why: String,
        graceful: bool,
    },
    Update(Update),
    Refresh(u16, u8),
    /// An error worth showing; `log`: not a repeat of a recent one.
    Note {
        text: String,
        log: bool,
    },
}

enum Cmd {
    SetPeers(Vec<PeerSpec>),
    Announce(IpNet),
    /// Originate, to external peers only.
    AnnounceExternal(IpNet),
    Withdraw(IpNet),
    SetPolicy(ImportPolicy),
    Status(oneshot::Sender<Vec<PeerStatus>>),
    LocRib(oneshot::Sender<usize>),
    Shutdown(oneshot::Sender<()>),
}

/// Commands queued for the core.
const CMD_QUEUE: usize = 256;
/// Longest wait for the core to take a command or answer.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);

/// A running speaker. Dropping it ends every session without a Cease
/// (as a crash would; peers with graceful restart keep our routes);
/// [`Speaker::shutdown`] ends them politely.
pub struct Speaker {
    tx: mpsc::Sender<Cmd>,
}

impl Speaker {
    /// Binds the listener and starts the core. Returns the speaker and the
    /// feed of best-path changes.
    pub async fn start(cfg: SpeakerConfig) -> std::io::Result<(Self, RouteFeed)> {
        let listener = match cfg.listen {
            Some(addr) => Some(core::bind(addr)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(CMD_QUEUE);
        let (feed_tx, feed_rx) = feed::feed();
        tokio::spawn(core::run(cfg, listener, rx, feed_tx));
        Ok((Self { tx }, feed_rx))
    }

    /// Queues a command; the core never blocks, so this waits only while
    /// the queue is full, and at most [`CMD_TIMEOUT`].
    async fn cmd(&self, c: Cmd) -> bool {
        match tokio::time::timeout(CMD_TIMEOUT, self.tx.send(c)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::error!("bgp: the speaker took no command for {CMD_TIMEOUT:?}");
                false
            }
        }
    }

    /// Sets the peers: unchanged ones keep their sessions, changed ones
    /// restart, missing ones stop.
    /// False when the speaker did not take it (stopped, or busy past the
    /// command deadline): the caller must try again.
    pub async fn set_peers(&self, peers: Vec<PeerSpec>) -> bool {
        self.cmd(Cmd::SetPeers(peers)).await
    }

    /// Originates `prefix` (next hop self).
    /// False when the speaker did not take it (stopped, or busy past the
    /// command deadline): the caller must try again.
    pub async fn announce(&self, prefix: IpNet) -> bool {
        self.cmd(Cmd::Announce(prefix)).await
    }

    /// Originates `prefix` to external peers only (routers outside the
    /// cluster; never to mesh peers, reflectors or their clients): a
    /// Service address, which nodes serve themselves.
    /// False when the speaker did not take it: the caller must try again.
    pub async fn announce_external(&self, prefix: IpNet) -> bool {
        self.cmd(Cmd::AnnounceExternal(prefix)).await
    }

    /// Stops originating `prefix`.
    /// False when the speaker did not take it (stopped, or busy past the
    /// command deadline): the caller must try again.
    pub async fn withdraw(&self, prefix: IpNet) -> bool {
        self.cmd(Cmd::Withdraw(prefix)).await
    }

    /// Replaces the import policy; routes that now fail it are withdrawn
    /// (and kept as refused), refused routes that pass now are accepted.
    /// False when the speaker did not take it (stopped, or busy past the
    /// command deadline): the caller must try again.
    pub async fn set_policy(&self, policy: ImportPolicy) -> bool {
        self.cmd(Cmd::SetPolicy(policy)).await
    }

    /// Every peer's status (empty if the core does not answer in time).
    pub async fn status(&self) -> Vec<PeerStatus> {
        let (tx, rx) = oneshot::channel();
        if !self.cmd(Cmd::Status(tx)).await {
            return vec![];
        }
        tokio::time::timeout(CMD_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Number of prefixes in the Loc-RIB.
    pub async fn loc_rib_len(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if !self.cmd(Cmd::LocRib(tx)).await {
            return 0;
        }
        tokio::time::timeout(CMD_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Sends a Cease to every peer and stops.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd(Cmd::Shutdown(tx)).await {
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }
}
