//! Watching a lab node's nf_tables commits: when a transaction commits,
//! the kernel announces every object it added to the NFNLGRP_NFTABLES
//! multicast group (what `nft monitor` prints). A proxy's change is in the
//! kernel when such an announcement carries the new endpoint's address.
//! The cost of waiting does not grow with the table (reading a chain with
//! `nft list` makes nft fetch much of the table first: 0.1 s per call at
//! 5,000 Services here), and it is the same for every proxy.

use anyhow::{bail, Context};
use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// NFNLGRP_NFTABLES
const GROUP: u32 = 7;
/// NFNL_SUBSYS_NFTABLES, and the messages that carry added objects
const SUBSYS: u16 = 10;
const NEW_CHAIN: u16 = 3;
const NEW_RULE: u16 = 6;
const NEW_SETELEM: u16 = 12;

pub struct Monitor {
    fd: OwnedFd,
}

impl Monitor {
    /// Subscribes to the commits of namespace `netns`.
    pub fn open(netns: &Path) -> anyhow::Result<Self> {
        let fd = trellis_lab::netns::within(netns, || -> nix::Result<OwnedFd> {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkNetFilter,
            )?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &NetlinkAddr::new(0, 1 << (GROUP - 1)),
            )?;
            Ok(fd)
        })?
        .with_context(|| format!("nf_tables monitor in {}", netns.display()))?;
        // a sync of thousands of objects must not overrun it
        setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        Ok(Self { fd })
    }

    /// Drops what was announced so far.
    pub fn drain(&self) {
        let mut buf = vec![0u8; 1 << 16];
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        while matches!(recv(raw, &mut buf, MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0) {}
    }

    /// Waits until a committed chain, rule or set element carries `addr`
    /// (as text, as in kube-proxy's chain names, or as its 4 bytes, as in a
    /// DNAT rule): the moment it was read.
    pub fn wait_for(&self, addr: Ipv4Addr, limit: Duration) -> anyhow::Result<Instant> {
        let text = addr.to_string().into_bytes();
        let bytes = addr.octets();
        let end = Instant::now() + limit;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match recv(raw, &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    if carries(&buf[..n], &text, &bytes) {
                        return Ok(Instant::now());
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(nix::errno::Errno::ENOBUFS) => {
                    bail!("the nf_tables monitor lost announcements (receive buffer overrun)")
                }
                Err(e) => bail!("reading the nf_tables monitor: {e}"),
            }
            if Instant::now() > end {
                bail!("no committed object carried {addr} within {limit:?}");
            }
        }
    }
}

/// Whether one of the netlink messages in `buf` adds an object holding
/// `text` or `bytes`.
fn carries(mut buf: &[u8], text: &[u8], bytes: &[u8]) -> bool {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return false;
        }
        let adds =
            kind >> 8 == SUBSYS && [NEW_CHAIN, NEW_RULE, NEW_SETELEM].contains(&(kind & 0xff));
        let body = &buf[16..len];
        if adds && (contains(body, text) || contains(body, bytes)) {
            return true;
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    false
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn only_added_objects_holding_the_address_count() {
        let (text, bytes) = (b"10.244.251.1".as_slice(), [10u8, 244, 251, 1]);
        let rule = msg((SUBSYS << 8) | NEW_RULE, &[0, 0, 0, 0, 10, 244, 251, 1]);
        assert!(carries(&rule, text, &bytes));
        let chain = msg((SUBSYS << 8) | NEW_CHAIN, b"endpoint-x__10.244.251.1/80");
        assert!(carries(&chain, text, &bytes));
        // a deletion holding it, or another address: no
        let del = msg((SUBSYS << 8) | 8, &[10, 244, 251, 1]);
        assert!(!carries(&del, text, &bytes));
        let other = msg((SUBSYS << 8) | NEW_RULE, &[10, 244, 251, 2]);
        assert!(!carries(&other, text, &bytes));
        // found past a first message
        let mut two = other.clone();
        two.extend_from_slice(&rule);
        assert!(carries(&two, text, &bytes));
    }
}
