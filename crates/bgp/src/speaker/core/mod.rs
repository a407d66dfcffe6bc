//! The core task: owns the RIBs, the import policy, the Adj-RIB-Out of
//! every peer, graceful restart (stale routes kept until End-of-RIB or the
//! restart time) and the peer set. `inbound` handles what peers send
//! (UPDATEs, policy changes), `outbound` what goes to them.
//!
//! The core never waits on anyone: sessions get messages through bounded
//! queues with `try_send` (a session whose queue is full is not keeping up
//! and is reset; the peer gets the full table again when it comes back),
//! best-path changes go out through the coalescing [`FeedTx`]. Sessions
//! wait on the core (backpressure reaches the peer through TCP).

mod inbound;
mod outbound;

use super::feed::FeedTx;
use super::session::{self, ToSession};
use super::{Cmd, FromSession, PeerKind, PeerSpec, PeerStatus, SessionMsg, SpeakerConfig};
use crate::export::{Attrs, Exporter, Target};
use crate::fsm::{PeerConfig, State};
use crate::import::Me;
use crate::rib::{Rib, SharedPath};
use crate::wire::{Capability, Open, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Batches queued for one session; a full queue resets the session.
pub(crate) const SESSION_QUEUE: usize = 4096;
/// Messages queued from all sessions to the core.
pub(crate) const TO_CORE_QUEUE: usize = 1024;
/// Accepted connections waiting for the core.
const ACCEPT_QUEUE: usize = 64;
/// Refused routes kept with their path per peer (soft reconfiguration
/// inbound); past this many only the prefix is kept, and a policy change
/// asks the peer for a ROUTE-REFRESH instead.
pub(crate) const REFUSED_KEPT: usize = 100_000;

/// How long a connection from an unknown address waits to become a peer.
const PENDING_GRACE: Duration = Duration::from_secs(3);

pub(super) fn bind(addr: SocketAddr) -> std::io::Result<Arc<TcpListener>> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    Ok(Arc::new(sock.listen(128)?))
}

struct Remote {
    router_id: std::net::Ipv4Addr,
    asn: u32,
    local: IpAddr,
    /// Graceful restart: (restart time, forwarding kept for IPv4).
    gr: Option<(u16, bool)>,
    refresh: bool,
    v6: bool,
}

struct Peer {
    spec: PeerSpec,
    gen: u64,
    tx: mpsc::Sender<ToSession>,
    state: State,
    since: Instant,
    remote: Option<Remote>,
    /// What the peer last learned from us.
    adj_out: FxHashMap<IpNet, Attrs>,
    /// Announced to us but refused, with the path when the refusal was a
    /// policy decision (re-checked when the policy changes).
    refused: FxHashMap<IpNet, Option<SharedPath>>,
    /// Refused prefixes were kept without their path: a policy change
    /// needs a ROUTE-REFRESH.
    refused_pathless: bool,
    /// The session task, aborted when the session is reset.
    task: tokio::task::AbortHandle,
    refusals_logged: usize,
    /// Kept through the peer's graceful restart, until End-of-RIB.
    stale: FxHashSet<IpNet>,
    stale_until: Option<Instant>,
    last_error: Option<String>,
}

impl Peer {
    fn target(&self) -> Option<Target> {
        let r = self.remote.as_ref()?;
        Some(Target {
            addr: self.spec.addr,
            ebgp: self.spec.asn != self.spec.local_as,
            rr_client: self.spec.kind == PeerKind::RrClient,
            local_addr: r.local,
        })
    }

    fn established(&self) -> bool {
        self.state == State::Established && self.remote.is_some()
    }
}

struct Core {
    cfg: SpeakerConfig,
    me: Me,
    exporter: Exporter,
    rib: Rib,
    local: BTreeSet<IpNet>,
    /// of those, the ones only external peers get
    external_only: BTreeSet<IpNet>,
    peers: HashMap<IpAddr, Peer>,
    next_gen: u64,
    /// Times each peer's session reached Established (kept across session
    /// resets and peer changes: a flap shows as growth).
    established: HashMap<IpAddr, u64>,
    /// Sessions to reset once the current event is handled (never in the
    /// middle of an export, which would reorder UPDATEs to other peers).
    resets: Vec<IpAddr>,
    listener: Option<Arc<TcpListener>>,
    /// Connections from addresses not (yet) configured as peers, kept for a
    /// moment: the peer often learns of us a little before we learn of it.
    pending: HashMap<IpAddr, (tokio::net::TcpStream, Instant)>,
    feed: FeedTx,
    sessions: mpsc::Sender<SessionMsg>,
}

pub(super) async fn run(
    cfg: SpeakerConfig,
    listener: Option<Arc<TcpListener>>,
    mut cmds: mpsc::Receiver<Cmd>,
    feed: FeedTx,
) {
    let (stx, mut srx) = mpsc::channel(TO_CORE_QUEUE);
    let (itx, mut irx) = mpsc::channel::<(tokio::net::TcpStream, SocketAddr)>(ACCEPT_QUEUE);
    let acceptor = listener.as_ref().map(|l| {
        let l = l.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    () = itx.closed() => return,
                };
                match accepted {
                    Ok(c) => {
                        // waits while the core is busy: accepting pauses
                        if itx.send(c).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bgp: accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    });
    let mut core = Core {
        me: Me {
            asn: cfg.asn,
            router_id: cfg.router_id,
            cluster_id: cfg.cluster_id,
        },
        exporter: Exporter {
            asn: cfg.asn,
            cluster_id: cfg.cluster_id,
        },
        cfg,
        rib: Rib::new(),
        local: BTreeSet::new(),
        external_only: BTreeSet::new(),
        peers: HashMap::new(),
        next_gen: 1,
        established: HashMap::new(),
        resets: Vec::new(),
        listener,
        pending: HashMap::new(),
        feed,
        sessions: stx,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                // the handle was dropped: end like a crash, without Cease
                None => return,
                Some(Cmd::Shutdown(done)) => {
                    core.stop_all();
                    // the port is free once shutdown returns: the acceptor
                    // (holding the listener) has ended and the core's copy is gone
                    if let Some(a) = acceptor {
                        a.abort();
                        let _ = a.await;
                    }
                    core.listener = None;
                    let _ = done.send(());
                    return;
                }
                Some(c) => { core.command(c); core.run_resets(); }
            },
            Some(m) = srx.recv() => { core.on_session(m); core.run_resets(); }
            Some((stream, from)) = irx.recv() => { core.incoming(stream, from); core.run_resets(); }
            _ = tick.tick() => { core.expire_stale(); core.run_resets(); }
        }
    }
}

/// The peer's graceful-restart capability for IPv4 unicast: (restart
/// time, forwarding state kept (F bit)), if it lists the family.
fn gr_of(open: &Open) -> Option<(u16, bool)> {
    open.capabilities.iter().find_map(|c| match c {
        Capability::GracefulRestart { time, families, .. } => families
            .iter()
            .find(|(afi, safi, _)| *afi == AFI_IPV4 && *safi == SAFI_UNICAST)
            .map(|(_, _, f)| (*time, *f)),
        _ => None,
    })
}

impl Core {
    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::SetPeers(specs) => self.set_peers(specs),
            Cmd::Announce(p) => {
                let moved = self.external_only.remove(&p);
                if self.local.insert(p) || moved {
                    self.export_prefixes(&[p], None);
                }
            }
            Cmd::AnnounceExternal(p) => {
                let moved = self.external_only.insert(p);
                if self.local.insert(p) || moved {
                    self.export_prefixes(&[p], None);
                }
            }
            Cmd::Withdraw(p) => {
                self.external_only.remove(&p);
                if self.local.remove(&p) {
                    self.export_prefixes(&[p], None);
                }
            }
            Cmd::SetPolicy(p) => self.set_policy(p),
            Cmd::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Cmd::LocRib(tx) => {
                let _ = tx.send(self.rib.loc_rib().len());
            }
            Cmd::Shutdown(_) => {}
        }
    }

    fn stop_all(&mut self) {
        for (_, p) in self.peers.drain() {
            let _ = p.tx.try_send(ToSession::Stop);
        }
    }

    fn set_peers(&mut self, specs: Vec<PeerSpec>) {
        let want: HashMap<IpAddr, PeerSpec> = specs.into_iter().map(|s| (s.addr, s)).collect();
        let gone: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(a, p)| want.get(a) != Some(&p.spec))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            tracing::info!(peer = %a, "bgp: peer removed or changed; stopping its session");
            self.remove_peer(a);
        }
        for (a, spec) in want {
            if !self.peers.contains_key(&a) {
                self.add_peer(spec);
            }
        }
    }

    /// Stops the peer's session (with a Cease when its queue has room) and
    /// withdraws what it gave us.
    fn remove_peer(&mut self, a: IpAddr) -> Option<PeerSpec> {
        let p = self.peers.remove(&a)?;
        if p.tx.try_send(ToSession::Stop).is_err() {
            // no room for the Cease: end the session now
            p.task.abort();
        }
        self.set_md5(&p.spec, None);
        let changes = self.rib.peer_down(&a);
        self.propagate(changes);
        Some(p.spec)
    }

    /// Starts a session for `spec`.
    fn add_peer(&mut self, spec: PeerSpec) {
        let a = spec.addr;
        self.set_md5(&spec, spec.password.as_deref());
        let gen = self.next_gen;
        self.next_gen += 1;
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let pc = PeerConfig {
            local_as: spec.local_as,
            router_id: self.cfg.router_id,
            remote_as: spec.asn,
            hold_time: self.cfg.hold_time,
            connect_retry: self.cfg.connect_retry,
            restart_time: self.cfg.restart_time,
            restarting: self.cfg.restarting,
        };
        let task = tokio::spawn(session::run(
            spec.clone(),
            pc,
            gen,
            rx,
            self.sessions.clone(),
        ))
        .abort_handle();
        if let Some((stream, _)) = self.pending.remove(&a) {
            let _ = tx.try_send(ToSession::Incoming(stream));
        }
        self.peers.insert(
            a,
            Peer {
                spec,
                gen,
                tx,
                state: State::Idle,
                since: Instant::now(),
                remote: None,
                adj_out: FxHashMap::default(),
                refused: FxHashMap::default(),
                refused_pathless: false,
                task,
                refusals_logged: 0,
                stale: FxHashSet::default(),
                stale_until: None,
                last_error: None,
            },
        );
    }

    /// Hands `msg` to the peer's session without waiting. A full queue
    /// means the session cannot write (the peer stopped reading, or is far
    /// slower than the routes change): the session is reset after the
    /// current event, and the peer gets the full table when it is back.
    fn send_to_session(&mut self, addr: IpAddr, msg: ToSession) {
        let Some(p) = self.peers.get(&addr) else {
            return;
        };
        match p.tx.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.resets.contains(&addr) {
                    self.resets.push(addr);
                }
            }
        }
    }

    /// Resets the sessions whose queues overflowed: the old task is
    /// aborted (its connection closes at once, even mid-write), the peer's
    /// routes are withdrawn, a new session starts.
    fn run_resets(&mut self) {
        for addr in std::mem::take(&mut self.resets) {
            let Some(p) = self.peers.get(&addr) else {
                continue;
            };
            tracing::warn!(
                peer = %addr,
                queued = SESSION_QUEUE,
                "bgp: session is not keeping up with its queue; resetting it"
            );
            p.task.abort();
            if let Some(spec) = self.remove_peer(addr) {
                self.add_peer(spec);
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.last_error = Some(format!(
                        "reset: {SESSION_QUEUE} message batches queued and not written"
                    ));
                }
            }
        }
    }

    fn set_md5(&self, spec: &PeerSpec, key: Option<&str>) {
        let (Some(l), Some(_)) = (&self.listener, spec.password.as_ref()) else {
            return;
        };
        let key = key.unwrap_or("");
        if let Err(e) =
            crate::md5::set_md5(l.as_fd(), SocketAddr::new(spec.addr, 0), key.as_bytes())
        {
            tracing::warn!("bgp: TCP MD5 key for {}: {e}", spec.addr);
        }
    }

    fn incoming(&mut self, stream: tokio::net::TcpStream, from: SocketAddr) {
        if self.peers.contains_key(&from.ip()) {
            self.send_to_session(from.ip(), ToSession::Incoming(stream));
        } else {
            tracing::debug!(%from, "bgp: connection from an address that is not a configured peer (yet)");
            self.pending.insert(from.ip(), (stream, Instant::now()));
        }
    }

    fn on_session(&mut self, m: SessionMsg) {
        let Some(p) = self.peers.get_mut(&m.peer) else {
            return;
        };
        if p.gen != m.gen {
            return;
        }
        let addr = m.peer;
        match m.msg {
            FromSession::State(s) => {
                if s != p.state {
                    p.state = s;
                    p.since = Instant::now();
                }
            }
            FromSession::Note { text, log } => {
                if log {
                    tracing::warn!(peer = %addr, "bgp: {text}");
                }
                p.last_error = Some(text);
            }
            FromSession::Up { open, local } => {
                tracing::info!(peer = %addr, asn = open.asn, id = %open.id, "bgp: session established");
                *self.established.entry(addr).or_default() += 1;
                p.remote = Some(Remote {
                    router_id: open.id,
                    asn: open.asn,
                    local: local.unwrap_or(IpAddr::V4(self.cfg.router_id)),
                    gr: gr_of(&open),
                    refresh: open
                        .capabilities
                        .iter()
                        .any(|c| matches!(c, Capability::RouteRefresh)),
                    v6: open
                        .capabilities
                        .contains(&Capability::MultiProtocol(AFI_IPV6, SAFI_UNICAST)),
                });
                p.state = State::Established;
                p.since = Instant::now();
                p.refusals_logged = 0;
                let kept_forwarding = gr_of(&open).is_some_and(|(_, f)| f);
                if !p.stale.is_empty() && !kept_forwarding {
                    // back without forwarding state: the stale routes
                    // lead nowhere
                    let stale: Vec<IpNet> = p.stale.drain().collect();
                    p.stale_until = None;
                    let changes = self.rib.update(addr, vec![], &stale);
                    self.propagate(changes);
                }
                self.send_full_table(addr);
            }
            FromSession::Down { why, graceful } => {
                tracing::info!(peer = %addr, why = %why, "bgp: session down");
                p.last_error = Some(why);
                p.adj_out.clear();
                p.refused.clear();
                p.refused_pathless = false;
                let gr = p.remote.take().and_then(|r| r.gr);
                match gr {
                    // RFC 4724 4.2: keep what the peer listed in its
                    // capability, marked stale
                    Some((time, _)) if graceful && time > 0 => {
                        p.stale = self
                            .rib
                            .adj_in(&addr)
                            .map(|t| t.keys().copied().collect())
                            .unwrap_or_default();
                        p.stale_until = Some(Instant::now() + Duration::from_secs(time.into()));
                        tracing::info!(peer = %addr, routes = p.stale.len(), seconds = time, "bgp: peer restarting gracefully; keeping its routes as stale");
                    }
                    _ => {
                        p.stale.clear();
                        p.stale_until = None;
                        let changes = self.rib.peer_down(&addr);
                        self.propagate(changes);
                    }
                }
            }
            FromSession::Update(u) => self.update(addr, u),
            FromSession::Refresh(afi, safi) => {
                tracing::debug!(peer = %addr, afi, safi, "bgp: peer asks for a refresh");
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.adj_out.clear();
                }
                self.send_full_table(addr);
            }
        }
    }

    fn expire_stale(&mut self) {
        let now = Instant::now();
        self.pending
            .retain(|_, (_, at)| now.duration_since(*at) < PENDING_GRACE);
        let due: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            if let Some(p) = self.peers.get_mut(&addr) {
                let stale: Vec<IpNet> = p.stale.drain().collect();
                p.stale_until = None;
                tracing::info!(peer = %addr, routes = stale.len(), "bgp: restart time over; stale routes withdrawn");
                let changes = self.rib.update(addr, vec![], &stale);
                self.propagate(changes);
            }
        }
    }

    fn status(&self) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| {
                let accepted = self.rib.received(&p.spec.addr);
                PeerStatus {
                    addr: p.spec.addr,
                    asn: p.spec.asn,
                    kind: p.spec.kind.as_str().into(),
                    state: format!("{:?}", p.state),
                    since_secs: p.since.elapsed().as_secs(),
                    router_id: p.remote.as_ref().map(|r| r.router_id),
                    received: accepted + p.refused.len(),
                    established_count: self.established.get(&p.spec.addr).copied().unwrap_or(0),
                    accepted,
                    advertised: p.adj_out.len(),
                    stale: p.stale.len(),
                    // an old error is noise once the session is up
                    last_error: if p.state == State::Established {
                        None
                    } else {
                        p.last_error.clone()
                    },
                }
            })
            .collect();
        out.sort_by_key(|s| s.addr);
        out
    }
}
