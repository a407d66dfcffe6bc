//! Services in the lab: backends that say who they are and who they saw,
//! and a client that tells answered / refused / timed out apart — the
//! outcome a Service proxy is judged by (and compared across proxies).

use super::Lab;
use crate::netns;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an idle backend looks at its stop flag.
const POLL: Duration = Duration::from_millis(20);

/// A TCP and UDP backend in a pod, answering `NAME SEEN-ADDRESS\n`;
/// stopped when dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a client got from a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A backend answered: its name and the client address it saw.
    Answered {
        /// The backend's name (`POD-NODE`).
        by: String,
        /// The source address the backend saw.
        seen: SocketAddr,
    },
    /// Refused: a TCP reset or an ICMP unreachable.
    Refused,
    /// Nothing came back in time (dropped).
    TimedOut,
    /// Something else went wrong (named).
    Failed(String),
}

impl Outcome {
    /// The answering backend, if one answered.
    pub fn by(&self) -> Option<&str> {
        match self {
            Outcome::Answered { by, .. } => Some(by),
            _ => None,
        }
    }

    /// The kind only (`answered`, `refused`, `timed out`, `failed`).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Answered { .. } => "answered",
            Outcome::Refused => "refused",
            Outcome::TimedOut => "timed out",
            Outcome::Failed(_) => "failed",
        }
    }
}

fn tcp_loop(l: TcpListener, name: String, stop: Arc<AtomicBool>) {
    let _ = l.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = writeln!(s, "{name} {peer}");
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn udp_loop(u: UdpSocket, name: String, stop: Arc<AtomicBool>) {
    let _ = u.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = u.recv_from(&mut buf) {
            let _ = u.send_to(format!("{name} {peer}\n").as_bytes(), peer);
        }
    }
}

fn parse_answer(text: &str) -> Outcome {
    let mut it = text.split_whitespace();
    match (it.next(), it.next().and_then(|s| s.parse().ok())) {
        (Some(by), Some(seen)) => Outcome::Answered {
            by: by.to_string(),
            seen,
        },
        _ => Outcome::Failed(format!("unexpected answer {text:?}")),
    }
}

impl Lab {
    /// Serves TCP and UDP on `port` in pod `pod` of `node`, answering
    /// `POD-NODE SEEN-ADDRESS`.
    pub fn serve(&self, node: &str, pod: &str, port: u16) -> anyhow::Result<Backend> {
        let ns = netns::path(&self.pod_ns(node, pod));
        let at = SocketAddr::from(([0, 0, 0, 0], port));
        let (tcp, udp) = netns::within(&ns, || -> std::io::Result<_> {
            Ok((TcpListener::bind(at)?, UdpSocket::bind(at)?))
        })??;
        let name = format!("{pod}-{node}");
        let stop = Arc::new(AtomicBool::new(false));
        let (n1, s1) = (name.clone(), stop.clone());
        let (n2, s2) = (name, stop.clone());
        Ok(Backend {
            stop,
            threads: vec![
                std::thread::spawn(move || tcp_loop(tcp, n1, s1)),
                std::thread::spawn(move || udp_loop(udp, n2, s2)),
            ],
        })
    }

    /// One TCP connection from namespace `ns` to `to`: what came of it.
    pub fn probe_tcp(&self, ns: &str, to: SocketAddr, timeout: Duration) -> Outcome {
        let r = netns::within(&netns::path(ns), || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match r {
            Err(e) => Outcome::Failed(format!("enter {ns}: {e}")),
            Ok(Ok(text)) => parse_answer(&text),
            Ok(Err(e)) => io_outcome(&e),
        }
    }

    /// One UDP request from namespace `ns` to `to` (from `from_port`, 0:
    /// any): what came of it.
    pub fn probe_udp(
        &self,
        ns: &str,
        to: SocketAddr,
        from_port: u16,
        timeout: Duration,
    ) -> Outcome {
        let r = netns::within(&netns::path(ns), || -> std::io::Result<String> {
            let u = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], from_port)))?;
            u.connect(to)?;
            u.set_read_timeout(Some(timeout))?;
            u.send(b"?")?;
            let mut buf = [0u8; 512];
            let n = u.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).to_string())
        });
        match r {
            Err(e) => Outcome::Failed(format!("enter {ns}: {e}")),
            Ok(Ok(text)) => parse_answer(&text),
            Ok(Err(e)) => io_outcome(&e),
        }
    }

    /// A plain HTTP GET of `path` from namespace `ns`: (status code, body).
    pub fn http_get(&self, ns: &str, to: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let text = netns::within(&netns::path(ns), || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_write_timeout(Some(Duration::from_secs(3)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
            // a server that closes with our request partly unread sends a
            // reset after its answer: keep what came before it
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(String::from_utf8_lossy(&buf).to_string())
        })??;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("GET {to}{path}: no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused | K::ConnectionReset => Outcome::Refused,
        K::TimedOut | K::WouldBlock => Outcome::TimedOut,
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => Outcome::Refused,
            _ => Outcome::Failed(e.to_string()),
        },
    }
}
