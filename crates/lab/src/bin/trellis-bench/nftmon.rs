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
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_dataplane::netlink::attrs;

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

/// What a [`SetWatch`] saw: when each key address was first and last
/// added.
#[derive(Default)]
struct Seen {
    first: HashMap<Ipv4Addr, Instant>,
    last: HashMap<Ipv4Addr, Instant>,
    lost: bool,
    error: Option<String>,
}

/// Records, on its own thread, the moment each address first appears as
/// the start of an element key added to one named set of one table (a
/// proxy's map of Service addresses: `ipv4_addr . inet_proto .
/// inet_service`; the policy's map of local pods), and the last time. Reading
/// continuously, it keeps up with a sync of 30,000 Services, and its cost
/// does not grow with the table as `nft list map` does.
pub struct SetWatch {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SetWatch {
    /// Subscribes to namespace `netns` and watches set `set` of table
    /// `table`.
    pub fn start(netns: &Path, table: &str, set: &str) -> anyhow::Result<Self> {
        let monitor = Monitor::open(netns)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let (table, set) = (table.as_bytes().to_vec(), set.as_bytes().to_vec());
        let thread = std::thread::Builder::new()
            .name("nftmon".into())
            .spawn(move || {
                let raw = std::os::fd::AsRawFd::as_raw_fd(&monitor.fd);
                let mut buf = vec![0u8; 1 << 20];
                let mut keys = Vec::new();
                while !stop2.load(Ordering::Relaxed) {
                    match recv(raw, &mut buf, MsgFlags::empty()) {
                        Ok(n) => {
                            keys.clear();
                            added_keys(&buf[..n], &table, &set, &mut keys);
                            if !keys.is_empty() {
                                let now = Instant::now();
                                let mut s = seen2.lock().unwrap_or_else(|e| e.into_inner());
                                for k in &keys {
                                    s.first.entry(*k).or_insert(now);
                                    s.last.insert(*k, now);
                                }
                            }
                        }
                        Err(nix::errno::Errno::EAGAIN) => {}
                        Err(nix::errno::Errno::ENOBUFS) => {
                            seen2.lock().unwrap_or_else(|e| e.into_inner()).lost = true;
                        }
                        Err(e) => {
                            seen2.lock().unwrap_or_else(|e| e.into_inner()).error =
                                Some(format!("reading the nf_tables monitor: {e}"));
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// The moment the last of `addrs` was first added, once all were;
    /// `None` while one is missing. An error once announcements were lost
    /// or the monitor failed: the caller then probes otherwise.
    pub fn all_seen(&self, addrs: &[Ipv4Addr]) -> anyhow::Result<Option<Instant>> {
        self.latest(addrs, |s| &s.first)
    }

    /// The moment the last of `addrs` was last added, once all were.
    pub fn all_last(&self, addrs: &[Ipv4Addr]) -> anyhow::Result<Option<Instant>> {
        self.latest(addrs, |s| &s.last)
    }

    fn latest(
        &self,
        addrs: &[Ipv4Addr],
        which: impl Fn(&Seen) -> &HashMap<Ipv4Addr, Instant>,
    ) -> anyhow::Result<Option<Instant>> {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &s.error {
            bail!("{e}");
        }
        if s.lost {
            bail!("the nf_tables monitor lost announcements (receive buffer overrun)");
        }
        let mut last = None;
        for a in addrs {
            match which(&s).get(a) {
                None => return Ok(None),
                Some(t) => last = last.max(Some(*t)),
            }
        }
        Ok(last)
    }
}

impl Drop for SetWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // the thread sees the flag within one receive timeout (100 ms)
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// NFTA_SET_ELEM_LIST_TABLE, _SET, _ELEMENTS; NFTA_LIST_ELEM;
/// NFTA_SET_ELEM_KEY; NFTA_DATA_VALUE
const LIST_TABLE: u16 = 1;
const LIST_SET: u16 = 2;
const LIST_ELEMENTS: u16 = 3;
const LIST_ELEM: u16 = 1;
const ELEM_KEY: u16 = 1;
const DATA_VALUE: u16 = 1;

/// The first 4 bytes of the key of every element that the NEWSETELEM
/// messages in `buf` add to set `set` of table `table`.
fn added_keys(mut buf: &[u8], table: &[u8], set: &[u8], out: &mut Vec<Ipv4Addr>) {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return;
        }
        // nlmsghdr (16), nfgenmsg (4), then the attributes
        if kind == (SUBSYS << 8) | NEW_SETELEM && len >= 20 {
            let body = &buf[20..len];
            let is = |kind: u16, name: &[u8]| {
                attrs(body).any(|(k, v)| k == kind && v.strip_suffix(&[0]).unwrap_or(v) == name)
            };
            let named = is(LIST_TABLE, table) && is(LIST_SET, set);
            if named {
                for (_, elems) in attrs(body).filter(|(k, _)| *k == LIST_ELEMENTS) {
                    for (_, elem) in attrs(elems).filter(|(k, _)| *k == LIST_ELEM) {
                        for (_, key) in attrs(elem).filter(|(k, _)| *k == ELEM_KEY) {
                            for (_, v) in attrs(key).filter(|(k, _)| *k == DATA_VALUE) {
                                if v.len() >= 4 {
                                    out.push(Ipv4Addr::new(v[0], v[1], v[2], v[3]));
                                }
                            }
                        }
                    }
                }
            }
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
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

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut a = (len as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize((len + 3) & !3, 0);
        a
    }

    fn setelem(set: &str, keys: &[[u8; 12]]) -> Vec<u8> {
        let mut elems = Vec::new();
        for k in keys {
            let key = attr(0x8000 | ELEM_KEY, &attr(DATA_VALUE, k));
            elems.extend(attr(0x8000 | LIST_ELEM, &key));
        }
        let mut body = vec![2, 0, 0, 0];
        body.extend(attr(1, b"trellis-proxy\0"));
        body.extend(attr(LIST_SET, format!("{set}\0").as_bytes()));
        body.extend(attr(0x8000 | LIST_ELEMENTS, &elems));
        msg((SUBSYS << 8) | NEW_SETELEM, &body)
    }

    #[test]
    fn keys_added_to_the_named_set_are_read() {
        let a = [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0];
        let b = [10, 96, 0, 11, 17, 0, 0, 0, 0, 53, 0, 0];
        let mut buf = setelem("services", &[a, b]);
        buf.extend(setelem("other", &[[1; 12]]));
        let mut out = Vec::new();
        added_keys(&buf, b"trellis-proxy", b"services", &mut out);
        assert_eq!(
            out,
            vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 11)]
        );
        // a deletion of the same elements: nothing
        let mut del = setelem("services", &[a]);
        del[4] = 14;
        out.clear();
        added_keys(&del, b"trellis-proxy", b"services", &mut out);
        assert!(out.is_empty());
        // the same set name in another table: nothing
        added_keys(
            &setelem("services", &[a]),
            b"kube-proxy",
            b"services",
            &mut out,
        );
        assert!(out.is_empty());
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
