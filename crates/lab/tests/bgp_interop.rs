//! The BGP codec against a real BIRD 2: our OPEN, KEEPALIVE and UPDATE are
//! accepted (BIRD's RIB shows our prefix), and BIRD's are decoded (its
//! static prefix arrives with its next hop).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};

use std::time::{Duration, Instant};
use trellis_bgp::wire::{AFI_IPV4, SAFI_UNICAST};
use trellis_bgp::{decode, encode, Capability, Ctx, Message, Open, PathAttribute, Update};
use trellis_lab::netns;

fn read_msg(s: &mut TcpStream, buf: &mut Vec<u8>, ctx: Ctx) -> Message {
    loop {
        if let Some((m, n)) = decode(buf, ctx).expect("decode a message from BIRD") {
            buf.drain(..n);
            return m;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read from BIRD");
        assert!(n > 0, "BIRD closed the session");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn codec_interoperates_with_bird() {
    if !privileged("codec_interoperates_with_bird") {
        return;
    }
    let lab = lab(2);
    let bird = start_bird(
        &lab,
        &lab.ns("n1"),
        "bird",
        "router id 192.0.2.11;\n\
         protocol device {}\n\
         protocol static s4 { ipv4; route 10.99.0.0/24 blackhole; }\n\
         protocol bgp trellis {\n  local 192.0.2.11 as 64512;\n  neighbor 192.0.2.12 as 64512;\n  direct;\n  hold time 90;\n  ipv4 { import all; export all; };\n}\n",
    );

    let ctx = Ctx {
        four_octet_as: true,
    };
    let (got, routes) = netns::within(&netns::path(&lab.ns("n2")), || {
        let addr = "192.0.2.11:179".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect to BIRD: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let open = Open {
            asn: 64512,
            hold_time: 90,
            id: Ipv4Addr::new(192, 0, 2, 12),
            capabilities: vec![
                Capability::MultiProtocol(AFI_IPV4, SAFI_UNICAST),
                Capability::RouteRefresh,
                Capability::FourOctetAs(64512),
            ],
        };
        s.write_all(&encode(&Message::Open(open), ctx))
            .expect("send open");
        let mut buf = Vec::new();
        let their = match read_msg(&mut s, &mut buf, Ctx::default()) {
            Message::Open(o) => o,
            other => panic!("expected BIRD's OPEN, got {other:?}"),
        };
        assert_eq!(their.asn, 64512);
        assert!(their.four_octet_as());
        s.write_all(&encode(&Message::Keepalive, ctx))
            .expect("keepalive");
        // announce our prefix
        let ours = Update {
            attributes: vec![
                PathAttribute::Origin(0),
                PathAttribute::AsPath(vec![]),
                PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 12)),
                PathAttribute::LocalPref(100),
            ],
            nlri: vec!["10.244.7.0/24".parse().expect("net")],
            ..Default::default()
        };
        s.write_all(&encode(&Message::Update(ours), ctx))
            .expect("send update");
        // collect BIRD's messages until its static prefix shows up
        let mut got = None;
        let until = Instant::now() + Duration::from_secs(10);
        while got.is_none() && Instant::now() < until {
            if let Message::Update(u) = read_msg(&mut s, &mut buf, ctx) {
                if u.announced()
                    .contains(&"10.99.0.0/24".parse().expect("net"))
                {
                    let nh = u.attributes.iter().find_map(|a| match a {
                        PathAttribute::NextHop(n) => Some(*n),
                        _ => None,
                    });
                    got = Some(nh);
                }
            }
        }
        s.write_all(&encode(&Message::Keepalive, ctx))
            .expect("keepalive");
        // while the session is up, BIRD's RIB must hold our prefix
        let mut routes = String::new();
        let until = Instant::now() + Duration::from_secs(10);
        while !routes.contains("10.244.7.0/24") && Instant::now() < until {
            routes = birdc(&bird, &["show", "route"]);
            std::thread::sleep(Duration::from_millis(100));
        }
        (got, routes)
    })
    .expect("netns");
    assert_eq!(
        got,
        Some(Some(Ipv4Addr::new(192, 0, 2, 11))),
        "BIRD's prefix with its next hop"
    );
    assert!(
        routes.contains("10.244.7.0/24"),
        "our prefix is not in BIRD's RIB:\n{routes}"
    );
}

/// Starts BIRD peering with 192.0.2.12 under `password`.
fn bird_with_password(lab: &trellis_lab::Lab, password: &str) -> Bird {
    start_bird(
        lab,
        &lab.ns("n1"),
        "bird-md5",
        &format!(
            "router id 192.0.2.11;\nprotocol device {{}}\nprotocol bgp trellis {{\n  local 192.0.2.11 as 64512;\n  neighbor 192.0.2.12 as 64512;\n  direct;\n  password \"{password}\";\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )
}

/// Connects from n2 with `key` (none: unsigned) and tries to get BIRD's OPEN.
fn try_session(lab: &trellis_lab::Lab, key: Option<&[u8]>) -> Result<Open, String> {
    netns::within(&netns::path(&lab.ns("n2")), || {
        let peer: std::net::SocketAddr = "192.0.2.11:179".parse().expect("addr");
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        if let Some(k) = key {
            use std::os::fd::AsFd;
            trellis_bgp::md5::set_md5(sock.as_fd(), peer, k).map_err(|e| e.to_string())?;
        }
        sock.connect_timeout(&peer.into(), Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let open = Open {
            asn: 64512,
            hold_time: 90,
            id: Ipv4Addr::new(192, 0, 2, 12),
            capabilities: vec![Capability::FourOctetAs(64512)],
        };
        s.write_all(&encode(&Message::Open(open), Ctx::default()))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match read_msg(&mut s, &mut buf, Ctx::default()) {
            Message::Open(o) => Ok(o),
            other => Err(format!("got {other:?}")),
        }
    })
    .expect("netns")
}

#[test]
fn md5_password_must_match() {
    if !privileged("md5_password_must_match") {
        return;
    }
    let lab = lab(2);
    let _bird = bird_with_password(&lab, "trellis-secret");
    // the matching key establishes (retry while BIRD comes up)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match try_session(&lab, Some(b"trellis-secret")) {
            Ok(o) => {
                assert_eq!(o.asn, 64512);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("matching MD5 key did not establish: {e}"),
        }
    }
    // BIRD is up; a wrong key or none: the kernel drops the SYN, so the
    // connection times out (it is not refused) and no session ever starts
    for key in [Some(b"wrong".as_slice()), None] {
        let r = try_session(&lab, key);
        let e = r.expect_err("session established with a wrong or missing MD5 key");
        assert!(
            e.contains("timed out"),
            "{key:?}: expected the SYN to be dropped, got {e}"
        );
    }
}
