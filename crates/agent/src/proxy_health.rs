//! The health-check node ports of `externalTrafficPolicy: Local` Services,
//! answered as kube-proxy answers them: `200` with the number of local
//! endpoints when there is one, `503` when there is none, so an external
//! load balancer sends traffic only to nodes that can serve it locally.
//!
//! ```text
//! {"service":{"namespace":"default","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one health-check client may take.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle listener looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What one port answers: the Service and its local endpoints.
type Answer = Arc<Mutex<(String, usize)>>;

struct Listener {
    answer: Answer,
    stop: Arc<AtomicBool>,
}

/// The listeners, by port.
#[derive(Default)]
pub struct HealthPorts {
    ports: BTreeMap<u16, Listener>,
    /// ports whose bind failed (logged once)
    failed: std::collections::BTreeSet<u16>,
}

impl HealthPorts {
    /// The ports to answer now: (port, `namespace/name`, local endpoints).
    /// New ports start listening on every address, gone ones stop.
    /// Returns whether every wanted port listens (a port that could not be
    /// bound, e.g. still held by a listener that is stopping, is tried
    /// again by the next call; its failure is logged once).
    pub fn set(&mut self, wanted: Vec<(u16, String, usize)>) -> bool {
        let keep: BTreeMap<u16, (String, usize)> =
            wanted.into_iter().map(|(p, s, n)| (p, (s, n))).collect();
        self.ports.retain(|port, l| {
            let stay = keep.contains_key(port);
            if !stay {
                l.stop.store(true, Ordering::Relaxed);
            }
            stay
        });
        self.failed.retain(|p| keep.contains_key(p));
        let mut all = true;
        for (port, answer) in keep {
            if let Some(l) = self.ports.get(&port) {
                *l.answer.lock().unwrap_or_else(|p| p.into_inner()) = answer;
                continue;
            }
            match TcpListener::bind(("0.0.0.0", port)) {
                Ok(listener) => {
                    let l = Listener {
                        answer: Arc::new(Mutex::new(answer)),
                        stop: Arc::new(AtomicBool::new(false)),
                    };
                    let (a, s) = (l.answer.clone(), l.stop.clone());
                    std::thread::spawn(move || serve(listener, a, s));
                    self.ports.insert(port, l);
                    self.failed.remove(&port);
                }
                Err(e) => {
                    all = false;
                    if self.failed.insert(port) {
                        tracing::warn!(port, service = %answer.0, error = %e,
                            "proxy: cannot listen on the health-check node port; trying again");
                    }
                }
            }
        }
        all
    }
}

fn serve(listener: TcpListener, answer: Answer, stop: Arc<AtomicBool>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let (svc, n) = answer.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let _ = reply(s, &svc, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// The response body for `svc` (`namespace/name`) with `n` local endpoints.
pub fn body(svc: &str, n: usize) -> String {
    let (ns, name) = svc.split_once('/').unwrap_or(("", svc));
    serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": n,
        "serviceProxyHealthy": true,
    })
    .to_string()
}

fn reply(mut s: TcpStream, svc: &str, n: usize) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // the request itself does not matter (any path, as kube-proxy)
    let mut buf = [0u8; 1024];
    let _ = s.read(&mut buf)?;
    let b = body(svc, n);
    let status = if n > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )
}
