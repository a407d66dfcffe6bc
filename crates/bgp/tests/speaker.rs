//! Speakers talking to each other over loopback (127.0.0.x, each its own
//! router): mesh, route reflection with loop prevention, import policy,
//! max-prefix, withdrawal on session loss and graceful restart.

use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;
use trellis_bgp::import::ImportPolicy;
use trellis_bgp::{PeerKind, PeerSpec, RouteEvent, Speaker, SpeakerConfig};

fn port() -> u16 {
    // one port per test process: tests in this file run in parallel,
    // so each test gets its own loopback addresses instead
    17900 + (std::process::id() % 1000) as u16
}

fn ip(n: u8, base: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, base, n))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

struct Node {
    speaker: Speaker,
    events: trellis_bgp::RouteFeed,
    routes: BTreeMap<IpNet, IpAddr>,
}

impl Node {
    fn drain(&mut self) {
        while let Ok(evs) = self.events.try_recv() {
            for ev in evs {
                match ev {
                    RouteEvent::Best {
                        prefix, next_hop, ..
                    } => {
                        self.routes.insert(prefix, next_hop);
                    }
                    RouteEvent::Gone { prefix } => {
                        self.routes.remove(&prefix);
                    }
                    RouteEvent::EndOfRib { .. } => {}
                }
            }
        }
    }

    async fn wait_for(&mut self, what: &str, cond: impl Fn(&BTreeMap<IpNet, IpAddr>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.drain();
            if cond(&self.routes) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: routes {:?}",
                self.routes
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn cfg(n: u8, base: u8, cluster: Option<Ipv4Addr>, policy: ImportPolicy) -> SpeakerConfig {
    SpeakerConfig {
        asn: 64512,
        router_id: Ipv4Addr::new(127, 0, base, n),
        listen: Some(SocketAddr::new(ip(n, base), port())),
        cluster_id: cluster,
        hold_time: 9,
        connect_retry: Duration::from_millis(300),
        restart_time: 0,
        restarting: false,
        policy,
    }
}

fn peer(n: u8, base: u8, me: u8, kind: PeerKind) -> PeerSpec {
    PeerSpec {
        addr: ip(n, base),
        port: port(),
        asn: 64512,
        local_as: 64512,
        kind,
        password: None,
        // the lower address dials, the higher one waits
        passive: me > n,
        multihop: false,
        local_addr: Some(ip(me, base)),
        max_prefixes: 0,
    }
}

async fn start(n: u8, base: u8, cluster: Option<Ipv4Addr>, policy: ImportPolicy) -> Node {
    let (speaker, events) = Speaker::start(cfg(n, base, cluster, policy))
        .await
        .expect("start speaker");
    Node {
        speaker,
        events,
        routes: BTreeMap::new(),
    }
}

fn subnet(n: u8) -> IpNet {
    net(&format!("10.244.{n}.0/24"))
}

/// Only node subnets, each from its owner.
fn node_policy(base: u8, nodes: &[u8], me: u8) -> ImportPolicy {
    ImportPolicy {
        inside: vec![net("10.244.0.0/16")],
        owners: Some(
            nodes
                .iter()
                .map(|n| (Ipv4Addr::new(127, 0, base, *n), subnet(*n)))
                .collect::<HashMap<_, _>>(),
        ),
        own: vec![subnet(me)],
        max_prefixes: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mesh_learns_every_subnet_and_forgets_a_dead_peer() {
    let base = 11;
    let ids = [1u8, 2, 3];
    let mut nodes = Vec::new();
    for &n in &ids {
        let node = start(n, base, None, node_policy(base, &ids, n)).await;
        node.speaker.announce(subnet(n)).await;
        node.speaker
            .set_peers(
                ids.iter()
                    .filter(|&&m| m != n)
                    .map(|&m| peer(m, base, n, PeerKind::Mesh))
                    .collect(),
            )
            .await;
        nodes.push(node);
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let me = ids[i];
        node.wait_for("mesh", |r| {
            ids.iter()
                .filter(|&&m| m != me)
                .all(|&m| r.get(&subnet(m)) == Some(&ip(m, base)))
        })
        .await;
        assert_eq!(node.routes.len(), 2, "only the other nodes' subnets");
    }
    let st = nodes[0].speaker.status().await;
    assert_eq!(st.len(), 2);
    assert!(st
        .iter()
        .all(|p| p.state == "Established" && p.accepted == 1 && p.advertised == 1));
    // node 3 stops: the others withdraw its subnet
    nodes[2].speaker.shutdown().await;
    for node in nodes.iter_mut().take(2) {
        node.wait_for("withdrawn", |r| !r.contains_key(&subnet(3)))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_passes_routes_between_clients_only_once() {
    let base = 12;
    let ids = [1u8, 2, 3, 4];
    let cluster = Some(Ipv4Addr::new(0, 0, 0, 1));
    // 1 reflects for 2, 3, 4; clients peer with 1 only
    let mut nodes = Vec::new();
    for &n in &ids {
        let rr = n == 1;
        let node = start(
            n,
            base,
            if rr { cluster } else { None },
            node_policy(base, &ids, n),
        )
        .await;
        node.speaker.announce(subnet(n)).await;
        let peers = if rr {
            ids[1..]
                .iter()
                .map(|&m| peer(m, base, n, PeerKind::RrClient))
                .collect()
        } else {
            vec![peer(1, base, n, PeerKind::Reflector)]
        };
        node.speaker.set_peers(peers).await;
        nodes.push(node);
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let me = ids[i];
        node.wait_for("reflected", |r| {
            ids.iter()
                .filter(|&&m| m != me)
                .all(|&m| r.get(&subnet(m)) == Some(&ip(m, base)))
        })
        .await;
    }
    // every client has exactly one session; the reflector advertises the
    // other three subnets to each client (its own plus two reflected)
    let st = nodes[0].speaker.status().await;
    assert_eq!(st.len(), 3);
    assert!(st.iter().all(|p| p.advertised == 3), "{st:?}");
    assert_eq!(nodes[1].speaker.status().await.len(), 1);
    // a client's own route never comes back to it (ORIGINATOR_ID)
    assert!(!nodes[1].routes.contains_key(&subnet(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refuses_outside_and_foreign_prefixes_and_enforces_max_prefix() {
    let base = 13;
    let a = start(1, base, None, node_policy(base, &[1, 2], 1)).await;
    let mut a = a;
    let b = start(2, base, None, ImportPolicy::default()).await;
    a.speaker
        .set_peers(vec![peer(2, base, 1, PeerKind::Mesh)])
        .await;
    b.speaker
        .set_peers(vec![peer(1, base, 2, PeerKind::Mesh)])
        .await;
    // node 2 owns 10.244.2.0/24 but also announces a subnet it does not
    // hold, one outside the cluster network and node 1's own
    for p in [subnet(2), subnet(7), net("192.168.50.0/24"), subnet(1)] {
        b.speaker.announce(p).await;
    }
    a.wait_for("owned subnet", |r| r.contains_key(&subnet(2)))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.drain();
    assert_eq!(
        a.routes.keys().copied().collect::<Vec<_>>(),
        vec![subnet(2)]
    );
    let st = a.speaker.status().await;
    assert_eq!((st[0].received, st[0].accepted), (4, 1), "{st:?}");
    // the lease of 10.244.7.0/24 moves to node 2: a route refresh brings it in
    a.speaker
        .set_policy(ImportPolicy {
            owners: Some(HashMap::from([(Ipv4Addr::new(127, 0, base, 2), subnet(7))])),
            ..node_policy(base, &[1, 2], 1)
        })
        .await;
    a.wait_for("after policy change", |r| {
        r.contains_key(&subnet(7)) && !r.contains_key(&subnet(2))
    })
    .await;

    // max-prefix: 2 of 5
    let base = 14;
    let mut c = start(1, base, None, ImportPolicy::default()).await;
    let d = start(2, base, None, ImportPolicy::default()).await;
    let mut p = peer(2, base, 1, PeerKind::External);
    p.max_prefixes = 2;
    c.speaker.set_peers(vec![p]).await;
    d.speaker
        .set_peers(vec![peer(1, base, 2, PeerKind::External)])
        .await;
    for i in 0..5 {
        d.speaker.announce(subnet(100 + i)).await;
    }
    c.wait_for("two", |r| r.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.drain();
    assert_eq!(c.routes.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_routes_until_end_of_rib() {
    let base = 15;
    let mut a = start(1, base, None, ImportPolicy::default()).await;
    let gr = |n: u8, restarting: bool| SpeakerConfig {
        restart_time: 30,
        restarting,
        ..cfg(n, base, None, ImportPolicy::default())
    };
    let (a2, ev) = {
        // a speaks GR too
        a.speaker.shutdown().await;
        Speaker::start(gr(1, false)).await.expect("a")
    };
    a.speaker = a2;
    a.events = ev;
    a.speaker
        .set_peers(vec![peer(2, base, 1, PeerKind::Mesh)])
        .await;
    let (b, _bev) = Speaker::start(gr(2, false)).await.expect("b");
    b.speaker_setup(base).await;
    b.announce(subnet(2)).await;
    b.announce(subnet(22)).await;
    a.wait_for("learned", |r| r.len() == 2).await;
    // b "crashes" (its sessions end without a Cease) and comes back
    // restarting, with only one of its two subnets
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.drain();
    assert_eq!(a.routes.len(), 2, "kept as stale during the restart");
    let st = a.speaker.status().await;
    assert_eq!(st[0].stale, 2, "{st:?}");
    let (b, _bev) = Speaker::start(gr(2, true)).await.expect("b again");
    b.announce(subnet(2)).await;
    b.speaker_setup(base).await;
    a.wait_for("stale one gone after End-of-RIB", |r| {
        r.contains_key(&subnet(2)) && !r.contains_key(&subnet(22))
    })
    .await;
    assert_eq!(a.speaker.status().await[0].stale, 0);
}

trait Setup {
    async fn speaker_setup(&self, base: u8);
}

impl Setup for Speaker {
    async fn speaker_setup(&self, base: u8) {
        self.set_peers(vec![peer(1, base, 2, PeerKind::Mesh)]).await;
    }
}

mod raw {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};
    use trellis_bgp::wire::{AFI_IPV4, SAFI_UNICAST};
    use trellis_bgp::{
        decode, encode, Capability, Ctx, Message, Notification, Open, PathAttribute, Update,
    };

    const CTX: Ctx = Ctx {
        four_octet_as: true,
    };

    pub async fn connect(base: u8) -> TcpStream {
        connect_with(base, None).await
    }

    /// Connects as peer 2 of `base`, with a receive buffer of `rcvbuf`
    /// bytes when given (a tiny window: a peer that reads slowly or not).
    pub async fn connect_with(base: u8, rcvbuf: Option<u32>) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = TcpSocket::new_v4().expect("socket");
            if let Some(b) = rcvbuf {
                s.set_recv_buffer_size(b).expect("rcvbuf");
            }
            s.bind(SocketAddr::new(ip(2, base), 0)).expect("bind");
            match s.connect(SocketAddr::new(ip(1, base), port())).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    }

    pub fn open(asn: u32, base: u8) -> Vec<u8> {
        encode(
            &Message::Open(Open {
                asn,
                hold_time: 9,
                id: Ipv4Addr::new(127, 0, base, 2),
                capabilities: vec![
                    Capability::MultiProtocol(AFI_IPV4, SAFI_UNICAST),
                    Capability::FourOctetAs(asn),
                ],
            }),
            Ctx::default(),
        )
    }

    /// Reads messages until a NOTIFICATION or the connection closes.
    pub async fn notification(s: &mut TcpStream) -> Option<Notification> {
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while let Ok(Some((m, n))) = decode(&buf, CTX) {
                buf.drain(..n);
                if let Message::Notification(x) = m {
                    return Some(x);
                }
            }
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn established(base: u8) -> TcpStream {
        let mut s = connect(base).await;
        s.write_all(&open(64512, base)).await.expect("open");
        s.write_all(&encode(&Message::Keepalive, CTX))
            .await
            .expect("ka");
        s
    }

    pub fn update(prefix: &str, origin_flags: u8) -> Vec<u8> {
        let mut bytes = encode(
            &Message::Update(Update {
                attributes: vec![
                    PathAttribute::Origin(0),
                    PathAttribute::AsPath(vec![]),
                    PathAttribute::NextHop(Ipv4Addr::new(127, 0, 16, 2)),
                    PathAttribute::LocalPref(100),
                ],
                nlri: vec![prefix.parse().expect("net")],
                ..Default::default()
            }),
            CTX,
        );
        // ORIGIN is the first attribute: its flags byte follows the header,
        // the withdrawn length and the attributes length
        bytes[19 + 2 + 2] = origin_flags;
        bytes
    }

    pub fn header(len: u16, kind: u8) -> Vec<u8> {
        let mut b = vec![0xff; 16];
        b.extend_from_slice(&len.to_be_bytes());
        b.push(kind);
        b
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_notifications_or_treat_as_withdraw() {
    use tokio::io::AsyncWriteExt;
    let base = 16;
    let mut a = start(1, base, None, ImportPolicy::default()).await;
    let mut spec = peer(2, base, 1, PeerKind::External);
    spec.passive = true;
    a.speaker.set_peers(vec![spec]).await;
    // (bytes, expected NOTIFICATION code/subcode)
    let mut bad_marker = raw::header(19, 4);
    bad_marker[3] = 0;
    let mut wrong_as = raw::open(65001, base);
    let mut bad_version = raw::open(64512, base);
    bad_version[19] = 3;
    let mut short_hold = raw::open(64512, base);
    short_hold[19 + 3] = 0;
    short_hold[19 + 4] = 1;
    let truncated_open = raw::open(64512, base)[..25].to_vec();
    let mut truncated_open = truncated_open;
    truncated_open[17] = 25;
    let cases: Vec<(&str, Vec<u8>, (u8, u8))> = vec![
        ("length below 19", raw::header(10, 1), (1, 2)),
        ("bad marker", bad_marker, (1, 1)),
        ("unknown type", raw::header(19, 9), (1, 3)),
        ("wrong AS", std::mem::take(&mut wrong_as), (2, 2)),
        ("version 3", bad_version, (2, 1)),
        ("hold time 1", short_hold, (2, 6)),
        ("OPEN cut short", truncated_open, (1, 2)),
    ];
    for (what, bytes, (code, sub)) in cases {
        let mut s = raw::connect(base).await;
        s.write_all(&bytes).await.expect("send");
        let n = raw::notification(&mut s)
            .await
            .unwrap_or_else(|| panic!("{what}: no NOTIFICATION"));
        assert_eq!((n.code, n.subcode), (code, sub), "{what}: {n:?}");
    }
    // established: a good route, then the same prefix with bad ORIGIN
    // flags: treat-as-withdraw, the session stays up
    let mut s = raw::established(base).await;
    s.write_all(&raw::update("10.50.0.0/24", 0x40))
        .await
        .expect("update");
    a.wait_for("route in", |r| r.contains_key(&net("10.50.0.0/24")))
        .await;
    s.write_all(&raw::update("10.50.0.0/24", 0xc0))
        .await
        .expect("bad flags");
    a.wait_for("treated as withdrawn", |r| r.is_empty()).await;
    assert_eq!(a.speaker.status().await[0].state, "Established");
    // an unknown well-known (non-optional) attribute resets the session
    let mut unknown = raw::update("10.51.0.0/24", 0x40);
    // turn LOCAL_PREF (last attribute, flags 0x40 code 5) into code 99
    let at = unknown.len() - 4 - 7 + 1;
    assert_eq!(unknown[at], 5, "LOCAL_PREF code");
    unknown[at] = 99;
    s.write_all(&unknown).await.expect("unknown attr");
    let n = raw::notification(&mut s).await.expect("NOTIFICATION");
    assert_eq!((n.code, n.subcode), (3, 2), "{n:?}");
    // a NOTIFICATION cut short from the peer: the session ends, nothing breaks
    let mut s = raw::established(base).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&raw::header(20, 3))
        .await
        .expect("short notification");
    s.write_all(&[6]).await.expect("code only");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // still serving: a fresh session establishes
    let _s = raw::established(base).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.speaker.status().await[0].state != "Established" {
        assert!(
            Instant::now() < deadline,
            "no session after malformed input"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item: a peer that stops reading must not wedge its session. The raw peer
/// completes OPEN with a tiny receive window, keeps sending KEEPALIVEs
/// (so its hold timer never fires on our side) and never reads; the
/// speaker has 1.2 M routes (~6 MB of UPDATEs, more than the kernel's
/// largest send buffer, 4 MB) to send it. The session's write blocks; the
/// write deadline (the hold time) must end the session, and the core keeps
/// answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_cannot_wedge_its_session() {
    use tokio::io::AsyncWriteExt;
    let base = 18;
    let mut hold = cfg(1, base, None, ImportPolicy::default());
    hold.hold_time = 3;
    let (speaker, _events) = Speaker::start(hold).await.expect("speaker");
    let a = Node {
        speaker,
        events: _events,
        routes: BTreeMap::new(),
    };
    let mut raw_peer = peer(2, base, 1, PeerKind::External);
    raw_peer.passive = true;
    for i in 0..1_200_000u32 {
        let p = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), 32).expect("net");
        a.speaker.announce(p).await;
    }
    a.speaker.set_peers(vec![raw_peer]).await;
    // the raw peer: a 4 KiB receive buffer, OPEN + KEEPALIVE, then silence
    let mut s = raw::connect_with(base, Some(4096)).await;
    let mut open = raw::open(64512, base);
    open[19 + 3] = 0;
    open[19 + 4] = 3; // hold time 3 s
    s.write_all(&open).await.expect("open");
    let ka = trellis_bgp::encode(
        &trellis_bgp::Message::Keepalive,
        trellis_bgp::Ctx::default(),
    );
    s.write_all(&ka).await.expect("keepalive");
    // keepalives every second, never a read
    let (mut rd, mut wr) = s.into_split();
    let keepalives = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(&ka).await.is_err() {
                return;
            }
        }
    });
    let state = |st: &[trellis_bgp::PeerStatus], who: IpAddr| {
        st.iter()
            .find(|p| p.addr == who)
            .map(|p| p.state.clone())
            .unwrap_or_default()
    };
    // a precondition, not a figure: the core first works through 1.2 M
    // announcements, which takes a debug build on a busy 2-core machine
    // several seconds (5 s was not enough in a fresh-root run)
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&a.speaker.status().await, ip(2, base)) != "Established" {
        assert!(Instant::now() < deadline, "raw peer never established");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the session must leave Established within the hold time (+ margin),
    // though the peer holds the connection open and never reads
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = a.speaker.status().await;
        // an empty answer would mean the core itself is stuck
        assert!(!st.is_empty(), "the speaker's core did not answer");
        if state(&st, ip(2, base)) != "Established" {
            assert!(
                st[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("read nothing") || e.contains("hold")),
                "{st:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a non-reading peer kept its session Established: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keepalives.abort();
    let _ = &mut rd;
}

/// Item: a route refused as a loop counts as received, and replaces what
/// the peer announced for the prefix before (an implicit withdraw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_count_as_received_and_withdraw_the_earlier_path() {
    use tokio::io::AsyncWriteExt;
    use trellis_bgp::{AsSegment, Message, PathAttribute, Update};
    let base = 19;
    let mut a = start(1, base, None, ImportPolicy::default()).await;
    let mut spec = peer(2, base, 1, PeerKind::External);
    spec.passive = true;
    spec.asn = 65001;
    a.speaker.set_peers(vec![spec]).await;
    let mut s = raw::connect(base).await;
    s.write_all(&raw::open(65001, base)).await.expect("open");
    let ctx = trellis_bgp::Ctx {
        four_octet_as: true,
    };
    s.write_all(&trellis_bgp::encode(&Message::Keepalive, ctx))
        .await
        .expect("ka");
    let upd = |path: Vec<u32>, prefixes: &[&str]| {
        trellis_bgp::encode(
            &Message::Update(Update {
                attributes: vec![
                    PathAttribute::Origin(0),
                    PathAttribute::AsPath(vec![AsSegment::Sequence(path)]),
                    PathAttribute::NextHop(Ipv4Addr::new(127, 0, base, 2)),
                ],
                nlri: prefixes.iter().map(|p| p.parse().expect("net")).collect(),
                ..Default::default()
            }),
            ctx,
        )
    };
    s.write_all(&upd(vec![65001], &["10.60.0.0/24"]))
        .await
        .expect("good");
    a.wait_for("good route", |r| r.contains_key(&net("10.60.0.0/24")))
        .await;
    // the same prefix and three more, now with our AS in the path
    s.write_all(&upd(
        vec![65001, 64512],
        &[
            "10.60.0.0/24",
            "10.61.0.0/24",
            "10.62.0.0/24",
            "10.63.0.0/24",
        ],
    ))
    .await
    .expect("loop");
    a.wait_for("looped path replaces the good one", |r| r.is_empty())
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = a.speaker.status().await;
        if (st[0].received, st[0].accepted) == (4, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item: a prefix that fails the policy for a while (its owner's lease
/// expired) comes back when the policy admits it again, with nothing
/// resent by the peer (a reflector does not resend an identical path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_refused_for_a_while_returns_when_the_policy_admits_it() {
    let base = 20;
    let mut a = start(1, base, None, node_policy(base, &[1, 2], 1)).await;
    let b = start(2, base, None, ImportPolicy::default()).await;
    a.speaker
        .set_peers(vec![peer(2, base, 1, PeerKind::Mesh)])
        .await;
    b.speaker
        .set_peers(vec![peer(1, base, 2, PeerKind::Mesh)])
        .await;
    b.speaker.announce(subnet(2)).await;
    a.wait_for("owned subnet", |r| r.contains_key(&subnet(2)))
        .await;
    // node 2's lease is gone: nobody owns 10.244.2.0/24
    a.speaker.set_policy(node_policy(base, &[1], 1)).await;
    a.wait_for("gone while unowned", |r| r.is_empty()).await;
    let st = a.speaker.status().await;
    assert_eq!((st[0].received, st[0].accepted), (1, 0), "{st:?}");
    // the lease is back (the session never dropped)
    a.speaker.set_policy(node_policy(base, &[1, 2], 1)).await;
    a.wait_for("back when owned again", |r| r.contains_key(&subnet(2)))
        .await;
    let st = a.speaker.status().await;
    assert_eq!(st[0].established_count, 1, "session kept: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_prefixes_go_to_external_peers_only() {
    let base = 21;
    // node 1 peers with node 2 (mesh) and with router 3 (external)
    let n1 = start(1, base, None, node_policy(base, &[1, 2], 1)).await;
    let mut n2 = start(2, base, None, node_policy(base, &[1, 2], 2)).await;
    let anything = ImportPolicy {
        inside: vec![],
        owners: None,
        own: vec![],
        max_prefixes: 0,
    };
    let mut r3 = start(3, base, None, anything).await;
    n1.speaker.announce(subnet(1)).await;
    let vip = net("10.96.0.10/32");
    assert!(n1.speaker.announce_external(vip).await);
    n1.speaker
        .set_peers(vec![
            peer(2, base, 1, PeerKind::Mesh),
            peer(3, base, 1, PeerKind::External),
        ])
        .await;
    n2.speaker
        .set_peers(vec![peer(1, base, 2, PeerKind::Mesh)])
        .await;
    r3.speaker
        .set_peers(vec![peer(1, base, 3, PeerKind::External)])
        .await;
    r3.wait_for("the router gets the subnet and the service", |r| {
        r.contains_key(&subnet(1)) && r.contains_key(&vip)
    })
    .await;
    n2.wait_for("the mesh peer gets the subnet", |r| {
        r.contains_key(&subnet(1))
    })
    .await;
    assert!(!n2.routes.contains_key(&vip), "mesh peers never get it");
    // nothing refused at the mesh peer: it was never sent
    let st = n2.speaker.status().await;
    assert_eq!(st[0].accepted, 1, "{st:?}");
    // announced to everyone now (node 2's policy refuses it), then withdrawn
    assert!(n1.speaker.announce(vip).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    while n2.speaker.status().await[0].received < 2 {
        assert!(Instant::now() < deadline, "node 2 was never offered it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n1.speaker.withdraw(vip).await);
    r3.wait_for("withdrawn", |r| !r.contains_key(&vip)).await;
}
