use super::*;
use crate::nftnl::types::parse_decl;

fn c(rule: &str) -> Vec<Expr> {
    let schema = |_: &str| parse_decl("typeof numgen random mod 1 : ip daddr . tcp dport;").ok();
    compile(rule, &schema).unwrap_or_else(|e| panic!("{rule}: {}", e.0))
}

#[test]
fn a_concatenation_takes_nfts_registers() {
    let e = c("ip daddr . meta l4proto . th dport vmap @services");
    assert_eq!(e.len(), 6);
    assert_eq!(
        e[2],
        Expr::Payload {
            base: 1,
            offset: 16,
            len: 4,
            dreg: 1
        }
    );
    assert_eq!(e[3], Expr::Meta { key: 16, dreg: 9 });
    assert_eq!(
        e[4],
        Expr::Payload {
            base: 2,
            offset: 2,
            len: 2,
            dreg: 10
        }
    );
    assert_eq!(
        e[5],
        Expr::Lookup {
            set: "services".into(),
            sreg: 1,
            dreg: Some(0)
        }
    );
}

#[test]
fn mark_arithmetic_folds_into_one_bitwise() {
    let e = c("meta mark set meta mark & 0xffff | 0x10000");
    assert_eq!(
        e[1],
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: 0xffffu32.to_ne_bytes().to_vec(),
            xor: 0x10000u32.to_ne_bytes().to_vec()
        }
    );
    let e = c("meta mark set meta mark | 0x2000");
    assert_eq!(
        e[1],
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: 0xffff_dfffu32.to_ne_bytes().to_vec(),
            xor: 0x2000u32.to_ne_bytes().to_vec()
        }
    );
}

#[test]
fn prefixes_compare_whole_bytes_or_mask() {
    let e = c("ip saddr != 10.244.0.0/16 drop");
    assert_eq!(
        e[2],
        Expr::Payload {
            base: 1,
            offset: 12,
            len: 2,
            dreg: 1
        }
    );
    assert_eq!(
        e[3],
        Expr::Cmp {
            sreg: 1,
            op: 1,
            data: vec![10, 244]
        }
    );
    let e = c("ip saddr 10.240.0.0/12 drop");
    assert_eq!(
        e[3],
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: vec![255, 240, 0, 0],
            xor: vec![0; 4]
        }
    );
}

#[test]
fn update_puts_data_in_the_next_register() {
    let e = c("update @aff { ip saddr : ip daddr . th dport }");
    assert_eq!(
        e[3],
        Expr::Payload {
            base: 1,
            offset: 16,
            len: 4,
            dreg: 2
        }
    );
    assert_eq!(
        e[4],
        Expr::Payload {
            base: 2,
            offset: 2,
            len: 2,
            dreg: 13
        }
    );
    assert_eq!(
        e[5],
        Expr::Dynset {
            set: "aff".into(),
            sreg_key: 1,
            sreg_data: 2
        }
    );
}

#[test]
fn dnat_to_one_endpoint_and_numgen_compared() {
    let e = c("meta l4proto tcp numgen random mod 3 0 dnat ip to 10.0.0.1:8080");
    assert_eq!(
        e[2..],
        [
            Expr::Numgen {
                dreg: 1,
                modulus: 3
            },
            Expr::Cmp {
                sreg: 1,
                op: 0,
                data: 0u32.to_ne_bytes().to_vec()
            },
            Expr::Data {
                dreg: 1,
                data: vec![10, 0, 0, 1]
            },
            Expr::Data {
                dreg: 2,
                data: vec![0x1f, 0x90]
            },
            Expr::Dnat {
                addr: 1,
                proto: Some(2)
            },
        ]
    );
}

#[test]
fn a_masked_mark_and_numgen_key_dnat_as_nft_orders_them() {
    let schema =
        |_: &str| parse_decl("typeof meta mark . numgen random mod 1 : ip daddr . udp dport;").ok();
    let e = compile(
        "meta l4proto udp dnat ip to meta mark & 0xffff0000 . numgen random mod 7 map @eps",
        &schema,
    )
    .expect("compiles");
    assert_eq!(
        e[2..],
        [
            Expr::Meta { key: 3, dreg: 1 },
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: 0xffff_0000u32.to_ne_bytes().to_vec(),
                xor: vec![0; 4]
            },
            Expr::Numgen {
                dreg: 9,
                modulus: 7
            },
            Expr::Lookup {
                set: "eps".into(),
                sreg: 1,
                dreg: Some(1)
            },
            Expr::Dnat {
                addr: 1,
                proto: Some(9)
            },
        ]
    );
}

#[test]
fn what_is_outside_the_subset_is_named() {
    let schema = |_: &str| None;
    for bad in [
        "ip ttl 3 drop",
        "jump",
        "reject with icmp host-unreachable",
        "dnat ip to numgen random mod 2 map @unknown",
        "meta mark set 3",
        "ct state bogus accept",
        "ip saddr 10.0.0.0/33 drop",
        "numgen random mod 0 . ip saddr @x",
        "",
    ] {
        assert!(compile(bad, &schema).is_err(), "{bad}");
    }
}
