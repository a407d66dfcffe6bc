//! A small synchronous rtnetlink client: one socket per namespace, one
//! request at a time, errors kept as errno.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use std::os::fd::BorrowedFd;

/// A netlink failure: the kernel's errno, or a socket/decoding problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NlError {
    /// The kernel refused the request.
    #[error("{0}")]
    Kernel(Errno),
    /// The socket or message decoding failed.
    #[error("netlink: {0}")]
    Transport(String),
}

impl NlError {
    /// The errno when the kernel refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel(e) => Some(*e),
            Self::Transport(_) => None,
        }
    }
}

/// The netlink attributes of `b`: (type without the nested and
/// byte-order flags, payload); stops at the first one whose length does
/// not fit.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, value))
    })
}

fn transport(e: impl std::fmt::Display) -> NlError {
    NlError::Transport(e.to_string())
}

/// A route netlink socket bound to the namespace it was opened in.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's namespace.
    pub fn open() -> Result<Self, NlError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(transport)?;
        sock.bind_auto().map_err(transport)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(transport)?;
        // extended acks would only add text; errno is what we match on
        Ok(Self { sock, seq: 0 })
    }

    /// Opens a socket inside the namespace `netns`: a short-lived thread
    /// enters it, opens the socket and hands it back. The socket stays bound
    /// to that namespace; no tokio worker ever changes namespace.
    pub fn open_in(netns: BorrowedFd<'_>) -> Result<Self, NlError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).map_err(NlError::Kernel)?;
                Self::open()
            })
            .join()
            .map_err(|_| transport("netns thread panicked"))?
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(transport)?;
        Ok(self.seq)
    }

    /// Sends `msg` with `flags` (plus REQUEST|ACK) and waits for the ack.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        let mut done = false;
        self.receive(seq, |_| {}, &mut done)
    }

    /// Sends a get request answered by one message (`RTM_GETLINK` by name).
    pub fn dump_one(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Option<RouteNetlinkMessage>, NlError> {
        let seq = self.send(msg, NLM_F_ACK)?;
        let mut first = None;
        let mut done = false;
        self.receive(
            seq,
            |m| {
                first.get_or_insert(m);
            },
            &mut done,
        )?;
        Ok(first)
    }

    /// Sends a dump request and collects every answer.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        let mut done = false;
        self.receive(seq, |m| out.push(m), &mut done)?;
        Ok(out)
    }

    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(RouteNetlinkMessage),
        done: &mut bool,
    ) -> Result<(), NlError> {
        while !*done {
            let (buf, _) = self.sock.recv_from_full().map_err(transport)?;
            let mut off = 0;
            while off < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..])
                    .map_err(transport)?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(transport("zero-length netlink message"));
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        *done = true;
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(NlError::Kernel(Errno::from_raw(-code.get()))),
                        };
                    }
                    NetlinkPayload::Done(_) => {
                        *done = true;
                    }
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
