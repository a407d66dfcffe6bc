//! One peer's session: a task that owns the TCP connection and the three
//! timers, feeds the pure FSM and carries out its actions. Routes are not
//! handled here: UPDATEs go to the core, UPDATEs to send come from it.

use super::{FromSession, PeerSpec, SessionMsg};
use crate::fsm::{Action, Event, Fsm, PeerConfig, State, Timer};
use crate::wire::{decode, encode, Ctx, Message};
use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the core tells a session.
#[derive(Debug)]
pub(crate) enum ToSession {
    /// Send these (only while established).
    Send(Vec<Message>),
    /// The peer connected to our listener.
    Incoming(TcpStream),
    /// Send a Cease and end.
    Stop,
}

type Dial = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

struct Session {
    spec: PeerSpec,
    gen: u64,
    fsm: Fsm,
    stream: Option<TcpStream>,
    dial: Option<Dial>,
    /// When the connection attempt in `dial` started.
    dial_started: Option<Instant>,
    timers: [Option<Instant>; 3],
    ctx: Ctx,
    buf: Vec<u8>,
    to_core: mpsc::Sender<SessionMsg>,
    /// The last note shown and when: a repeat within [`NOTE_REPEAT`] is
    /// recorded (status) but not logged again.
    last_note: Option<(String, Instant)>,
    /// Why we closed the connection ourselves (a write failed), reported
    /// instead of the FSM's generic reason when the session goes down.
    close_reason: Option<String>,
    reported: State,
    /// Connection attempts that failed in a row: retries start fast (a
    /// node's peer is often just starting) and back off to the configured
    /// connect-retry time.
    failed_dials: u32,
}

/// First retry after a failed connection attempt.
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The same note is logged again only after this long.
const NOTE_REPEAT: std::time::Duration = std::time::Duration::from_secs(60);
/// Write deadline when the peers agreed on no hold time.
const NO_HOLD_WRITE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(90);

fn slot(t: Timer) -> usize {
    match t {
        Timer::ConnectRetry => 0,
        Timer::Hold => 1,
        Timer::Keepalive => 2,
    }
}

const TIMERS: [Timer; 3] = [Timer::ConnectRetry, Timer::Hold, Timer::Keepalive];

/// Runs the session until told to stop or the core goes away.
pub(crate) async fn run(
    spec: PeerSpec,
    cfg: PeerConfig,
    gen: u64,
    mut rx: mpsc::Receiver<ToSession>,
    to_core: mpsc::Sender<SessionMsg>,
) {
    let mut s = Session {
        spec,
        gen,
        fsm: Fsm::new(cfg),
        stream: None,
        dial: None,
        dial_started: None,
        timers: [None; 3],
        ctx: Ctx::default(),
        buf: Vec::with_capacity(1 << 16),
        to_core,
        last_note: None,
        close_reason: None,
        reported: State::Idle,
        failed_dials: 0,
    };
    let mut queue: VecDeque<Event> = VecDeque::from([Event::Start]);
    let mut stopping = false;
    loop {
        while let Some(ev) = queue.pop_front() {
            let tcp_failure = matches!(ev, Event::TcpDown);
            for act in s.fsm.handle(ev) {
                if let Some(e) = s.exec(act, tcp_failure).await {
                    queue.push_back(e);
                }
            }
            s.report_state().await;
        }
        if stopping {
            return;
        }
        let next_timer = s
            .timers
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (t, i)))
            .min();
        tokio::select! {
            cmd = rx.recv() => match cmd {
                // the core is gone (the speaker was dropped): close
                // without a Cease, as a crash would
                None => return,
                Some(ToSession::Stop) => { queue.push_back(Event::Stop); stopping = true; }
                Some(ToSession::Send(msgs)) => {
                    if s.fsm.state() == State::Established {
                        if let Some(e) = s.send(&msgs).await {
                            queue.push_back(e);
                        }
                    }
                }
                Some(ToSession::Incoming(stream)) => {
                    if s.stream.is_none() && s.fsm.state() != State::Idle {
                        s.dial = None;
                        let _ = stream.set_nodelay(true);
                        s.stream = Some(stream);
                        queue.push_back(Event::TcpUp);
                    }
                    // else: a collision; we keep the connection we have and
                    // the peer's side resolves it (RFC 4271 6.8)
                }
            },
            r = read(s.stream.as_mut(), &mut s.buf) => match r {
                Ok(0) | Err(_) => queue.push_back(Event::TcpDown),
                Ok(_) => s.decode_into(&mut queue).await,
            },
            r = dial(s.dial.as_mut()) => {
                s.dial = None;
                s.dial_started = None;
                match r {
                    Ok(stream) => {
                        s.failed_dials = 0;
                        s.stream = Some(stream);
                        queue.push_back(Event::TcpUp);
                    }
                    Err(e) => {
                        s.failed_dials = s.failed_dials.saturating_add(1);
                        s.note(format!("connect to {}: {e}", s.spec.addr)).await;
                        queue.push_back(Event::TcpDown);
                    }
                }
            },
            () = sleep_until(next_timer.map(|(t, _)| t)) => {
                if let Some((_, i)) = next_timer {
                    s.timers[i] = None;
                    queue.push_back(Event::Expired(TIMERS[i]));
                }
            },
        }
    }
}

async fn read(stream: Option<&mut TcpStream>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    match stream {
        Some(s) => {
            if buf.capacity() - buf.len() < 8192 {
                buf.reserve(1 << 16);
            }
            s.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

async fn dial(d: Option<&mut Dial>) -> std::io::Result<TcpStream> {
    match d {
        Some(d) => d.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    password: Option<String>,
    ttl: Option<u32>,
) -> Dial {
    Box::pin(async move {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(key) = &password {
            crate::md5::set_md5(std::os::fd::AsFd::as_fd(&sock), addr, key.as_bytes())?;
        }
        if let Some(l) = local {
            sock.bind(SocketAddr::new(l, 0))?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer in {} s", CONNECT_TIMEOUT.as_secs()),
                )
            })??;
        if let Some(ttl) = ttl {
            stream.set_ttl(ttl)?;
        }
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

impl Session {
    /// Waits while the core's queue is full: the session stops reading,
    /// and TCP slows the peer down.
    fn tell(&self, msg: FromSession) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tx = self.to_core.clone();
        let m = SessionMsg {
            peer: self.spec.addr,
            gen: self.gen,
            msg,
        };
        async move {
            let _ = tx.send(m).await;
        }
    }

    /// Reports `why` (status always; the log once per [`NOTE_REPEAT`]).
    async fn note(&mut self, why: String) {
        let now = Instant::now();
        let log = match &self.last_note {
            Some((last, at)) => *last != why || now.duration_since(*at) >= NOTE_REPEAT,
            None => true,
        };
        if log {
            self.last_note = Some((why.clone(), now));
        }
        self.tell(FromSession::Note { text: why, log }).await;
    }

    async fn report_state(&mut self) {
        let st = self.fsm.state();
        if st != self.reported {
            self.reported = st;
            self.tell(FromSession::State(st)).await;
        }
    }

    /// How long one write may take: the hold time (a peer that does not
    /// read for that long is as dead as one that does not send).
    fn write_deadline(&self) -> std::time::Duration {
        let hold = self.fsm.hold();
        if hold.is_zero() {
            NO_HOLD_WRITE_DEADLINE
        } else {
            hold
        }
    }

    async fn decode_into(&mut self, queue: &mut VecDeque<Event>) {
        let mut at = 0;
        loop {
            match decode(&self.buf[at..], self.ctx) {
                Ok(Some((msg, n))) => {
                    at += n;
                    if let Message::Open(o) = &msg {
                        // the codec context follows the peer's OPEN at once
                        self.ctx = Ctx {
                            four_octet_as: o.four_octet_as(),
                        };
                    }
                    queue.push_back(Event::Received(msg));
                }
                Ok(None) => break,
                Err(e) => {
                    self.note(format!("malformed message: {}", e.0.describe()))
                        .await;
                    queue.push_back(Event::Malformed(e.0));
                    at = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..at);
    }

    async fn send(&mut self, msgs: &[Message]) -> Option<Event> {
        let deadline = self.write_deadline();
        let ctx = self.ctx;
        let stream = self.stream.as_mut()?;
        let mut bytes = Vec::new();
        for m in msgs {
            bytes.extend_from_slice(&encode(m, ctx));
        }
        let written = tokio::time::timeout(deadline, stream.write_all(&bytes)).await;
        match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                self.close_reason = Some(format!("write: {e}"));
                Some(Event::TcpDown)
            }
            Err(_) => {
                self.close_reason = Some(format!(
                    "write: the peer read nothing for {} s (the hold time); connection closed",
                    deadline.as_secs()
                ));
                Some(Event::TcpDown)
            }
        }
    }

    async fn exec(&mut self, act: Action, tcp_failure: bool) -> Option<Event> {
        match act {
            Action::Connect => {
                if let Some(started) = self.dial_started.take() {
                    // the retry timer ends an attempt that got no answer
                    // (SYNs dropped): say so instead of starting over silently
                    self.failed_dials = self.failed_dials.saturating_add(1);
                    self.note(format!(
                        "connect to {}: no answer in {} ms; retrying",
                        self.spec.addr,
                        started.elapsed().as_millis()
                    ))
                    .await;
                }
                if !self.spec.passive && self.stream.is_none() {
                    let ttl = (self.spec.asn != self.spec.local_as)
                        .then_some(if self.spec.multihop { 255 } else { 1 });
                    self.dial = Some(connect(
                        SocketAddr::new(self.spec.addr, self.spec.port),
                        self.spec.local_addr,
                        self.spec.password.clone(),
                        ttl,
                    ));
                    self.dial_started = Some(Instant::now());
                }
                None
            }
            Action::Send(m) => {
                if let Message::Notification(n) = &m {
                    self.note(format!("sent NOTIFICATION: {}", n.describe()))
                        .await;
                }
                self.send(std::slice::from_ref(&m)).await
            }
            Action::Close => {
                self.stream = None;
                self.dial = None;
                self.dial_started = None;
                self.buf.clear();
                self.ctx = Ctx::default();
                None
            }
            Action::Arm(t, d) => {
                let d = if t == Timer::ConnectRetry && self.failed_dials > 0 {
                    d.min(FIRST_RETRY * 2u32.saturating_pow(self.failed_dials - 1))
                } else {
                    d
                };
                self.timers[slot(t)] = Some(Instant::now() + d);
                None
            }
            Action::Disarm(t) => {
                self.timers[slot(t)] = None;
                None
            }
            Action::Up(open, ctx) => {
                self.ctx = ctx;
                self.close_reason = None;
                let local = self
                    .stream
                    .as_ref()
                    .and_then(|s| s.local_addr().ok())
                    .map(|a| a.ip());
                self.tell(FromSession::Up { open, local }).await;
                None
            }
            Action::Down(why) => {
                let why = self.close_reason.take().unwrap_or(why);
                self.tell(FromSession::Down {
                    why,
                    graceful: tcp_failure,
                })
                .await;
                None
            }
            Action::Update(u) => {
                self.tell(FromSession::Update(u)).await;
                None
            }
            Action::Refresh(afi, safi) => {
                self.tell(FromSession::Refresh(afi, safi)).await;
                None
            }
        }
    }
}
