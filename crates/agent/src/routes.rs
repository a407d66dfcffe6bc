//! The routing reconciler: applies a backend's desired state through the
//! dataplane. `apply` diffs against what it applied last (one node joining
//! touches only that node's entries); `resync` diffs against what the
//! kernel holds now, repairing drift and pruning only what trellis owns:
//! routes with `proto 84` to other nodes' subnets, and the permanent
//! neighbours and FDB entries of `trellis.1`.

use ipnet::{IpNet, Ipv4Net};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use trellis_dataplane::{Dataplane, DataplaneError, HostRoute, VxlanSpec};
use trellis_routing::{Desired, LocalNode, NextHop, VxlanLink, VXLAN_DEV};

/// The VTEP MAC of a node: `0e:74:` + its underlay address, unique in the
/// cluster, known before the subnet is leased, stable across restarts.
pub fn vtep_mac(public_ip: std::net::Ipv4Addr) -> [u8; 6] {
    let o = public_ip.octets();
    [0x0e, 0x74, o[0], o[1], o[2], o[3]]
}

/// Applies routing state for one node.
pub struct RouteReconciler {
    dp: Arc<dyn Dataplane>,
    local: LocalNode,
    cluster: Ipv4Net,
    applied: Desired,
}

fn host_route(local: &LocalNode, r: &trellis_routing::Route) -> HostRoute {
    match r.via {
        NextHop::Vxlan(vtep) => HostRoute {
            dst: IpNet::V4(r.dst),
            dev: VXLAN_DEV.into(),
            via: Some(IpAddr::V4(vtep)),
            onlink: true,
        },
        NextHop::Underlay(ip) => HostRoute {
            dst: IpNet::V4(r.dst),
            dev: local.underlay_dev.clone(),
            via: Some(IpAddr::V4(ip)),
            onlink: false,
        },
    }
}

fn vxlan_spec(local: &LocalNode, l: &VxlanLink) -> VxlanSpec {
    VxlanSpec {
        name: VXLAN_DEV.into(),
        vni: l.vni,
        port: l.port,
        local: IpAddr::V4(l.local),
        dev: l.dev.clone(),
        mtu: l.mtu,
        address: IpNet::new(IpAddr::V4(l.vtep_ip), 32).unwrap_or(IpNet::V4(local.subnet)),
        mac: vtep_mac(local.public_ip),
    }
}

impl RouteReconciler {
    /// A reconciler that has applied nothing yet.
    pub fn new(dp: Arc<dyn Dataplane>, local: LocalNode, cluster: Ipv4Net) -> Self {
        Self {
            dp,
            local,
            cluster,
            applied: Desired::default(),
        }
    }

    /// What was applied last.
    pub fn applied(&self) -> &Desired {
        &self.applied
    }

    /// This node.
    pub fn local(&self) -> &LocalNode {
        &self.local
    }

    /// Brings the kernel from what was applied last to `want`, touching
    /// only what changed. Goes on past failures and returns them.
    pub fn apply(&mut self, want: Desired) -> Vec<DataplaneError> {
        let mut errors = Vec::new();
        let prev = std::mem::take(&mut self.applied);
        if want.vxlan != prev.vxlan {
            match &want.vxlan {
                Some(l) => push(
                    &mut errors,
                    self.dp.vxlan_ensure(&vxlan_spec(&self.local, l)).map(drop),
                ),
                None => push(&mut errors, self.dp.link_delete(VXLAN_DEV).map(drop)),
            }
        }
        // add: FDB, neighbours, then routes, so a route never points into a void
        for f in want.fdb.difference(&prev.fdb) {
            push(
                &mut errors,
                self.dp.fdb_replace(VXLAN_DEV, f.mac, IpAddr::V4(f.dst)),
            );
        }
        for n in want.neighbours.difference(&prev.neighbours) {
            push(
                &mut errors,
                self.dp.neigh_replace(VXLAN_DEV, IpAddr::V4(n.ip), n.mac),
            );
        }
        for r in want.routes.difference(&prev.routes) {
            push(
                &mut errors,
                self.dp.route_replace(&host_route(&self.local, r)),
            );
        }
        // remove in the reverse order; a route whose next hop changed was replaced above
        let want_dsts: BTreeSet<Ipv4Net> = want.routes.iter().map(|r| r.dst).collect();
        for r in prev.routes.iter().filter(|r| !want_dsts.contains(&r.dst)) {
            push(
                &mut errors,
                self.dp.route_delete(IpNet::V4(r.dst)).map(drop),
            );
        }
        let want_ips: BTreeSet<_> = want.neighbours.iter().map(|n| n.ip).collect();
        for n in prev.neighbours.iter().filter(|n| !want_ips.contains(&n.ip)) {
            push(
                &mut errors,
                self.dp.neigh_delete(VXLAN_DEV, IpAddr::V4(n.ip)).map(drop),
            );
        }
        for f in prev.fdb.difference(&want.fdb) {
            push(
                &mut errors,
                self.dp
                    .fdb_delete(VXLAN_DEV, f.mac, IpAddr::V4(f.dst))
                    .map(drop),
            );
        }
        for p in want.problems.iter().filter(|p| !prev.problems.contains(p)) {
            tracing::warn!("routing: {p}");
        }
        self.applied = want;
        if !errors.is_empty() {
            // the next resync compares with the kernel and repairs
            self.applied.routes.clear();
        }
        errors
    }

    /// FDB entries of the VXLAN device vs `want`. When the kernel cannot be
    /// read, the error is returned and only additions are made (replace
    /// is idempotent); nothing is pruned on a guess.
    fn resync_fdb(&self, want: &Desired, errors: &mut Vec<DataplaneError>) {
        let want_fdb: BTreeSet<([u8; 6], IpAddr)> = want
            .fdb
            .iter()
            .map(|f| (f.mac, IpAddr::V4(f.dst)))
            .collect();
        let have_fdb: BTreeSet<([u8; 6], IpAddr)> = match self.dp.fdb(VXLAN_DEV) {
            Ok(f) => f.into_iter().collect(),
            Err(e) => {
                errors.push(e);
                for (mac, dst) in &want_fdb {
                    push(errors, self.dp.fdb_replace(VXLAN_DEV, *mac, *dst));
                }
                return;
            }
        };
        for (mac, dst) in want_fdb.difference(&have_fdb) {
            push(errors, self.dp.fdb_replace(VXLAN_DEV, *mac, *dst));
        }
        for (mac, dst) in have_fdb.difference(&want_fdb) {
            push(errors, self.dp.fdb_delete(VXLAN_DEV, *mac, *dst).map(drop));
        }
    }

    /// Permanent neighbours of the VXLAN device vs `want` (same rule on a
    /// failed read as [`Self::resync_fdb`]).
    fn resync_neighbours(&self, want: &Desired, errors: &mut Vec<DataplaneError>) {
        let have_n: BTreeMap<IpAddr, [u8; 6]> = match self.dp.neighbours(VXLAN_DEV) {
            Ok(n) => n.into_iter().collect(),
            Err(e) => {
                errors.push(e);
                for n in &want.neighbours {
                    push(
                        errors,
                        self.dp.neigh_replace(VXLAN_DEV, IpAddr::V4(n.ip), n.mac),
                    );
                }
                return;
            }
        };
        for n in &want.neighbours {
            if have_n.get(&IpAddr::V4(n.ip)) != Some(&n.mac) {
                push(
                    errors,
                    self.dp.neigh_replace(VXLAN_DEV, IpAddr::V4(n.ip), n.mac),
                );
            }
        }
        let want_ips: BTreeSet<IpAddr> = want.neighbours.iter().map(|n| IpAddr::V4(n.ip)).collect();
        for ip in have_n.keys().filter(|ip| !want_ips.contains(ip)) {
            push(errors, self.dp.neigh_delete(VXLAN_DEV, *ip).map(drop));
        }
    }

    /// Compares `want` with the kernel and repairs every difference: missing
    /// or wrong entries are replaced, owned entries nobody wants are pruned.
    /// Entries that are already right are not touched.
    pub fn resync(&mut self, want: Desired) -> Vec<DataplaneError> {
        let mut errors = Vec::new();
        if let Some(l) = &want.vxlan {
            push(
                &mut errors,
                self.dp.vxlan_ensure(&vxlan_spec(&self.local, l)).map(drop),
            );
        } else {
            match self.dp.link_index(VXLAN_DEV) {
                Ok(Some(_)) => push(&mut errors, self.dp.link_delete(VXLAN_DEV).map(drop)),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        if want.vxlan.is_some() {
            self.resync_fdb(&want, &mut errors);
            self.resync_neighbours(&want, &mut errors);
        }
        match self.dp.routes_owned() {
            Ok(have) => {
                let ours: Vec<HostRoute> = have.into_iter().filter(|r| self.owns(r.dst)).collect();
                let wanted: Vec<HostRoute> = want
                    .routes
                    .iter()
                    .map(|r| host_route(&self.local, r))
                    .collect();
                for w in &wanted {
                    if !ours.contains(w) {
                        push(&mut errors, self.dp.route_replace(w));
                    }
                }
                for h in &ours {
                    if !wanted.iter().any(|w| w.dst == h.dst) {
                        push(&mut errors, self.dp.route_delete(h.dst).map(drop));
                    }
                }
            }
            Err(e) => {
                // what the kernel holds is unknown: add what is wanted
                // (replace is idempotent), prune nothing
                errors.push(e);
                for r in &want.routes {
                    push(
                        &mut errors,
                        self.dp.route_replace(&host_route(&self.local, r)),
                    );
                }
            }
        }
        self.applied = want;
        errors
    }

    /// Backend routes trellis owns: other nodes' subnets inside the cluster
    /// network (pod /32 routes of this node's subnet are the CNI side's).
    fn owns(&self, dst: IpNet) -> bool {
        match dst {
            IpNet::V4(v4) => {
                self.cluster.contains(&v4) && !self.local.subnet.contains(&v4.network())
            }
            IpNet::V6(_) => false,
        }
    }
}

fn push(errors: &mut Vec<DataplaneError>, r: Result<(), DataplaneError>) {
    if let Err(e) = r {
        errors.push(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_dataplane::FakeDataplane;
    use trellis_model::netconf::{Backend, BackendType};
    use trellis_model::node::NodeRecord;
    use trellis_routing::desired;

    fn local() -> LocalNode {
        LocalNode {
            name: "n1".into(),
            subnet: "10.244.1.0/24".parse().expect("n"),
            public_ip: "192.0.2.11".parse().expect("ip"),
            underlay: "192.0.2.0/24".parse().expect("n"),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        }
    }

    fn node(i: u8) -> NodeRecord {
        let subnet: Ipv4Net = format!("10.244.{i}.0/24").parse().expect("n");
        let ip: std::net::Ipv4Addr = format!("192.0.2.{}", 10 + i).parse().expect("ip");
        NodeRecord {
            node: format!("n{i}"),
            subnet,
            public_ip: std::net::IpAddr::V4(ip),
            backend_type: "vxlan".into(),
            vtep_mac: Some(trellis_dataplane::mac_string(&vtep_mac(ip))),
            bgp: None,
        }
    }

    fn vxlan() -> Backend {
        Backend {
            kind: BackendType::Vxlan,
            vni: 1,
            port: 8472,
            direct_routing: false,
        }
    }

    fn setup() -> (Arc<FakeDataplane>, RouteReconciler) {
        let fake = Arc::new(FakeDataplane::new());
        let r = RouteReconciler::new(fake.clone(), local(), "10.244.0.0/16".parse().expect("n"));
        (fake, r)
    }

    #[test]
    fn one_node_joining_touches_only_its_entries() {
        let (fake, mut r) = setup();
        let nodes: Vec<NodeRecord> = (1..=3).map(node).collect();
        assert!(r.apply(desired(&vxlan(), &local(), &nodes)).is_empty());
        assert_eq!(fake.routes().len(), 2);
        assert_eq!(fake.neighbour_table().len(), 2);
        assert_eq!(fake.fdb_table().len(), 2);
        fake.clear_calls();
        let more: Vec<NodeRecord> = (1..=4).map(node).collect();
        assert!(r.apply(desired(&vxlan(), &local(), &more)).is_empty());
        assert_eq!(
            fake.calls(),
            ["fdb_replace", "neigh_replace", "route_replace"]
        );
        // and leaving removes exactly its three entries
        fake.clear_calls();
        assert!(r.apply(desired(&vxlan(), &local(), &nodes)).is_empty());
        assert_eq!(fake.calls(), ["route_delete", "neigh_delete", "fdb_delete"]);
        assert_eq!(fake.routes().len(), 2);
    }

    #[test]
    fn resync_repairs_drift_prunes_only_ours_and_leaves_right_entries_alone() {
        let (fake, mut r) = setup();
        let nodes: Vec<NodeRecord> = (1..=3).map(node).collect();
        let want = desired(&vxlan(), &local(), &nodes);
        r.apply(want.clone());
        // drift: a route deleted by hand, a stale owned route, a pod route of ours
        fake.route_delete("10.244.2.0/24".parse().expect("n"))
            .expect("del");
        for (dst, dev) in [("10.244.9.0/24", VXLAN_DEV), ("10.244.1.7/32", VXLAN_DEV)] {
            fake.route_replace(&HostRoute {
                dst: dst.parse().expect("n"),
                dev: dev.into(),
                via: None,
                onlink: false,
            })
            .expect("add");
        }
        fake.clear_calls();
        assert!(r.resync(want.clone()).is_empty());
        let dsts: Vec<String> = fake.routes().iter().map(|r| r.dst.to_string()).collect();
        assert!(dsts.contains(&"10.244.2.0/24".to_string()), "{dsts:?}");
        assert!(!dsts.contains(&"10.244.9.0/24".to_string()), "{dsts:?}");
        assert!(
            dsts.contains(&"10.244.1.7/32".to_string()),
            "pod route pruned: {dsts:?}"
        );
        // a second resync finds nothing to do
        fake.clear_calls();
        assert!(r.resync(want).is_empty());
        let writes: Vec<String> = fake
            .calls()
            .into_iter()
            .filter(|c| c.ends_with("replace") || c.ends_with("delete"))
            .collect();
        assert!(writes.is_empty(), "{writes:?}");
    }

    #[test]
    fn failures_are_reported_and_repaired_by_resync() {
        let (fake, mut r) = setup();
        let nodes: Vec<NodeRecord> = (1..=2).map(node).collect();
        let want = desired(&vxlan(), &local(), &nodes);
        fake.fail_next("route_replace", nix::errno::Errno::EIO);
        assert_eq!(r.apply(want.clone()).len(), 1);
        assert!(fake.routes().is_empty());
        assert!(r.resync(want).is_empty());
        assert_eq!(fake.routes().len(), 1);
    }

    /// A kernel read that fails during resync is an error in the result,
    /// not an empty table: nothing owned is pruned on a guess, and what is
    /// wanted is still put in place.
    #[test]
    fn failed_reads_are_reported_not_taken_for_empty() {
        for verb in ["fdb", "neighbours", "routes_owned", "link_index"] {
            let (fake, mut r) = setup();
            let nodes: Vec<NodeRecord> = (1..=3).map(node).collect();
            let want = desired(&vxlan(), &local(), &nodes);
            assert!(r.apply(want.clone()).is_empty());
            let before = (fake.routes(), fake.neighbour_table(), fake.fdb_table());
            fake.fail_next(verb, nix::errno::Errno::EIO);
            let errors = if verb == "link_index" {
                // only read when no VXLAN device is wanted
                let host_gw = Backend {
                    kind: BackendType::HostGw,
                    ..vxlan()
                };
                r.resync(desired(&host_gw, &local(), &nodes))
            } else {
                r.resync(want)
            };
            assert_eq!(errors[0].op, verb, "{verb}: {errors:?}");
            if verb == "link_index" {
                // unknown whether a stale VXLAN device exists: none deleted
                assert!(!fake.calls().iter().any(|c| c == "link_delete"));
            } else {
                assert_eq!(errors.len(), 1, "{verb}: {errors:?}");
                assert_eq!(
                    before,
                    (fake.routes(), fake.neighbour_table(), fake.fdb_table()),
                    "{verb}"
                );
            }
        }
    }
}
