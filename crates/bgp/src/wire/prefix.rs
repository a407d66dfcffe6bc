//! NLRI prefixes: a length in bits, then just enough bytes.

use super::error::DecodeError;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Decodes a run of prefixes of one family; a bad length or an overrun is
/// `err` (the caller picks the NOTIFICATION that fits the field).
pub fn decode(
    mut b: &[u8],
    v6: bool,
    err: impl Fn() -> DecodeError,
) -> Result<Vec<IpNet>, DecodeError> {
    let max = if v6 { 128 } else { 32 };
    let mut out = Vec::new();
    while let Some((&len, rest)) = b.split_first() {
        if len > max {
            return Err(err());
        }
        let n = usize::from(len).div_ceil(8);
        if rest.len() < n {
            return Err(err());
        }
        let net = if v6 {
            let mut o = [0u8; 16];
            o[..n].copy_from_slice(&rest[..n]);
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(o), len)
                    .map_err(|_| err())?
                    .trunc(),
            )
        } else {
            let mut o = [0u8; 4];
            o[..n].copy_from_slice(&rest[..n]);
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(o), len)
                    .map_err(|_| err())?
                    .trunc(),
            )
        };
        out.push(net);
        b = &rest[n..];
    }
    Ok(out)
}

/// Encodes prefixes.
pub fn encode(out: &mut Vec<u8>, nets: &[IpNet]) {
    for n in nets {
        let len = n.prefix_len();
        out.push(len);
        let bytes = usize::from(len).div_ceil(8);
        match n.network() {
            std::net::IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..bytes]),
            std::net::IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..bytes]),
        }
    }
}
