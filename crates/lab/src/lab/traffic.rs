//! Traffic inside lab namespaces: commands, ping, a TCP echo that reports
//! the source address the server saw, and ping streams that run while a
//! test changes something.

use super::Lab;
use crate::exec::{self, ExecError, Timed};
use crate::netns;
use anyhow::{anyhow, bail};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `ping` running in a namespace while a test does something else. Its
/// output is read as it comes, so a test can wait for the first reply
/// (the stream is really flowing) before it disturbs anything. Killed (by
/// PID) when dropped unfinished.
pub struct PingStream {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    count: u32,
}

impl PingStream {
    /// Waits (at most `timeout`) for the first echo reply.
    pub fn wait_first_reply(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen.iter().any(|l| l.contains("bytes from")) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => bail!(
                    "no echo reply within {timeout:?}; ping said: {}",
                    self.seen.join(" | ")
                ),
            }
        }
    }

    /// Waits (at most `timeout`) for the stream to end; returns (sent,
    /// received) from ping's summary.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "ping of {} packets did not end within {timeout:?}",
                        self.count
                    )
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        // "150 packets transmitted, 150 received, 0% packet loss, time 3004ms"
        let summary = self
            .seen
            .iter()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow!("no ping summary in: {}", self.seen.join(" | ")))?;
        let num = |word: &str| -> Option<u32> {
            let words: Vec<&str> = summary.split_whitespace().collect();
            let i = words.iter().position(|w| w.trim_end_matches(',') == word)?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        };
        match (num("packets"), num("received")) {
            (Some(s), Some(r)) => Ok((s, r)),
            _ => bail!("unreadable ping summary: {summary}"),
        }
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Lab {
    /// Runs `args` inside namespace `ns` with a timeout; returns the output.
    pub fn exec(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Timed, ExecError> {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        exec::run(cmd, Some(&netns::path(ns)), &[], timeout)
    }

    /// `ping -c COUNT` from namespace `ns`; the average RTT when all came back.
    pub fn ping(&self, ns: &str, target: &str, count: u32) -> Option<Duration> {
        let c = count.to_string();
        let t = self
            .exec(
                ns,
                &[
                    "ping", "-n", "-q", "-c", &c, "-i", "0.05", "-W", "1", target,
                ],
                Duration::from_secs(5 + u64::from(count)),
            )
            .ok()?;
        if !t.output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&t.output.stdout);
        // rtt min/avg/max/mdev = 0.030/0.041/0.052/0.011 ms
        let avg = text
            .lines()
            .find(|l| l.contains("min/avg/max"))?
            .split('=')
            .nth(1)?
            .split('/')
            .nth(1)?
            .trim()
            .parse::<f64>()
            .ok()?;
        Some(Duration::from_secs_f64(avg / 1000.0))
    }

    /// A TCP exchange: a server in `server_ns` on `ip:port` echoes what a
    /// client in `client_ns` sends. Returns the peer address the server saw.
    pub fn tcp_exchange(
        &self,
        client_ns: &str,
        server_ns: &str,
        ip: &str,
        port: u16,
    ) -> anyhow::Result<std::net::SocketAddr> {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
        let listener = netns::within(&netns::path(server_ns), || TcpListener::bind(addr))??;
        let server = std::thread::spawn(move || -> std::io::Result<std::net::SocketAddr> {
            listener.set_nonblocking(false)?;
            let (mut s, peer) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
            Ok(peer)
        });
        let echoed = netns::within(&netns::path(client_ns), || -> std::io::Result<Vec<u8>> {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"hello")?;
            let mut buf = vec![0u8; 5];
            c.read_exact(&mut buf)?;
            Ok(buf)
        })?;
        let echoed = match echoed {
            Ok(b) => b,
            Err(e) => {
                // unblock the server thread so it does not outlive the test
                let _ = netns::within(&netns::path(client_ns), || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                });
                bail!("tcp {client_ns} -> {addr}: {e}");
            }
        };
        let peer = server
            .join()
            .map_err(|_| anyhow!("tcp server thread panicked"))??;
        if echoed != b"hello" {
            bail!("tcp {client_ns} -> {addr}: echo mismatch");
        }
        Ok(peer)
    }

    /// The routes trellis owns (`proto 84`) in `node`'s namespace, as `ip
    /// route show` prints them.
    pub fn routes(&self, node: &str) -> anyhow::Result<String> {
        Ok(exec::ip(&[
            "-n",
            &self.ns(node),
            "route",
            "show",
            "proto",
            "84",
        ])?)
    }

    /// `GET path` from `node`'s agent HTTP endpoint (127.0.0.1:9750 inside
    /// the node's namespace); returns (status line, body).
    pub fn agent_http(&self, node: &str, path: &str) -> anyhow::Result<(String, String)> {
        use std::io::{Read, Write};
        let ns = netns::path(&self.ns(node));
        let text = netns::within(&ns, || -> std::io::Result<String> {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9750));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("{node} {path}: not an HTTP response: {text:?}"))?;
        Ok((
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        ))
    }

    /// Starts `ping -c COUNT -i INTERVAL` from `ns` to `target`.
    pub fn ping_stream(
        &self,
        ns: &str,
        target: &str,
        count: u32,
        interval: Duration,
    ) -> anyhow::Result<PingStream> {
        let mut cmd = Command::new("ping");
        cmd.args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
            "-W",
            "1",
            target,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = netns::spawn_in(Some(&netns::path(ns)), &mut cmd)?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("ping: no stdout"))?;
        let (tx, lines) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(PingStream {
            child: Some(child),
            lines,
            seen: vec![],
            count,
        })
    }
}
