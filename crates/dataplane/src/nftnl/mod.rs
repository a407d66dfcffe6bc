//! Applying an nft script straight over netlink (`NETLINK_NETFILTER`), as
//! one nf_tables transaction, without the `nft` binary.
//!
//! Why: `nft -f` reads the whole table into its cache before it applies
//! anything, whatever the script: with 5,000 Services one added element
//! costs it 50-90 ms, with 30,000 several hundred. Here a change costs
//! what it contains. The script language is the subset trellis writes
//! ([`script`], [`rule`]), compiled to the expressions nft 1.0.6 emits for
//! it, so `nft list` prints the table back exactly as written (checked in
//! the tests against nft loading the same scripts).

mod expr;
pub mod rule;
pub mod script;
pub mod types;
pub mod wire;

use crate::NlError;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use std::time::{Duration, Instant};

/// What is wrong with a script (names the line and the part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

const NETLINK_NETFILTER: isize = 12;
const NLMSG_ERROR: u16 = 2;

/// Each command's line with the sequence number of its last message.
pub type Lines = Vec<(u32, String)>;

/// Compiles `text` into one batch: (messages, line of each message's
/// command by sequence number).
pub fn compile(
    text: &str,
    schema: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<u8>, Lines), ParseError> {
    let s = script::parse(text, schema)?;
    let mut seq = 0u32;
    let mut set_id = 0u32;
    let mut buf = wire::batch(wire::NFNL_MSG_BATCH_BEGIN, seq);
    let mut lines = Vec::with_capacity(s.cmds.len());
    let n = s.cmds.len();
    for (i, ((_, line, cmd), table)) in s.cmds.iter().zip(&s.tables).enumerate() {
        let mut msgs = wire::encode(table, cmd, &mut seq, &mut set_id);
        // only the last message asks for an acknowledgement: errors come
        // for every failing message anyway
        if i + 1 == n {
            if let Some(last) = msgs.last_mut() {
                let flags = u16::from_ne_bytes([last[6], last[7]]) | wire::NLM_F_ACK;
                last[6..8].copy_from_slice(&flags.to_ne_bytes());
            }
        }
        for m in msgs {
            buf.extend_from_slice(&m);
        }
        lines.push((seq, line.clone()));
    }
    seq += 1;
    buf.extend_from_slice(&wire::batch(wire::NFNL_MSG_BATCH_END, seq));
    Ok((buf, lines))
}

fn transport(e: impl std::fmt::Display) -> NlError {
    NlError::Transport(e.to_string())
}

/// The line of the command whose message had sequence number `seq`.
fn line_of(lines: &[(u32, String)], seq: u32) -> &str {
    // `lines` holds each command's last sequence number, ascending
    let i = lines.partition_point(|(last, _)| *last < seq);
    lines.get(i).map(|(_, l)| l.as_str()).unwrap_or("(batch)")
}

/// The socket batches go through, kept open between batches: closing a
/// NETLINK_NETFILTER socket makes the kernel wait for the previous
/// transaction's deferred release (an RCU grace period: 4-16 ms here,
/// measured with strace), which a one-element change would pay every time.
/// Only a socket whose batch ended cleanly (final acknowledgement read,
/// nothing left queued) goes back. A socket belongs to the network
/// namespace it was opened in (and keeps it alive): only sockets of the
/// process's own namespace are kept, and used only by a thread in it
/// (tests and the CNI side enter namespaces per thread).
type Pooled = ((u64, u64), Socket);
static SOCKET: std::sync::Mutex<Option<Pooled>> = std::sync::Mutex::new(None);

/// The calling thread's network namespace (device, inode), when it is
/// the process's own (the main thread's).
fn netns_id() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mine = id("/proc/thread-self/ns/net")?;
    (id("/proc/self/ns/net")? == mine).then_some(mine)
}

fn open_socket() -> Result<Socket, NlError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(transport)?;
    sock.bind_auto().map_err(transport)?;
    sock.connect(&NlAddr::new(0, 0)).map_err(transport)?;
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&sock, sockopt::RcvBufForce, &(1 << 22)).map_err(NlError::Kernel)?;
    // every socket write and read has a deadline
    let tv = nix::sys::time::TimeVal::new(1, 0);
    setsockopt(&sock, sockopt::SendTimeout, &tv).map_err(NlError::Kernel)?;
    setsockopt(&sock, sockopt::ReceiveTimeout, &tv).map_err(NlError::Kernel)?;
    Ok(sock)
}

/// Reads what is still queued on `sock` without waiting: `true` when
/// nothing was.
fn drained(sock: &Socket) -> bool {
    let mut buf = Vec::with_capacity(1 << 16);
    !matches!(sock.recv(&mut buf, libc_dontwait()), Ok(n) if n > 0)
}

fn libc_dontwait() -> i32 {
    nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits()
}

/// Sends `batch` and waits for the kernel's verdict, at most `deadline`.
/// The first error names the command it came from.
pub fn send(batch: &[u8], lines: &[(u32, String)], deadline: Duration) -> Result<(), NlError> {
    if lines.is_empty() {
        return Ok(());
    }
    let ns = netns_id();
    let pooled = {
        let mut pool = SOCKET.lock().unwrap_or_else(|p| p.into_inner());
        match pool.take() {
            Some((id, s)) if Some(id) == ns => Some(s),
            other => {
                *pool = other;
                None
            }
        }
    };
    let sock = match pooled {
        Some(s) => s,
        None => open_socket()?,
    };
    let (result, clean) = exchange(&sock, batch, lines, deadline);
    if let (true, Some(id)) = (clean && drained(&sock), ns) {
        // a socket it replaces closes outside the lock (closing waits)
        let replaced = SOCKET
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((id, sock));
        drop(replaced);
    }
    result
}

/// One batch over `sock`: the verdict, and whether the exchange ended
/// cleanly (the final acknowledgement read).
fn exchange(
    sock: &Socket,
    batch: &[u8],
    lines: &[(u32, String)],
    deadline: Duration,
) -> (Result<(), NlError>, bool) {
    let last_seq = lines.last().map(|(s, _)| *s).unwrap_or(0);
    use nix::sys::socket::{setsockopt, sockopt};
    // one send of the whole batch (the kernel takes a batch per message)
    if let Err(e) = setsockopt(sock, sockopt::SndBufForce, &(batch.len() + (1 << 16))) {
        return (Err(NlError::Kernel(e)), false);
    }
    match sock.send(batch, 0) {
        Ok(sent) if sent == batch.len() => {}
        Ok(sent) => {
            return (
                Err(transport(format!("sent {sent} of {} bytes", batch.len()))),
                false,
            )
        }
        Err(e) => return (Err(transport(e)), false),
    }
    let end = Instant::now() + deadline;
    let mut first_error: Option<String> = None;
    let mut errors = 0usize;
    loop {
        let mut buf = Vec::with_capacity(1 << 16);
        match sock.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() > end {
                    return (
                        Err(transport(format!(
                            "the kernel did not answer the nf_tables batch within {deadline:?}"
                        ))),
                        false,
                    );
                }
                continue;
            }
            Err(e) => return (Err(transport(e)), false),
        }
        let mut b = buf.as_slice();
        while b.len() >= 16 {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            if len < 16 || len > b.len() {
                break;
            }
            if kind == NLMSG_ERROR && len >= 36 {
                let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                // the echoed request header follows the code
                let seq = u32::from_ne_bytes([b[28], b[29], b[30], b[31]]);
                // an error for the batch's begin (seq 0): the kernel
                // refused the whole batch (its commit failed); no further
                // answer comes
                if code != 0 && seq == 0 {
                    let errno = nix::errno::Errno::from_raw(-code);
                    return (
                        Err(NlError::Transport(format!(
                            "the kernel refused the batch: {errno} (nothing was applied)"
                        ))),
                        false,
                    );
                }
                if code != 0 {
                    errors += 1;
                    if first_error.is_none() {
                        let errno = nix::errno::Errno::from_raw(-code);
                        first_error = Some(format!("{}: {errno}", line_of(lines, seq)));
                    }
                }
                if seq >= last_seq {
                    // anything after the final acknowledgement in this
                    // read makes the socket unfit for the next batch
                    let rest = b.len() > ((len + 3) & !3);
                    let verdict = match first_error {
                        None => Ok(()),
                        Some(e) => Err(NlError::Transport(if errors > 1 {
                            format!("{e} (and {} more errors; nothing was applied)", errors - 1)
                        } else {
                            format!("{e} (nothing was applied)")
                        })),
                    };
                    return (verdict, !rest);
                }
            }
            b = &b[((len + 3) & !3).min(b.len())..];
        }
    }
}

/// Compiles and applies `text` as one transaction.
pub fn apply(
    text: &str,
    schema: &dyn Fn(&str) -> Option<String>,
    deadline: Duration,
) -> Result<(), NlError> {
    let (batch, lines) = compile(text, schema).map_err(|e| NlError::Transport(e.0))?;
    send(&batch, &lines, deadline)
}
