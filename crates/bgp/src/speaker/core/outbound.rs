//! What goes to peers: best-path changes to the agent (the feed) and to
//! every established peer through its Adj-RIB-Out, packed into UPDATEs;
//! the full table (and End-of-RIB) when a session comes up or asks for a
//! refresh.

use super::Core;
use crate::export::{Source, Target};
use crate::rib::Change;
use crate::speaker::out::{end_of_rib, Batch};
use crate::speaker::session::ToSession;
use crate::speaker::{PeerKind, RouteEvent};
use crate::wire::Message;
use ipnet::IpNet;
use std::net::IpAddr;

impl Core {
    /// Tells the agent, then every established peer, about changed best paths.
    pub(super) fn propagate(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut prefixes = Vec::with_capacity(changes.len());
        let mut events = Vec::with_capacity(changes.len());
        for c in changes {
            match c {
                Change::Best(prefix, peer, path) => {
                    events.push(RouteEvent::Best {
                        prefix,
                        next_hop: path.next_hop,
                        peer,
                    });
                    prefixes.push(prefix);
                }
                Change::Gone(prefix) => {
                    events.push(RouteEvent::Gone { prefix });
                    prefixes.push(prefix);
                }
            }
        }
        self.feed.push(events);
        // learned routes go to peers only when we reflect them
        if self.exporter.cluster_id.is_none() {
            prefixes.retain(|p| self.local.contains(p));
        }
        if !prefixes.is_empty() {
            self.export_prefixes(&prefixes, None);
        }
    }

    pub(super) fn source_of(&self, prefix: &IpNet) -> Option<Source<'_>> {
        if self.local.contains(prefix) {
            return Some(Source::Local);
        }
        let (from, path) = self.rib.loc_rib().get(prefix)?;
        let from_client = self
            .peers
            .get(from)
            .is_some_and(|p| p.spec.kind == PeerKind::RrClient);
        Some(Source::Learned {
            from: *from,
            from_client,
            path,
        })
    }

    /// Brings the Adj-RIB-Out of `only` (or of every established peer) in
    /// line for `prefixes`, sending the differences.
    pub(super) fn export_prefixes(&mut self, prefixes: &[IpNet], only: Option<IpAddr>) {
        let targets: Vec<(IpAddr, Target, bool, bool)> = self
            .peers
            .iter()
            .filter(|(a, p)| p.established() && only.is_none_or(|o| o == **a))
            .filter_map(|(a, p)| {
                let external = p.spec.kind == PeerKind::External;
                Some((*a, p.target()?, p.remote.as_ref()?.v6, external))
            })
            .collect();
        let mut batches: Vec<(IpAddr, Batch)> = Vec::with_capacity(targets.len());
        for (addr, target, v6, external) in targets {
            let mut batch = Batch::default();
            let mut set = Vec::new();
            for prefix in prefixes {
                if prefix.addr().is_ipv6() && !v6 {
                    continue;
                }
                let want = if !external && self.external_only.contains(prefix) {
                    None
                } else {
                    self.source_of(prefix)
                        .and_then(|src| self.exporter.export(prefix, src, &target))
                };
                set.push((*prefix, want));
            }
            let Some(p) = self.peers.get_mut(&addr) else {
                continue;
            };
            for (prefix, want) in set {
                match want {
                    Some(a) => {
                        if p.adj_out.get(&prefix) != Some(&a) {
                            p.adj_out.insert(prefix, a.clone());
                            batch.announce(prefix, a);
                        }
                    }
                    None => {
                        if p.adj_out.remove(&prefix).is_some() {
                            batch.withdraw(prefix);
                        }
                    }
                }
            }
            if !batch.is_empty() {
                batches.push((addr, batch));
            }
        }
        for (addr, batch) in batches {
            let msgs = batch
                .into_updates()
                .into_iter()
                .map(Message::Update)
                .collect();
            self.send_to_session(addr, ToSession::Send(msgs));
        }
    }

    pub(super) fn send_full_table(&mut self, addr: IpAddr) {
        let mut all: Vec<IpNet> = self.local.iter().copied().collect();
        all.extend(self.rib.loc_rib().keys().copied());
        self.export_prefixes(&all, Some(addr));
        if let Some(p) = self.peers.get(&addr) {
            let mut msgs = vec![Message::Update(end_of_rib(false))];
            if p.remote.as_ref().is_some_and(|r| r.v6) {
                msgs.push(Message::Update(end_of_rib(true)));
            }
            self.send_to_session(addr, ToSession::Send(msgs));
        }
    }
}
