//! The core task: RIBs, import policy, export per peer (Adj-RIB-Out),
//! graceful restart (stale routes kept until End-of-RIB or the restart
//! time), peer set changes.

use super::out::{end_of_rib, is_end_of_rib, Batch};
use super::session::{self, ToSession};
use super::{
    Cmd, FromSession, PeerKind, PeerSpec, PeerStatus, RouteEvent, SessionMsg, SpeakerConfig,
};
use crate::export::{Attrs, Exporter, Source, Target};
use crate::fsm::{PeerConfig, State};
use crate::import::{import, FromPeer, ImportPolicy, Me, Refusal};
use crate::rib::{Change, Rib};
use crate::wire::{Capability, Message, Open, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a connection from an unknown address waits to become a peer.
const PENDING_GRACE: Duration = Duration::from_secs(3);

/// Most refusals logged per peer per session (the rest are counted).
const LOGGED_REFUSALS: usize = 20;

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
    tx: mpsc::UnboundedSender<ToSession>,
    state: State,
    since: Instant,
    remote: Option<Remote>,
    /// What the peer last learned from us.
    adj_out: FxHashMap<IpNet, Attrs>,
    /// Announced to us but refused.
    refused: FxHashSet<IpNet>,
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
    peers: HashMap<IpAddr, Peer>,
    next_gen: u64,
    listener: Option<Arc<TcpListener>>,
    /// Connections from addresses not (yet) configured as peers, kept for a
    /// moment: the peer often learns of us a little before we learn of it.
    pending: HashMap<IpAddr, (tokio::net::TcpStream, Instant)>,
    events: mpsc::UnboundedSender<Vec<RouteEvent>>,
    sessions: mpsc::UnboundedSender<SessionMsg>,
}

pub(super) async fn run(
    cfg: SpeakerConfig,
    listener: Option<Arc<TcpListener>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Vec<RouteEvent>>,
) {
    let (stx, mut srx) = mpsc::unbounded_channel();
    let (itx, mut irx) = mpsc::unbounded_channel::<(tokio::net::TcpStream, SocketAddr)>();
    if let Some(l) = &listener {
        let l = l.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    () = itx.closed() => return,
                };
                match accepted {
                    Ok(c) => {
                        if itx.send(c).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("bgp: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
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
        peers: HashMap::new(),
        next_gen: 1,
        listener,
        pending: HashMap::new(),
        events,
        sessions: stx,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                // the handle was dropped: end like a crash, without Cease
                None => return,
                Some(Cmd::Shutdown(done)) => { core.stop_all(); let _ = done.send(()); return; }
                Some(c) => core.command(c),
            },
            Some(m) = srx.recv() => core.on_session(m),
            Some((stream, from)) = irx.recv() => core.incoming(stream, from),
            _ = tick.tick() => core.expire_stale(),
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
                if self.local.insert(p) {
                    self.export_prefixes(&[p], None);
                }
            }
            Cmd::Withdraw(p) => {
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
            let _ = p.tx.send(ToSession::Stop);
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
            if let Some(p) = self.peers.remove(&a) {
                tracing::info!("bgp: peer {a} removed or changed; stopping its session");
                let _ = p.tx.send(ToSession::Stop);
                self.set_md5(&p.spec, None);
                let changes = self.rib.peer_down(&a);
                self.propagate(changes);
            }
        }
        for (a, spec) in want {
            if self.peers.contains_key(&a) {
                continue;
            }
            self.set_md5(&spec, spec.password.as_deref());
            let gen = self.next_gen;
            self.next_gen += 1;
            let (tx, rx) = mpsc::unbounded_channel();
            let pc = PeerConfig {
                local_as: spec.local_as,
                router_id: self.cfg.router_id,
                remote_as: spec.asn,
                hold_time: self.cfg.hold_time,
                connect_retry: self.cfg.connect_retry,
                restart_time: self.cfg.restart_time,
                restarting: self.cfg.restarting,
            };
            tokio::spawn(session::run(
                spec.clone(),
                pc,
                gen,
                rx,
                self.sessions.clone(),
            ));
            if let Some((stream, _)) = self.pending.remove(&a) {
                let _ = tx.send(ToSession::Incoming(stream));
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
                    refused: FxHashSet::default(),
                    refusals_logged: 0,
                    stale: FxHashSet::default(),
                    stale_until: None,
                    last_error: None,
                },
            );
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
        match self.peers.get(&from.ip()) {
            Some(p) => {
                let _ = p.tx.send(ToSession::Incoming(stream));
            }
            None => {
                tracing::debug!("bgp: connection from {from}, not a configured peer (yet)");
                self.pending.insert(from.ip(), (stream, Instant::now()));
            }
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
            FromSession::Note(n) => {
                tracing::info!("bgp: peer {addr}: {n}");
                p.last_error = Some(n);
            }
            FromSession::Up { open, local } => {
                tracing::info!(
                    "bgp: peer {addr} (AS {}, id {}) established",
                    open.asn,
                    open.id
                );
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
                tracing::info!("bgp: peer {addr} down: {why}");
                p.last_error = Some(why);
                p.adj_out.clear();
                p.refused.clear();
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
                        tracing::info!(
                            "bgp: peer {addr} restarting gracefully: keeping {} routes for {time} s",
                            p.stale.len()
                        );
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
                tracing::debug!("bgp: peer {addr} asks for a refresh of {afi}/{safi}");
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.adj_out.clear();
                }
                self.send_full_table(addr);
            }
        }
    }

    fn update(&mut self, addr: IpAddr, u: crate::wire::Update) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(r) = &p.remote else { return };
        if is_end_of_rib(&u) {
            let stale: Vec<IpNet> = p.stale.drain().collect();
            p.stale_until = None;
            if !stale.is_empty() {
                tracing::info!(
                    "bgp: peer {addr}: End-of-RIB; {} stale routes go",
                    stale.len()
                );
            }
            let changes = self.rib.update(addr, vec![], &stale);
            self.propagate(changes);
            let _ = self.events.send(vec![RouteEvent::EndOfRib { peer: addr }]);
            return;
        }
        if let Some(n) = &u.treat_as_withdraw {
            tracing::warn!(
                "bgp: peer {addr}: malformed attribute ({}); routes treated as withdrawn",
                n.describe()
            );
        }
        let from = FromPeer {
            addr,
            router_id: r.router_id,
            asn: r.asn,
            ebgp: r.asn != p.spec.local_as,
        };
        let imp = import(u, &from, &self.me);
        let from_node = p.spec.kind != PeerKind::External;
        let mut withdrawn = imp.withdrawn;
        for w in &withdrawn {
            if !p.refused.is_empty() {
                p.refused.remove(w);
            }
            if !p.stale.is_empty() {
                p.stale.remove(w);
            }
        }
        let mut refusals = imp.refused;
        let mut accepted = Vec::with_capacity(imp.announced.len());
        let held = self.rib.received(&addr);
        let max = if p.spec.max_prefixes > 0 {
            p.spec.max_prefixes
        } else {
            self.cfg.policy.max_prefixes
        };
        for (prefix, path) in imp.announced {
            if !p.stale.is_empty() {
                p.stale.remove(&prefix);
            }
            let verdict = self
                .cfg
                .policy
                .check(&prefix, path.originator(), from_node)
                .and_then(|()| {
                    let known = self
                        .rib
                        .adj_in(&addr)
                        .is_some_and(|t| t.contains_key(&prefix));
                    if max > 0 && !known && held + accepted.len() >= max {
                        Err(Refusal::Limit(prefix, max))
                    } else {
                        Ok(())
                    }
                });
            match verdict {
                Ok(()) => {
                    if !p.refused.is_empty() {
                        p.refused.remove(&prefix);
                    }
                    accepted.push((prefix, path));
                }
                Err(why) => {
                    p.refused.insert(prefix);
                    withdrawn.push(prefix);
                    refusals.push(why);
                }
            }
        }
        for why in refusals {
            if p.refusals_logged < LOGGED_REFUSALS {
                tracing::warn!("bgp: peer {addr}: refused {why}");
            }
            p.refusals_logged += 1;
            if p.refusals_logged == LOGGED_REFUSALS {
                tracing::warn!("bgp: peer {addr}: further refusals are counted, not logged");
            }
        }
        let changes = self.rib.update(addr, accepted, &withdrawn);
        self.propagate(changes);
    }

    fn set_policy(&mut self, policy: ImportPolicy) {
        if policy == self.cfg.policy {
            return;
        }
        self.cfg.policy = policy;
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for addr in addrs {
            let from_node = self
                .peers
                .get(&addr)
                .is_some_and(|p| p.spec.kind != PeerKind::External);
            let bad: Vec<IpNet> = self
                .rib
                .adj_in(&addr)
                .map(|t| {
                    t.iter()
                        .filter(|(p, path)| {
                            self.cfg
                                .policy
                                .check(p, path.originator(), from_node)
                                .is_err()
                        })
                        .map(|(p, _)| *p)
                        .collect()
                })
                .unwrap_or_default();
            if !bad.is_empty() {
                let changes = self.rib.update(addr, vec![], &bad);
                self.propagate(changes);
            }
            if let Some(p) = self.peers.get_mut(&addr) {
                let refreshable = p.remote.as_ref().is_some_and(|r| r.refresh);
                if !p.refused.is_empty() && p.established() && refreshable {
                    // routes refused under the old policy may pass now
                    p.refused.clear();
                    let mut msgs = vec![Message::RouteRefresh(AFI_IPV4, SAFI_UNICAST)];
                    if p.remote.as_ref().is_some_and(|r| r.v6) {
                        msgs.push(Message::RouteRefresh(AFI_IPV6, SAFI_UNICAST));
                    }
                    let _ = p.tx.send(ToSession::Send(msgs));
                }
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
                tracing::info!(
                    "bgp: peer {addr}: restart time over; {} stale routes withdrawn",
                    stale.len()
                );
                let changes = self.rib.update(addr, vec![], &stale);
                self.propagate(changes);
            }
        }
    }

    /// Tells the agent, then every established peer, about changed best paths.
    fn propagate(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut prefixes = Vec::with_capacity(changes.len());
        let mut events = Vec::with_capacity(changes.len());
        for c in changes {
            match c {
                Change::Best(prefix, peer, path) => {
                    events.push(RouteEvent::Best {
                        prefix,
                        next_hop: path.next_hop,
                        peer,
                    });
                    prefixes.push(prefix);
                }
                Change::Gone(prefix) => {
                    events.push(RouteEvent::Gone { prefix });
                    prefixes.push(prefix);
                }
            }
        }
        let _ = self.events.send(events);
        // learned routes go to peers only when we reflect them
        if self.exporter.cluster_id.is_none() {
            prefixes.retain(|p| self.local.contains(p));
        }
        if !prefixes.is_empty() {
            self.export_prefixes(&prefixes, None);
        }
    }

    fn source_of(&self, prefix: &IpNet) -> Option<Source<'_>> {
        if self.local.contains(prefix) {
            return Some(Source::Local);
        }
        let (from, path) = self.rib.loc_rib().get(prefix)?;
        let from_client = self
            .peers
            .get(from)
            .is_some_and(|p| p.spec.kind == PeerKind::RrClient);
        Some(Source::Learned {
            from: *from,
            from_client,
            path,
        })
    }

    /// Brings the Adj-RIB-Out of `only` (or of every established peer) in
    /// line for `prefixes`, sending the differences.
    fn export_prefixes(&mut self, prefixes: &[IpNet], only: Option<IpAddr>) {
        let targets: Vec<(IpAddr, Target, bool)> = self
            .peers
            .iter()
            .filter(|(a, p)| p.established() && only.is_none_or(|o| o == **a))
            .filter_map(|(a, p)| Some((*a, p.target()?, p.remote.as_ref()?.v6)))
            .collect();
        let mut batches: Vec<(IpAddr, Batch)> = Vec::with_capacity(targets.len());
        for (addr, target, v6) in targets {
            let mut batch = Batch::default();
            let mut set = Vec::new();
            for prefix in prefixes {
                if prefix.addr().is_ipv6() && !v6 {
                    continue;
                }
                let want = self
                    .source_of(prefix)
                    .and_then(|src| self.exporter.export(prefix, src, &target));
                set.push((*prefix, want));
            }
            let Some(p) = self.peers.get_mut(&addr) else {
                continue;
            };
            for (prefix, want) in set {
                match want {
                    Some(a) => {
                        if p.adj_out.get(&prefix) != Some(&a) {
                            p.adj_out.insert(prefix, a.clone());
                            batch.announce(prefix, a);
                        }
                    }
                    None => {
                        if p.adj_out.remove(&prefix).is_some() {
                            batch.withdraw(prefix);
                        }
                    }
                }
            }
            if !batch.is_empty() {
                batches.push((addr, batch));
            }
        }
        for (addr, batch) in batches {
            if let Some(p) = self.peers.get(&addr) {
                let msgs = batch
                    .into_updates()
                    .into_iter()
                    .map(Message::Update)
                    .collect();
                let _ = p.tx.send(ToSession::Send(msgs));
            }
        }
    }

    fn send_full_table(&mut self, addr: IpAddr) {
        let mut all: Vec<IpNet> = self.local.iter().copied().collect();
        all.extend(self.rib.loc_rib().keys().copied());
        self.export_prefixes(&all, Some(addr));
        if let Some(p) = self.peers.get(&addr) {
            let mut msgs = vec![Message::Update(end_of_rib(false))];
            if p.remote.as_ref().is_some_and(|r| r.v6) {
                msgs.push(Message::Update(end_of_rib(true)));
            }
            let _ = p.tx.send(ToSession::Send(msgs));
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
                    kind: p.spec.kind,
                    state: format!("{:?}", p.state),
                    since_secs: p.since.elapsed().as_secs(),
                    router_id: p.remote.as_ref().map(|r| r.router_id),
                    received: accepted + p.refused.len(),
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
