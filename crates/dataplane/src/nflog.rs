//! Reading an NFLOG group (nfnetlink_log, `NETLINK_NETFILTER`): the
//! packets an nftables `log group N` statement sends there, in the
//! namespace the subscription was opened in. What the messages mean is
//! the caller's (the policy crate's `log::parse`); this only binds the
//! group and hands over datagrams.

use crate::NlError;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use std::time::Duration;

/// The longest [`Subscription::recv`] waits.
pub const RECV_WAIT: Duration = Duration::from_secs(1);

const NETLINK_NETFILTER: isize = 12;
/// NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
const MSG_CONFIG: u16 = (4 << 8) | 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
/// NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH, NFULA_CFG_TIMEOUT
const CFG_CMD: u16 = 1;
const CFG_MODE: u16 = 2;
const CFG_TIMEOUT: u16 = 4;
const CFG_QTHRESH: u16 = 5;
const CMD_BIND: u8 = 1;
const CMD_UNBIND: u8 = 2;
const COPY_PACKET: u8 = 2;

fn transport(e: impl std::fmt::Display) -> NlError {
    NlError::Transport(e.to_string())
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize((out.len() + 3) & !3, 0);
}

fn config(group: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + attrs.len());
    m.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&MSG_CONFIG.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, version 0, res_id = the group (big endian)
    m.push(0);
    m.push(0);
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

/// A bound NFLOG group.
pub struct Subscription {
    sock: Socket,
    group: u16,
}

impl Subscription {
    /// Binds group `group` in this thread's namespace, copying the first
    /// `copy` bytes of each packet (the IP and transport headers need 60).
    /// Fails when another socket holds the group (`EBUSY`).
    pub fn open(group: u16, copy: u32) -> Result<Self, NlError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(transport)?;
        sock.bind_auto().map_err(transport)?;
        sock.connect(&NlAddr::new(0, 0)).map_err(transport)?;
        let tv = nix::sys::time::TimeVal::new(RECV_WAIT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(NlError::Kernel)?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &tv)
            .map_err(NlError::Kernel)?;
        let sub = Self { sock, group };
        let mut bind = Vec::new();
        attr(&mut bind, CFG_CMD, &[CMD_BIND]);
        sub.request(1, &bind)?;
        let mut mode = Vec::new();
        let mut m = copy.to_be_bytes().to_vec();
        m.extend_from_slice(&[COPY_PACKET, 0]);
        attr(&mut mode, CFG_MODE, &m);
        // each packet on its own, at once (no batching, no flush timer)
        attr(&mut mode, CFG_QTHRESH, &1u32.to_be_bytes());
        attr(&mut mode, CFG_TIMEOUT, &0u32.to_be_bytes());
        sub.request(2, &mode)?;
        Ok(sub)
    }

    /// Sends one config request and reads its acknowledgement (packets
    /// of the group that arrive first are skipped; each read waits at most
    /// [`RECV_WAIT`], and at most 64 datagrams are read).
    fn request(&self, seq: u32, attrs: &[u8]) -> Result<(), NlError> {
        self.sock
            .send(&config(self.group, seq, attrs), 0)
            .map_err(transport)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for _ in 0..64 {
            buf.clear();
            self.sock.recv(&mut buf, 0).map_err(transport)?;
            let mut b = buf.as_slice();
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let got = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    break;
                }
                if kind == NLMSG_ERROR && got == seq && len >= 20 {
                    let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                    if code != 0 {
                        return Err(NlError::Kernel(nix::errno::Errno::from_raw(-code)));
                    }
                    return Ok(());
                }
                b = &b[((len + 3) & !3).min(b.len())..];
            }
        }
        Err(transport("nfnetlink_log: no acknowledgement"))
    }

    /// The next datagram (one or more messages) into `buf` (up to its
    /// capacity), or `None` when nothing came within [`RECV_WAIT`].
    pub fn recv(&self, buf: &mut Vec<u8>) -> Result<Option<usize>, NlError> {
        buf.clear();
        match self.sock.recv(buf, 0) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            // a burst overran the receive buffer: some packets were not
            // logged, the next ones will be
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Some(0)),
            Err(e) => Err(transport(e)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut unbind = Vec::new();
        attr(&mut unbind, CFG_CMD, &[CMD_UNBIND]);
        let _ = self.request(3, &unbind);
    }
}
