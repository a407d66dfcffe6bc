//! What peers send the core: UPDATEs through loop prevention, the import
//! policy and max-prefix into the Adj-RIB-In; End-of-RIB; and policy
//! changes, which re-check both what was accepted and what was refused
//! (soft reconfiguration inbound: refused routes are kept with their path,
//! so a subnet whose lease comes back is accepted again without help from
//! the peer — a reflector never resends an identical path by itself).

use super::{Core, REFUSED_KEPT};
use crate::import::{import, FromPeer, ImportPolicy, Refusal};
use crate::rib::SharedPath;
use crate::speaker::out::is_end_of_rib;
use crate::speaker::session::ToSession;
use crate::speaker::{PeerKind, RouteEvent};
use crate::wire::{Message, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;
use std::net::IpAddr;

/// Most refusals logged per peer per session (the rest are counted).
const LOGGED_REFUSALS: usize = 20;

impl Refusal {
    /// The refused prefix.
    fn prefix(&self) -> IpNet {
        match self {
            Self::Outside(p) | Self::Own(p) | Self::Limit(p, _) | Self::Loop(p, _) => *p,
            Self::NotOwner { prefix, .. } => *prefix,
        }
    }
}

impl Core {
    pub(super) fn update(&mut self, addr: IpAddr, u: crate::wire::Update) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(r) = &p.remote else { return };
        if is_end_of_rib(&u) {
            let stale: Vec<IpNet> = p.stale.drain().collect();
            p.stale_until = None;
            if !stale.is_empty() {
                tracing::info!(peer = %addr, routes = stale.len(), "bgp: End-of-RIB; stale routes go");
            }
            let changes = self.rib.update(addr, vec![], &stale);
            self.propagate(changes);
            self.feed.push(vec![RouteEvent::EndOfRib { peer: addr }]);
            return;
        }
        if let Some(n) = &u.treat_as_withdraw {
            tracing::warn!(
                peer = %addr,
                error = %n.describe(),
                "bgp: malformed attribute; routes treated as withdrawn"
            );
        }
        let from = FromPeer {
            addr,
            router_id: r.router_id,
            asn: r.asn,
            ebgp: r.asn != p.spec.local_as,
        };
        let imp = import(u, &from, &self.me);
        let from_node = p.spec.kind != PeerKind::External;
        let mut withdrawn = imp.withdrawn;
        for w in &withdrawn {
            if !p.refused.is_empty() {
                p.refused.remove(w);
            }
            if !p.stale.is_empty() {
                p.stale.remove(w);
            }
        }
        // a loop is a refusal too: counted as received, and it replaces
        // (withdraws) what the peer announced for the prefix before
        let mut refusals = imp.refused;
        for why in &refusals {
            let prefix = why.prefix();
            p.stale.remove(&prefix);
            p.refused.insert(prefix, None);
            withdrawn.push(prefix);
        }
        let mut accepted = Vec::with_capacity(imp.announced.len());
        // what the peer will hold after this UPDATE's withdrawals; only
        // prefixes it does not hold yet count against max-prefix
        let adj_in = self.rib.adj_in(&addr);
        let known = |prefix: &IpNet| adj_in.is_some_and(|t| t.contains_key(prefix));
        let mut held = self.rib.received(&addr)
            - withdrawn
                .iter()
                .collect::<rustc_hash::FxHashSet<_>>()
                .into_iter()
                .filter(|w| known(w))
                .count();
        let max = if p.spec.max_prefixes > 0 {
            p.spec.max_prefixes
        } else {
            self.cfg.policy.max_prefixes
        };
        for (prefix, path) in imp.announced {
            if !p.stale.is_empty() {
                p.stale.remove(&prefix);
            }
            let verdict = self
                .cfg
                .policy
                .check(&prefix, path.originator(), from_node)
                .and_then(|()| {
                    if known(&prefix) {
                        Ok(())
                    } else if max > 0 && held >= max {
                        Err(Refusal::Limit(prefix, max))
                    } else {
                        held += 1;
                        Ok(())
                    }
                });
            match verdict {
                Ok(()) => {
                    if !p.refused.is_empty() {
                        p.refused.remove(&prefix);
                    }
                    accepted.push((prefix, path));
                }
                Err(why) => {
                    if p.refused.len() < REFUSED_KEPT {
                        p.refused.insert(prefix, Some(path));
                    } else {
                        p.refused.insert(prefix, None);
                        p.refused_pathless = true;
                    }
                    withdrawn.push(prefix);
                    refusals.push(why);
                }
            }
        }
        for why in refusals {
            if p.refusals_logged < LOGGED_REFUSALS {
                tracing::warn!(peer = %addr, refusal = %why, "bgp: route refused");
            }
            p.refusals_logged += 1;
            if p.refusals_logged == LOGGED_REFUSALS {
                tracing::warn!(peer = %addr, "bgp: further refusals are counted, not logged");
            }
        }
        let changes = self.rib.update(addr, accepted, &withdrawn);
        self.propagate(changes);
    }

    /// A new import policy: accepted routes that fail it now are withdrawn
    /// and kept as refused; refused routes that pass now are accepted
    /// (within max-prefix). Peers whose refused routes were kept without
    /// their path are asked for a ROUTE-REFRESH.
    pub(super) fn set_policy(&mut self, policy: ImportPolicy) {
        if policy == self.cfg.policy {
            return;
        }
        self.cfg.policy = policy;
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for addr in addrs {
            self.recheck(addr);
        }
    }

    fn recheck(&mut self, addr: IpAddr) {
        let Some(p) = self.peers.get(&addr) else {
            return;
        };
        let from_node = p.spec.kind != PeerKind::External;
        let max = if p.spec.max_prefixes > 0 {
            p.spec.max_prefixes
        } else {
            self.cfg.policy.max_prefixes
        };
        let policy = &self.cfg.policy;
        // routes kept stale through the peer's graceful restart are left
        // to End-of-RIB or the restart time, not moved into `refused`
        let stale = &p.stale;
        let bad: Vec<(IpNet, SharedPath)> = self
            .rib
            .adj_in(&addr)
            .map(|t| {
                t.iter()
                    .filter(|(p, _)| !stale.contains(p))
                    .filter(|(p, path)| policy.check(p, path.originator(), from_node).is_err())
                    .map(|(p, path)| (*p, path.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let held = self.rib.received(&addr) - bad.len();
        let mut good: Vec<(IpNet, SharedPath)> = p
            .refused
            .iter()
            .filter_map(|(prefix, path)| {
                let path = path.as_ref()?;
                policy
                    .check(prefix, path.originator(), from_node)
                    .is_ok()
                    .then(|| (*prefix, path.clone()))
            })
            .collect();
        if max > 0 {
            good.truncate(max.saturating_sub(held));
        }
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        for (prefix, _) in &good {
            p.refused.remove(prefix);
        }
        let withdrawn: Vec<IpNet> = bad.iter().map(|(prefix, _)| *prefix).collect();
        for (prefix, path) in bad {
            p.refused.insert(prefix, Some(path));
        }
        if !good.is_empty() {
            tracing::info!(peer = %addr, routes = good.len(), "bgp: refused routes pass the new policy");
        }
        let refresh =
            p.refused_pathless && p.established() && p.remote.as_ref().is_some_and(|r| r.refresh);
        let v6 = p.remote.as_ref().is_some_and(|r| r.v6);
        if refresh {
            p.refused_pathless = false;
        }
        if !good.is_empty() || !withdrawn.is_empty() {
            let changes = self.rib.update(addr, good, &withdrawn);
            self.propagate(changes);
        }
        if refresh {
            let mut msgs = vec![Message::RouteRefresh(AFI_IPV4, SAFI_UNICAST)];
            if v6 {
                msgs.push(Message::RouteRefresh(AFI_IPV6, SAFI_UNICAST));
            }
            self.send_to_session(addr, ToSession::Send(msgs));
        }
    }
}
