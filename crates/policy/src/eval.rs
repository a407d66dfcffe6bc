//! The verdict of the table for one new connection, computed from the
//! same [`Desired`] the kernel was given: what `trellisctl policy trace`
//! shows, and what decides which established flows a change cuts.

use crate::compile::{Desired, Origin, RuleDef, Verdict};
use crate::model::{Direction, Protocol};
use serde::Serialize;
use std::net::Ipv4Addr;

/// One new connection (or ICMP and other protocols: `proto` none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Protocol and destination port, for TCP, UDP and SCTP.
    pub proto: Option<(Protocol, u16)>,
}

/// What decided one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Allowed.
    pub allowed: bool,
    /// `Admin`, `NetworkPolicy`, `Baseline`, or `none` (no policy here).
    pub tier: String,
    /// The policy (or policies) that decided.
    pub policy: String,
    /// The rule's index in its direction, when a rule decided.
    pub rule: Option<usize>,
    /// The chain holding that rule.
    pub chain: String,
}

/// The whole verdict: the source's egress (when it is a local pod) and
/// then the destination's ingress (when it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allowed both ways it was checked.
    pub allowed: bool,
    /// The checks made, in order.
    pub steps: Vec<Step>,
}

/// How deep chains may call (the kernel's own limit is 16).
const MAX_DEPTH: usize = 16;

impl Desired {
    /// The verdict for `f`.
    pub fn decide(&self, f: &Flow) -> Decision {
        let mut steps = Vec::new();
        for d in [Direction::Egress, Direction::Ingress] {
            let me = match d {
                Direction::Egress => f.src,
                Direction::Ingress => f.dst,
            };
            let name = match d {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            };
            let Some(chain) = self.dispatch(d).get(&me) else {
                continue;
            };
            let (allowed, origin, at) = match self.run(chain, d, f, 0) {
                Some((v, o, at)) => (v, o, at),
                // never: profile chains end with a verdict
                None => (
                    true,
                    Origin {
                        tier: "none",
                        policy: String::new(),
                        rule: None,
                    },
                    chain.clone(),
                ),
            };
            steps.push(Step {
                direction: name,
                allowed,
                tier: origin.tier.to_string(),
                policy: origin.policy,
                rule: origin.rule,
                chain: at,
            });
            if !allowed {
                break;
            }
        }
        Decision {
            allowed: steps.iter().all(|s| s.allowed),
            steps,
        }
    }

    /// The verdict of `chain` (none: it ran to its end, back to the caller).
    fn run(
        &self,
        chain: &str,
        d: Direction,
        f: &Flow,
        depth: usize,
    ) -> Option<(bool, Origin, String)> {
        if depth > MAX_DEPTH {
            return None;
        }
        let (_, rules) = self.chains.get(chain)?;
        for r in rules {
            if !self.matches(r, d, f) {
                continue;
            }
            match &r.verdict {
                Verdict::Accept => return Some((true, r.origin.clone(), chain.to_string())),
                Verdict::Drop => return Some((false, r.origin.clone(), chain.to_string())),
                Verdict::Goto(c) => return self.run(c, d, f, depth + 1),
                Verdict::Jump(c) => {
                    if let Some(v) = self.run(c, d, f, depth + 1) {
                        return Some(v);
                    }
                }
                Verdict::Log(_) => {}
            }
        }
        None
    }

    fn matches(&self, r: &RuleDef, d: Direction, f: &Flow) -> bool {
        let other = match d {
            Direction::Ingress => f.src,
            Direction::Egress => f.dst,
        };
        let set = |n: &String| self.sets.get(n);
        if let Some(p) = &r.peer {
            if !set(p).is_some_and(|s| s.has_addr(other)) {
                return false;
            }
        }
        if let Some(p) = &r.ports {
            match f.proto {
                Some((proto, port)) if set(p).is_some_and(|s| s.has_port(proto, port)) => {}
                _ => return false,
            }
        }
        if let Some(n) = &r.named {
            match f.proto {
                Some((proto, port)) if set(n).is_some_and(|s| s.has_tuple(f.dst, proto, port)) => {}
                _ => return false,
            }
        }
        true
    }
}
