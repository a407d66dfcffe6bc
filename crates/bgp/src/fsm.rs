//! The per-peer finite state machine (RFC 4271 section 8), as a pure
//! function of events: the driver owns the socket and the timers, feeds
//! events in and carries out the actions that come back. So every
//! transition is testable without a network.

use crate::wire::{Capability, Ctx, Message, Notification, Open, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use std::net::Ipv4Addr;
use std::time::Duration;

/// Session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not trying.
    Idle,
    /// Waiting for our TCP connection.
    Connect,
    /// Waiting for the peer to connect (or for the retry timer).
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for the first KEEPALIVE.
    OpenConfirm,
    /// Routes flow.
    Established,
}

/// The timers the driver runs for the FSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Connect retry.
    ConnectRetry,
    /// Hold: the peer must be heard from before it fires.
    Hold,
    /// Keepalive: time to send one.
    Keepalive,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start the session (ManualStart / AutomaticStart).
    Start,
    /// Stop it (ManualStop): a Cease goes to the peer.
    Stop,
    /// Our TCP connection (or an accepted one) is up.
    TcpUp,
    /// The TCP connection failed or closed.
    TcpDown,
    /// A timer fired.
    Expired(Timer),
    /// A message arrived.
    Received(Message),
    /// Bytes arrived that do not decode: the NOTIFICATION to send.
    Malformed(Notification),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer.
    Connect,
    /// Send a message.
    Send(Message),
    /// Close the TCP connection.
    Close,
    /// (Re)start a timer.
    Arm(Timer, Duration),
    /// Stop a timer.
    Disarm(Timer),
    /// The session is established with this OPEN and codec context.
    Up(Box<Open>, Ctx),
    /// The session went down (routes learned from it must go, or be kept as
    /// stale under graceful restart).
    Down(String),
    /// An UPDATE to process.
    Update(crate::wire::Update),
    /// The peer asks us to send our routes again (ROUTE-REFRESH).
    Refresh(u16, u8),
}

/// This side of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Our AS.
    pub local_as: u32,
    /// Our router id.
    pub router_id: Ipv4Addr,
    /// The AS we expect from the peer.
    pub remote_as: u32,
    /// Hold time we offer (0 disables keepalives, else at least 3 s).
    pub hold_time: u16,
    /// Connect retry interval.
    pub connect_retry: Duration,
    /// Graceful-restart time we announce (0: no graceful restart).
    pub restart_time: u16,
    /// We are restarting (R bit) and preserved forwarding state (F bit).
    pub restarting: bool,
}

/// The state machine of one peer.
#[derive(Debug, Clone)]
pub struct Fsm {
    cfg: PeerConfig,
    state: State,
    hold: Duration,
    peer: Option<Open>,
}

/// The hold time used when none is negotiated yet (RFC 4271: 4 minutes).
pub const LARGE_HOLD: Duration = Duration::from_secs(240);

impl Fsm {
    /// A stopped session.
    pub fn new(cfg: PeerConfig) -> Self {
        Self {
            cfg,
            state: State::Idle,
            hold: LARGE_HOLD,
            peer: None,
        }
    }

    /// The hold time in force: negotiated once OPENs were exchanged,
    /// [`LARGE_HOLD`] before (zero: the peers agreed on no keepalives).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The peer's OPEN once received.
    pub fn peer_open(&self) -> Option<&Open> {
        self.peer.as_ref()
    }

    /// Our OPEN.
    pub fn open(&self) -> Open {
        let mut capabilities = vec![
            Capability::MultiProtocol(AFI_IPV4, SAFI_UNICAST),
            Capability::MultiProtocol(AFI_IPV6, SAFI_UNICAST),
            Capability::RouteRefresh,
            Capability::FourOctetAs(self.cfg.local_as),
        ];
        if self.cfg.restart_time > 0 {
            capabilities.push(Capability::GracefulRestart {
                restarting: self.cfg.restarting,
                time: self.cfg.restart_time,
                families: vec![
                    (AFI_IPV4, SAFI_UNICAST, self.cfg.restarting),
                    (AFI_IPV6, SAFI_UNICAST, self.cfg.restarting),
                ],
            });
        }
        Open {
            asn: self.cfg.local_as,
            hold_time: self.cfg.hold_time,
            id: self.cfg.router_id,
            capabilities,
        }
    }

    fn keepalive_every(&self) -> Option<Duration> {
        (!self.hold.is_zero()).then(|| self.hold / 3)
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        use Action::*;
        match (self.state, ev) {
            (State::Idle, Event::Start) => {
                self.state = State::Connect;
                vec![Arm(Timer::ConnectRetry, self.cfg.connect_retry), Connect]
            }
            (State::Idle, _) => vec![],
            (_, Event::Stop) => {
                let mut out = vec![];
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    out.push(Send(Message::Notification(Notification {
                        code: 6,
                        subcode: 2,
                        data: vec![],
                    })));
                }
                out.extend(self.reset("stopped"));
                self.state = State::Idle;
                out
            }
            (State::Connect | State::Active, Event::TcpUp) => {
                self.state = State::OpenSent;
                self.hold = LARGE_HOLD;
                vec![
                    Disarm(Timer::ConnectRetry),
                    Send(Message::Open(self.open())),
                    Arm(Timer::Hold, LARGE_HOLD),
                ]
            }
            (State::Connect | State::Active, Event::TcpDown) => {
                self.state = State::Active;
                vec![Arm(Timer::ConnectRetry, self.cfg.connect_retry)]
            }
            (State::Connect | State::Active, Event::Expired(Timer::ConnectRetry)) => {
                self.state = State::Connect;
                vec![Arm(Timer::ConnectRetry, self.cfg.connect_retry), Connect]
            }
            (State::Connect | State::Active, _) => vec![],
            (_, Event::TcpDown) => self.fail("connection closed by peer"),
            (_, Event::Malformed(n)) => self.notify(n),
            (_, Event::Expired(Timer::Hold)) => self.notify(Notification {
                code: 4,
                subcode: 0,
                data: vec![],
            }),
            (_, Event::Expired(Timer::Keepalive)) => match self.keepalive_every() {
                Some(every) if matches!(self.state, State::OpenConfirm | State::Established) => {
                    vec![Send(Message::Keepalive), Arm(Timer::Keepalive, every)]
                }
                _ => vec![],
            },
            (_, Event::Expired(Timer::ConnectRetry)) => vec![],
            (State::OpenSent, Event::Received(Message::Open(o))) => self.on_open(o),
            (State::OpenConfirm, Event::Received(Message::Keepalive)) => {
                self.state = State::Established;
                let peer = self.peer.clone().unwrap_or_else(|| self.open());
                let ctx = Ctx {
                    four_octet_as: peer.four_octet_as(),
                };
                vec![Up(Box::new(peer), ctx), Arm(Timer::Hold, self.hold)]
                    .into_iter()
                    .filter(|a| !matches!(a, Arm(Timer::Hold, d) if d.is_zero()))
                    .collect()
            }
            (State::Established, Event::Received(Message::Keepalive)) => self.heard(vec![]),
            (State::Established, Event::Received(Message::Update(u))) => {
                self.heard(vec![Update(u)])
            }
            (State::Established, Event::Received(Message::RouteRefresh(afi, safi))) => {
                self.heard(vec![Refresh(afi, safi)])
            }
            (_, Event::Received(Message::Notification(n))) => {
                let mut out = self.reset(&format!("peer sent NOTIFICATION: {}", n.describe()));
                self.state = State::Active;
                out.push(Arm(Timer::ConnectRetry, self.cfg.connect_retry));
                out
            }
            // anything else is a finite state machine error (RFC 4271 6.6)
            (state, _) => self.notify(Notification {
                code: 5,
                subcode: fsm_subcode(state),
                data: vec![],
            }),
        }
    }

    fn heard(&self, mut out: Vec<Action>) -> Vec<Action> {
        if !self.hold.is_zero() {
            out.push(Action::Arm(Timer::Hold, self.hold));
        }
        out
    }

    fn on_open(&mut self, o: Open) -> Vec<Action> {
        use Action::*;
        if o.asn != self.cfg.remote_as {
            return self.notify(Notification {
                code: 2,
                subcode: 2,
                data: vec![],
            });
        }
        if o.id == self.cfg.router_id && self.cfg.local_as == self.cfg.remote_as {
            return self.notify(Notification {
                code: 2,
                subcode: 3,
                data: vec![],
            });
        }
        let hold = self.cfg.hold_time.min(o.hold_time);
        self.hold = Duration::from_secs(u64::from(hold));
        self.peer = Some(o);
        self.state = State::OpenConfirm;
        let mut out = vec![Send(Message::Keepalive)];
        match self.keepalive_every() {
            Some(every) => {
                out.push(Arm(Timer::Keepalive, every));
                out.push(Arm(Timer::Hold, self.hold));
            }
            None => {
                out.push(Disarm(Timer::Keepalive));
                out.push(Disarm(Timer::Hold));
            }
        }
        out
    }

    fn notify(&mut self, n: Notification) -> Vec<Action> {
        let why = format!("sent NOTIFICATION: {}", n.describe());
        let mut out = vec![Action::Send(Message::Notification(n))];
        out.extend(self.fail(&why));
        out
    }

    fn fail(&mut self, why: &str) -> Vec<Action> {
        let mut out = self.reset(why);
        self.state = State::Active;
        out.push(Action::Arm(Timer::ConnectRetry, self.cfg.connect_retry));
        out
    }

    fn reset(&mut self, why: &str) -> Vec<Action> {
        let was_up = self.state == State::Established;
        self.peer = None;
        self.hold = LARGE_HOLD;
        let mut out = vec![
            Action::Disarm(Timer::Hold),
            Action::Disarm(Timer::Keepalive),
            Action::Close,
        ];
        if was_up {
            out.push(Action::Down(why.to_string()));
        }
        out
    }
}

fn fsm_subcode(state: State) -> u8 {
    // RFC 6608 subcodes
    match state {
        State::OpenSent => 1,
        State::OpenConfirm => 2,
        State::Established => 3,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Update;

    fn cfg() -> PeerConfig {
        PeerConfig {
            local_as: 64512,
            router_id: Ipv4Addr::new(192, 0, 2, 11),
            remote_as: 64512,
            hold_time: 90,
            connect_retry: Duration::from_secs(5),
            restart_time: 120,
            restarting: false,
        }
    }

    fn peer_open(asn: u32, hold: u16) -> Message {
        Message::Open(Open {
            asn,
            hold_time: hold,
            id: Ipv4Addr::new(192, 0, 2, 12),
            capabilities: vec![Capability::FourOctetAs(asn)],
        })
    }

    fn established() -> Fsm {
        let mut f = Fsm::new(cfg());
        f.handle(Event::Start);
        f.handle(Event::TcpUp);
        f.handle(Event::Received(peer_open(64512, 30)));
        let out = f.handle(Event::Received(Message::Keepalive));
        assert!(
            matches!(
                out[0],
                Action::Up(
                    _,
                    Ctx {
                        four_octet_as: true
                    }
                )
            ),
            "{out:?}"
        );
        f
    }

    #[test]
    fn happy_path_negotiates_the_smaller_hold_time() {
        let mut f = Fsm::new(cfg());
        assert_eq!(
            f.handle(Event::Start),
            vec![
                Action::Arm(Timer::ConnectRetry, Duration::from_secs(5)),
                Action::Connect
            ]
        );
        let out = f.handle(Event::TcpUp);
        assert!(
            matches!(&out[1], Action::Send(Message::Open(o)) if o.asn == 64512 && o.hold_time == 90)
        );
        assert_eq!(f.state(), State::OpenSent);
        let out = f.handle(Event::Received(peer_open(64512, 30)));
        assert_eq!(
            out,
            vec![
                Action::Send(Message::Keepalive),
                Action::Arm(Timer::Keepalive, Duration::from_secs(10)),
                Action::Arm(Timer::Hold, Duration::from_secs(30)),
            ]
        );
        f.handle(Event::Received(Message::Keepalive));
        assert_eq!(f.state(), State::Established);
        // keepalives go out every hold/3; an UPDATE refreshes the hold timer
        assert_eq!(
            f.handle(Event::Expired(Timer::Keepalive)),
            vec![
                Action::Send(Message::Keepalive),
                Action::Arm(Timer::Keepalive, Duration::from_secs(10))
            ]
        );
        let out = f.handle(Event::Received(Message::Update(Update::default())));
        assert_eq!(
            out,
            vec![
                Action::Update(Update::default()),
                Action::Arm(Timer::Hold, Duration::from_secs(30))
            ]
        );
    }

    #[test]
    fn wrong_as_and_own_router_id_are_refused() {
        let mut f = Fsm::new(cfg());
        f.handle(Event::Start);
        f.handle(Event::TcpUp);
        let out = f.handle(Event::Received(peer_open(64999, 90)));
        assert!(
            matches!(&out[0], Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (2, 2))
        );
        assert!(out.contains(&Action::Close));
        assert_eq!(f.state(), State::Active);
        let mut f = Fsm::new(cfg());
        f.handle(Event::Start);
        f.handle(Event::TcpUp);
        let same_id = Message::Open(Open {
            asn: 64512,
            hold_time: 90,
            id: cfg().router_id,
            capabilities: vec![],
        });
        let out = f.handle(Event::Received(same_id));
        assert!(
            matches!(&out[0], Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (2, 3))
        );
    }

    #[test]
    fn hold_expiry_and_peer_loss_bring_the_session_down() {
        let mut f = established();
        let out = f.handle(Event::Expired(Timer::Hold));
        assert!(matches!(&out[0], Action::Send(Message::Notification(n)) if n.code == 4));
        assert!(out.iter().any(|a| matches!(a, Action::Down(_))));
        assert_eq!(f.state(), State::Active);
        let mut f = established();
        let out = f.handle(Event::TcpDown);
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Down(w) if w.contains("closed"))));
        // and it tries again
        assert!(out.contains(&Action::Arm(Timer::ConnectRetry, Duration::from_secs(5))));
    }

    #[test]
    fn unexpected_messages_are_fsm_errors() {
        let mut f = Fsm::new(cfg());
        f.handle(Event::Start);
        f.handle(Event::TcpUp);
        let out = f.handle(Event::Received(Message::Update(Update::default())));
        assert!(
            matches!(&out[0], Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (5, 1))
        );
        let mut f = established();
        let out = f.handle(Event::Received(peer_open(64512, 90)));
        assert!(
            matches!(&out[0], Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (5, 3))
        );
    }

    #[test]
    fn malformed_input_sends_its_notification() {
        let mut f = established();
        let n = Notification {
            code: 3,
            subcode: 1,
            data: vec![],
        };
        let out = f.handle(Event::Malformed(n.clone()));
        assert_eq!(out[0], Action::Send(Message::Notification(n)));
        assert!(out.iter().any(|a| matches!(a, Action::Down(_))));
    }

    #[test]
    fn zero_hold_time_means_no_keepalives() {
        let mut f = Fsm::new(PeerConfig {
            hold_time: 0,
            ..cfg()
        });
        f.handle(Event::Start);
        f.handle(Event::TcpUp);
        let out = f.handle(Event::Received(peer_open(64512, 90)));
        assert!(!out
            .iter()
            .any(|a| matches!(a, Action::Arm(Timer::Keepalive, _))));
        f.handle(Event::Received(Message::Keepalive));
        assert_eq!(f.handle(Event::Expired(Timer::Keepalive)), vec![]);
    }

    #[test]
    fn stop_sends_cease_and_route_refresh_is_passed_on() {
        let mut f = established();
        assert_eq!(
            f.handle(Event::Received(Message::RouteRefresh(1, 1)))[0],
            Action::Refresh(1, 1)
        );
        let out = f.handle(Event::Stop);
        assert!(
            matches!(&out[0], Action::Send(Message::Notification(n)) if (n.code, n.subcode) == (6, 2))
        );
        assert_eq!(f.state(), State::Idle);
        // our OPEN announces graceful restart when configured
        assert!(f
            .open()
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::GracefulRestart { time: 120, .. })));
    }
}
