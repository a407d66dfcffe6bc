//! The agent's HTTP endpoint (default `127.0.0.1:9750`, the config's
//! `httpAddress`): `/healthz` (the process answers), `/readyz` (joined,
//! first sync done, CNI server up, nothing fatal; 503 names what is
//! missing) and `/metrics` (Prometheus text). A small HTTP/1.0 server on
//! plain threads: one request per connection, a read and a write timeout
//! on every socket, at most [`MAX_CONNECTIONS`] served at once.

use crate::health::Health;
use crate::metrics::Metrics;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at the same time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole request must arrive within this (a client trickling a byte
/// at a time cannot hold a connection slot for long).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// What the endpoint reads.
#[derive(Clone)]
pub struct HttpState {
    /// Readiness.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The policy table as the kernel holds it (`/policy/trace`).
    pub policy: crate::policy::View,
    /// The last denied packets logged (`/policy/denials`).
    pub denials: crate::policy_log::Denials,
}

/// A response: status line, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// `200 OK`, `503 Service Unavailable`, ...
    pub status: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

/// Routes one request line (`GET /path HTTP/1.1`).
pub fn route(state: &HttpState, request_line: &str) -> Reply {
    let text = "text/plain; charset=utf-8";
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return Reply {
            status: "405 Method Not Allowed",
            content_type: text,
            body: format!("method {method:?} not allowed; use GET\n"),
        };
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => Reply {
            status: "200 OK",
            content_type: text,
            body: "ok\n".into(),
        },
        "/readyz" => {
            let missing = state.health.not_ready();
            if missing.is_empty() {
                Reply {
                    status: "200 OK",
                    content_type: text,
                    body: "ok\n".into(),
                }
            } else {
                Reply {
                    status: "503 Service Unavailable",
                    content_type: text,
                    body: missing.join("\n") + "\n",
                }
            }
        }
        "/metrics" => Reply {
            status: "200 OK",
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: state.metrics.encode(),
        },
        "/policy/trace" => {
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            match crate::policy::trace(&state.policy, query) {
                Ok(json) => Reply {
                    status: "200 OK",
                    content_type: "application/json",
                    body: json,
                },
                Err(e) => Reply {
                    status: "400 Bad Request",
                    content_type: text,
                    body: format!("{e}\n"),
                },
            }
        }
        "/policy/denials" => Reply {
            status: "200 OK",
            content_type: "application/json",
            body: state.denials.json(),
        },
        other => Reply {
            status: "404 Not Found",
            content_type: text,
            body: format!(
                "{other:?}: not found; try /healthz, /readyz, /metrics, /policy/trace or /policy/denials\n"
            ),
        },
    }
}

/// Binds `addr` and serves on a thread of its own.
pub fn serve(addr: SocketAddr, state: HttpState) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("httpAddress {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (state, done) = (state.clone(), busy.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            if let Err(e) = answer(stream, &state) {
                                tracing::debug!(error = %e, "http connection");
                            }
                            done.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    // the closure never ran: give its slot back
                    busy.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(error = %e, "http: cannot start a connection thread");
                }
            }
        })?;
    Ok(bound)
}

fn answer(stream: TcpStream, state: &HttpState) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?).take(16 * 1024);
    let started = std::time::Instant::now();
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // drain the headers (bounded by `take` and the request deadline)
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
        if started.elapsed() > REQUEST_DEADLINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request headers too slow",
            ));
        }
    }
    let reply = route(state, &line);
    let head_only = line.starts_with("HEAD ");
    let mut out = stream;
    write!(
        out,
        "HTTP/1.0 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    )?;
    if !head_only {
        out.write_all(reply.body.as_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn state() -> HttpState {
        let (h, _rx) = Health::new();
        HttpState {
            policy: Default::default(),
            denials: Default::default(),
            health: Arc::new(h),
            metrics: Arc::new(Metrics::new()),
        }
    }

    #[test]
    fn routes() {
        let s = state();
        assert_eq!(route(&s, "GET /healthz HTTP/1.1").status, "200 OK");
        let r = route(&s, "GET /readyz HTTP/1.1");
        assert_eq!(r.status, "503 Service Unavailable");
        assert!(r.body.contains("not joined"), "{}", r.body);
        s.health.set_joined();
        s.health.set_synced();
        s.health.set_cni_up();
        assert_eq!(route(&s, "GET /readyz HTTP/1.1").status, "200 OK");
        assert!(route(&s, "GET /metrics HTTP/1.1")
            .body
            .contains("trellis_datastore_watch_restarts_total"));
        assert_eq!(route(&s, "GET /nope HTTP/1.1").status, "404 Not Found");
        assert_eq!(
            route(&s, "POST /healthz HTTP/1.1").status,
            "405 Method Not Allowed"
        );
        assert_eq!(route(&s, "").status, "405 Method Not Allowed");
    }

    #[test]
    fn serves_over_tcp_on_loopback() {
        let addr = serve("127.0.0.1:0".parse().expect("addr"), state()).expect("serve");
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut body = String::new();
        c.read_to_string(&mut body).expect("read");
        assert!(body.starts_with("HTTP/1.0 200 OK\r\n"), "{body}");
        assert!(body.ends_with("\r\n\r\nok\n"), "{body}");
        // a client that never sends a request line costs one thread for
        // at most the read timeout, and the next client is still served
        let _silent = TcpStream::connect(addr).expect("connect");
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        c.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").expect("write");
        let mut body = String::new();
        c.read_to_string(&mut body).expect("read");
        assert!(body.starts_with("HTTP/1.0 503"), "{body}");
    }
}
