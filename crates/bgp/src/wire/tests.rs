//! Codec tests: round trips, golden bytes, and every malformed input class
//! answered by the RFC's NOTIFICATION or RFC 7606 treat-as-withdraw.

use super::*;
use crate::wire::attrs::AsSegment;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr};

const FOUR: Ctx = Ctx {
    four_octet_as: true,
};

fn header(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    v.push(kind);
    v.extend_from_slice(body);
    v
}

fn err(bytes: &[u8], ctx: Ctx) -> (u8, u8) {
    match decode(bytes, ctx) {
        Err(DecodeError(n)) => (n.code, n.subcode),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn update_body(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = (withdrawn.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(withdrawn);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    b
}

fn good_attrs() -> Vec<u8> {
    // ORIGIN IGP, AS_PATH [65001] (4-octet), NEXT_HOP 192.0.2.11
    let mut a = vec![0x40, 1, 1, 0];
    a.extend_from_slice(&[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9]);
    a.extend_from_slice(&[0x40, 3, 4, 192, 0, 2, 11]);
    a
}

fn decoded_update(body: &[u8]) -> Update {
    match decode(&header(2, body), FOUR) {
        Ok(Some((Message::Update(u), _))) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}

#[test]
fn keepalive_golden_and_partial_input() {
    let k = encode(&Message::Keepalive, Ctx::default());
    assert_eq!(k, [[0xffu8; 16].as_slice(), &[0, 19, 4]].concat());
    assert_eq!(decode(&k[..10], Ctx::default()), Ok(None));
    assert_eq!(
        decode(&k, Ctx::default()),
        Ok(Some((Message::Keepalive, 19)))
    );
}

#[test]
fn open_round_trip_with_every_capability() {
    let o = Open {
        asn: 4_200_000_001,
        hold_time: 90,
        id: Ipv4Addr::new(192, 0, 2, 11),
        capabilities: vec![
            Capability::MultiProtocol(AFI_IPV4, SAFI_UNICAST),
            Capability::MultiProtocol(AFI_IPV6, SAFI_UNICAST),
            Capability::RouteRefresh,
            Capability::GracefulRestart {
                restarting: true,
                time: 120,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            },
            Capability::FourOctetAs(4_200_000_001),
            Capability::Unknown(73, vec![1, 2]),
        ],
    };
    let bytes = encode(&Message::Open(o.clone()), Ctx::default());
    // the 2-byte AS field carries AS_TRANS
    assert_eq!(&bytes[20..22], &23456u16.to_be_bytes());
    assert_eq!(
        decode(&bytes, Ctx::default()),
        Ok(Some((Message::Open(o), bytes.len())))
    );
}

#[test]
fn open_errors() {
    let good = encode(
        &Message::Open(Open {
            asn: 65001,
            hold_time: 90,
            id: Ipv4Addr::new(1, 1, 1, 1),
            capabilities: vec![],
        }),
        Ctx::default(),
    );
    let mut v = good.clone();
    v[19] = 3;
    assert_eq!(err(&v, Ctx::default()), (2, 1), "version");
    let mut v = good.clone();
    v[22..24].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(err(&v, Ctx::default()), (2, 6), "hold time 2");
    let mut v = good.clone();
    v[24..28].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(err(&v, Ctx::default()), (2, 3), "bgp id 0");
    let mut v = good.clone();
    v[20..22].copy_from_slice(&[0, 0]);
    assert_eq!(err(&v, Ctx::default()), (2, 2), "AS 0");
    // optional parameters length disagreeing with the message
    let mut body = good[19..].to_vec();
    body[9] = 5;
    assert_eq!(err(&header(1, &body), Ctx::default()), (1, 2));
    // an optional parameter that is not capabilities
    let mut body = good[19..28].to_vec();
    body.extend_from_slice(&[3, 1, 1, 0]);
    assert_eq!(err(&header(1, &body), Ctx::default()), (2, 4));
    // a truncated capability
    let mut body = good[19..28].to_vec();
    body.extend_from_slice(&[4, 2, 2, 65, 4]);
    assert_eq!(err(&header(1, &body), Ctx::default()).0, 2);
}

#[test]
fn header_errors() {
    let mut bad_marker = encode(&Message::Keepalive, Ctx::default());
    bad_marker[3] = 0;
    assert_eq!(err(&bad_marker, Ctx::default()), (1, 1));
    let mut v = encode(&Message::Keepalive, Ctx::default());
    v[17] = 18;
    assert_eq!(err(&v, Ctx::default()), (1, 2), "length below 19");
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&[0x10, 0x01, 2]);
    assert_eq!(err(&v, Ctx::default()), (1, 2), "length above 4096");
    assert_eq!(err(&header(9, &[]), Ctx::default()), (1, 3), "type");
    assert_eq!(
        err(&header(4, &[0]), Ctx::default()),
        (1, 2),
        "keepalive with a body"
    );
    assert_eq!(
        err(&header(2, &[0]), Ctx::default()),
        (1, 2),
        "update too short"
    );
}

#[test]
fn update_round_trip() {
    let u = Update {
        withdrawn: vec!["10.244.9.0/24".parse().expect("net")],
        attributes: vec![
            PathAttribute::Origin(0),
            PathAttribute::AsPath(vec![AsSegment::Sequence(vec![65001, 4_200_000_000])]),
            PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 11)),
            PathAttribute::Med(5),
            PathAttribute::LocalPref(100),
            PathAttribute::Communities(vec![0xfde8_0001]),
            PathAttribute::OriginatorId(Ipv4Addr::new(192, 0, 2, 11)),
            PathAttribute::ClusterList(vec![Ipv4Addr::new(192, 0, 2, 1)]),
            PathAttribute::MpReach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                next_hops: vec![IpAddr::V6("fd00::11".parse().expect("ip"))],
                nlri: vec!["fd00:244:1::/64".parse().expect("net")],
            },
            PathAttribute::MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: vec!["fd00:244:9::/64".parse().expect("net")],
            },
        ],
        nlri: vec![
            "10.244.1.0/24".parse().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
            "0.0.0.0/0".parse().expect("net"),
        ],
        ..Default::default()
    };
    let bytes = encode(&Message::Update(u.clone()), FOUR);
    assert_eq!(
        decode(&bytes, FOUR),
        Ok(Some((Message::Update(u.clone()), bytes.len())))
    );
    assert_eq!(u.announced().len(), 4);
    assert_eq!(u.withdrawals().len(), 2);
}

#[test]
fn update_session_reset_errors() {
    let nlri = [24, 10, 244, 1];
    // withdrawn length past the end
    assert_eq!(err(&header(2, &[0, 9, 0, 0]), FOUR), (3, 1));
    // total attribute length past the end
    let mut b = update_body(&[], &good_attrs(), &nlri);
    b[3] += 40;
    assert_eq!(err(&header(2, &b), FOUR), (3, 1));
    // an attribute whose length runs past the attribute list
    let mut attrs = good_attrs();
    attrs.extend_from_slice(&[0xc0, 8, 9, 1, 2]);
    assert_eq!(
        err(&header(2, &update_body(&[], &attrs, &nlri)), FOUR),
        (3, 1)
    );
    // NLRI with a prefix length of 33, or running short
    assert_eq!(
        err(
            &header(2, &update_body(&[], &good_attrs(), &[33, 1, 2, 3, 4, 5])),
            FOUR
        ),
        (3, 10)
    );
    assert_eq!(
        err(
            &header(2, &update_body(&[], &good_attrs(), &[24, 10])),
            FOUR
        ),
        (3, 10)
    );
    // an unknown well-known (non-optional) attribute
    let mut attrs = good_attrs();
    attrs.extend_from_slice(&[0x40, 99, 1, 0]);
    assert_eq!(
        err(&header(2, &update_body(&[], &attrs, &nlri)), FOUR),
        (3, 2)
    );
    // malformed MP_REACH (next hop length for IPv4 = 5)
    let mut attrs = good_attrs();
    attrs.extend_from_slice(&[0x80, 14, 11, 0, 1, 1, 5, 1, 2, 3, 4, 5, 0, 0]);
    assert_eq!(
        err(&header(2, &update_body(&[], &attrs, &[])), FOUR),
        (3, 9)
    );
    // MP_REACH twice
    let mp = [0x80, 14, 9, 0, 1, 1, 4, 192, 0, 2, 11, 0];
    let mut attrs = good_attrs();
    attrs.extend_from_slice(&mp);
    attrs.extend_from_slice(&mp);
    assert_eq!(
        err(&header(2, &update_body(&[], &attrs, &[])), FOUR),
        (3, 1)
    );
}

#[test]
fn update_treat_as_withdraw_and_discard() {
    let nlri = [24, 10, 244, 1];
    let cases: Vec<(Vec<u8>, u8)> = vec![
        // ORIGIN with optional flag set: attribute flags error
        (
            [vec![0xc0, 1, 1, 0], good_attrs()[4..].to_vec()].concat(),
            4,
        ),
        // ORIGIN of length 2
        (
            [vec![0x40, 1, 2, 0, 0], good_attrs()[4..].to_vec()].concat(),
            5,
        ),
        // ORIGIN value 7
        (
            [vec![0x40, 1, 1, 7], good_attrs()[4..].to_vec()].concat(),
            6,
        ),
        // AS_PATH segment count overrunning its value
        (
            [
                good_attrs()[..4].to_vec(),
                vec![0x40, 2, 6, 2, 5, 0, 0, 0xfd, 0xe9],
                good_attrs()[13..].to_vec(),
            ]
            .concat(),
            11,
        ),
        // NEXT_HOP 0.0.0.0
        (
            [good_attrs()[..13].to_vec(), vec![0x40, 3, 4, 0, 0, 0, 0]].concat(),
            8,
        ),
        // LOCAL_PREF of length 3
        ([good_attrs(), vec![0x40, 5, 3, 0, 0, 1]].concat(), 5),
        // NEXT_HOP missing
        (good_attrs()[..13].to_vec(), 3),
    ];
    for (attrs, sub) in cases {
        let u = decoded_update(&update_body(&[], &attrs, &nlri));
        let n = u
            .treat_as_withdraw
            .clone()
            .unwrap_or_else(|| panic!("subcode {sub}: not treat-as-withdraw: {u:?}"));
        assert_eq!((n.code, n.subcode), (3, sub), "{u:?}");
        assert_eq!(
            u.withdrawals(),
            vec!["10.244.1.0/24".parse::<ipnet::IpNet>().expect("net")]
        );
    }
    // a malformed AGGREGATOR is discarded, the route stays
    let u = decoded_update(&update_body(
        &[],
        &[good_attrs(), vec![0xc0, 7, 3, 1, 2, 3]].concat(),
        &nlri,
    ));
    assert!(u.treat_as_withdraw.is_none());
    assert_eq!(u.discarded, vec![7]);
    assert_eq!(u.announced().len(), 1);
    // a duplicate attribute keeps the first
    let u = decoded_update(&update_body(
        &[],
        &[good_attrs(), vec![0x40, 1, 1, 2]].concat(),
        &nlri,
    ));
    assert!(
        u.attributes.contains(&PathAttribute::Origin(0))
            && !u.attributes.contains(&PathAttribute::Origin(2))
    );
    // an unknown optional attribute is kept
    let u = decoded_update(&update_body(
        &[],
        &[good_attrs(), vec![0xc0, 99, 2, 7, 7]].concat(),
        &nlri,
    ));
    assert!(u.attributes.iter().any(|a| a.code() == 99));
    // End-of-RIB
    assert!(decoded_update(&update_body(&[], &[], &[])).is_end_of_rib());
}

#[test]
fn notification_and_route_refresh() {
    let n = Message::Notification(Notification {
        code: 6,
        subcode: 2,
        data: vec![],
    });
    let b = encode(&n, Ctx::default());
    assert_eq!(decode(&b, Ctx::default()), Ok(Some((n, 21))));
    let r = Message::RouteRefresh(AFI_IPV4, SAFI_UNICAST);
    let b = encode(&r, Ctx::default());
    assert_eq!(decode(&b, Ctx::default()), Ok(Some((r, 23))));
    assert_eq!(
        Notification {
            code: 3,
            subcode: 5,
            data: vec![]
        }
        .describe(),
        "UPDATE message error / attribute length error"
    );
}

proptest! {
    /// Any bytes: a message, a request for more, or a NOTIFICATION; never a panic.
    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), four in any::<bool>()) {
        let ctx = Ctx { four_octet_as: four };
        let _ = decode(&bytes, ctx);
        let mut framed = vec![0xff; 16];
        framed.extend_from_slice(&((19 + bytes.len()) as u16).to_be_bytes());
        for kind in 1..=5u8 {
            let mut f = framed.clone();
            f.push(kind);
            f.extend_from_slice(&bytes);
            let _ = decode(&f, ctx);
        }
    }

    #[test]
    fn prefixes_round_trip(raw in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..20)) {
        let nets: Vec<ipnet::IpNet> = raw.iter().map(|(a, l)| ipnet::IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l).expect("len").trunc())).collect();
        let u = Update { nlri: nets.clone(), attributes: vec![PathAttribute::Origin(0), PathAttribute::AsPath(vec![]), PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 1))], ..Default::default() };
        let b = encode(&Message::Update(u.clone()), FOUR);
        prop_assert_eq!(decode(&b, FOUR), Ok(Some((Message::Update(u), b.len()))));
    }
}
