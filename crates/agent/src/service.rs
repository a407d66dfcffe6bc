//! The CNI side of the agent: ADD, DEL, CHECK, STATUS and GC against the
//! node's IPAM pool and the dataplane. An ADD that fails part way undoes
//! what it did, so no link or address is left behind.

use crate::attach::{host_veth_name, plan, Plan, PlanInput};
use crate::config::AgentConfig;
use crate::reaper::Reaper;
use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use trellis_cni::error::{
    CniError, AGENT_FAILURE, CHECK_MISMATCH, DATAPLANE_FAILURE, INVALID_ENV, IPAM_EXHAUSTED,
    NOT_AVAILABLE, TRY_AGAIN_LATER, UNKNOWN_CONTAINER,
};
use trellis_cni::result::prev_result_addresses;
use trellis_cni::{Attachment, Command, Env, NetConf, Request, Response};
use trellis_dataplane::{Dataplane, DataplaneError};
use trellis_ipam::{IpamError, Owner, OwnerKey, Pool, PoolError};
use trellis_model::HostRange;

/// 104 (plugin specific): the container interface is attached already.
pub const ALREADY_ATTACHED: u32 = 104;

/// Serves CNI requests for one node.
pub struct CniService {
    health: Option<Arc<crate::health::Health>>,
    cfg: AgentConfig,
    range: HostRange,
    mtu: u32,
    dp: Arc<dyn Dataplane>,
    reaper: Reaper,
    pool: Mutex<Pool>,
    policy: Option<crate::policy::Gate>,
}

fn dp_err(what: &str) -> impl FnOnce(DataplaneError) -> CniError + '_ {
    move |e| CniError::new(DATAPLANE_FAILURE, format!("{what}: {e}"))
}

fn pool_err(e: PoolError) -> CniError {
    match e {
        PoolError::Ipam(e @ IpamError::Exhausted(..)) => {
            CniError::new(IPAM_EXHAUSTED, e.to_string())
        }
        PoolError::Ipam(e @ IpamError::AlreadyAllocated { .. }) => {
            CniError::new(ALREADY_ATTACHED, e.to_string()).with_details("DEL it first")
        }
        e @ PoolError::Io { .. } => CniError::new(AGENT_FAILURE, e.to_string()),
    }
}

impl CniService {
    /// Opens the IPAM state of `subnet` and builds the service; pods get
    /// `mtu` unless their network config says otherwise.
    pub fn new(
        cfg: AgentConfig,
        subnet: ipnet::IpNet,
        mtu: u32,
        dp: Arc<dyn Dataplane>,
    ) -> anyhow::Result<Self> {
        let range = HostRange::new(subnet)?;
        let pool = Pool::open(&cfg.ipam_dir(subnet), range)?;
        for w in &pool.warnings {
            tracing::warn!("ipam: {w}");
        }
        Ok(Self {
            health: None,
            cfg,
            range,
            mtu,
            reaper: Reaper::start(dp.clone()),
            dp,
            pool: Mutex::new(pool),
            policy: None,
        })
    }

    /// ADD answers only once the pod's policy is in place (Kubernetes
    /// mode with policy on).
    pub fn with_policy(mut self, gate: crate::policy::Gate) -> Self {
        self.policy = Some(gate);
        self
    }

    /// The pods holding addresses now: (IPv4 address, `namespace/name`).
    pub fn local_pods(&self) -> Vec<(std::net::Ipv4Addr, String)> {
        self.pool()
            .allocator()
            .allocations()
            .filter_map(|(ip, o)| match (ip, &o.pod) {
                (std::net::IpAddr::V4(v4), Some(p)) => Some((*v4, p.clone())),
                _ => None,
            })
            .collect()
    }

    /// Refuses ADDs once `health` reports something fatal (a lost subnet).
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Self {
        self.health = Some(health);
        self
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Addresses currently allocated, for status output.
    pub fn allocations(&self) -> Vec<(std::net::IpAddr, Owner)> {
        self.pool()
            .allocator()
            .allocations()
            .map(|(i, o)| (*i, o.clone()))
            .collect()
    }

    /// Handles one request.
    pub fn handle(&self, req: Request, netns: Option<OwnedFd>) -> Response {
        let conf = match NetConf::parse(&serde_json::to_vec(&req.config).unwrap_or_default()) {
            Ok(c) => c,
            Err(e) => return Response::Error(e),
        };
        let out = match req.env.command {
            Command::Add => self.add(&req.env, &conf, netns).map(Response::Added),
            Command::Del => self.del(&req.env, &conf).map(|()| Response::Done),
            Command::Check => self.check(&req.env, &conf, netns).map(|()| Response::Done),
            Command::Status => self.status().map(|()| Response::Done),
            Command::Gc => self.gc(&conf).map(|()| Response::Done),
            Command::Version => Ok(Response::Done),
        };
        out.unwrap_or_else(Response::Error)
    }

    fn key(env: &Env, conf: &NetConf) -> OwnerKey {
        (
            conf.name.clone(),
            env.container_id.clone(),
            env.ifname.clone(),
        )
    }

    fn pod_netns(&self, env: &Env, netns: Option<OwnedFd>) -> Result<OwnedFd, CniError> {
        let fd = netns.ok_or_else(|| {
            CniError::new(
                INVALID_ENV,
                format!("CNI_NETNS {:?} was not passed to the agent", env.netns),
            )
        })?;
        if self
            .dp
            .is_own_netns(fd.as_fd())
            .map_err(dp_err("inspect CNI_NETNS"))?
        {
            return Err(CniError::new(
                INVALID_ENV,
                format!(
                    "CNI_NETNS {} is the node's own network namespace",
                    env.netns
                ),
            ));
        }
        Ok(fd)
    }

    fn plan_for(&self, env: &Env, conf: &NetConf, ip: std::net::IpAddr) -> Result<Plan, CniError> {
        plan(&PlanInput {
            mode: conf
                .mode
                .or(self.cfg.default_mode)
                .unwrap_or(trellis_cni::config::AttachMode::Bridge),
            ip,
            range: self.range,
            mtu: conf.mtu.unwrap_or(self.mtu),
            bridge: conf.bridge.as_deref().unwrap_or(&self.cfg.bridge),
            container_id: &env.container_id,
            ifname: &env.ifname,
        })
        .map_err(|e| CniError::new(trellis_cni::error::INVALID_CONFIG, e.to_string()))
    }

    fn add(
        &self,
        env: &Env,
        conf: &NetConf,
        netns: Option<OwnedFd>,
    ) -> Result<Attachment, CniError> {
        if let Some(why) = self.health.as_ref().and_then(|h| h.fatal_reason()) {
            return Err(CniError::new(
                TRY_AGAIN_LATER,
                format!("the agent is stopping and takes no new pods: {why}"),
            ));
        }
        let netns = self.pod_netns(env, netns)?;
        let host = host_veth_name(&env.container_id, &env.ifname);
        if self
            .dp
            .link_index(&host)
            .map_err(dp_err("look up host veth"))?
            .is_some()
        {
            return Err(CniError::new(
                ALREADY_ATTACHED,
                format!(
                    "container {} interface {} is attached already (host veth {host} exists)",
                    env.container_id, env.ifname
                ),
            )
            .with_details("DEL it first"));
        }
        // a DEL of this same container and interface may have left its
        // pod-side interface in a tombstone that is not reaped yet
        self.reaper
            .clear(&host)
            .map_err(dp_err("delete the retired veth of an earlier DEL"))?;
        let pod = match (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME")) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        };
        let owner = Owner {
            network: conf.name.clone(),
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            pod,
        };
        let pod = owner.pod.clone();
        let ip = self.pool().allocate(owner).map_err(pool_err)?;
        // fail closed: the pod's interface comes only once its policy is
        // in the kernel
        if let (Some(gate), Some(pod), std::net::IpAddr::V4(v4)) = (&self.policy, &pod, ip) {
            if let Err(e) = gate.admit(v4, pod) {
                self.undo(&host, &Self::key(env, conf));
                return Err(CniError::new(TRY_AGAIN_LATER, e));
            }
        }
        let plan = match self.plan_for(env, conf, ip) {
            Ok(p) => p,
            Err(e) => {
                self.undo(&host, &Self::key(env, conf));
                return Err(e);
            }
        };
        match self.apply(&plan, &netns) {
            Ok(host_mac) => Ok(plan.result(&host_mac, &env.netns)),
            Err(e) => {
                self.undo(&host, &Self::key(env, conf));
                Err(e)
            }
        }
    }

    fn apply(&self, plan: &Plan, netns: &OwnedFd) -> Result<[u8; 6], CniError> {
        let mut veth = plan.veth.clone();
        if let Some((name, gw)) = &plan.bridge {
            let index = self
                .dp
                .bridge_ensure(name, *gw, veth.mtu)
                .map_err(dp_err("prepare bridge"))?;
            veth.master = Some(index);
        }
        let info = self.dp.veth_into_netns(&veth, netns.as_fd()).map_err(|e| {
            let mut err = dp_err("create veth")(e.clone());
            if e.source.errno() == Some(nix::errno::Errno::EEXIST) {
                err.details = format!(
                    "an interface named {} (or {}) exists already",
                    veth.peer, veth.host
                );
            }
            err
        })?;
        if plan.bridge.is_some() {
            self.dp
                .bridge_port_hairpin(&veth.host, true)
                .map_err(dp_err("enable hairpin"))?;
        }
        for (k, v) in &plan.sysctls {
            self.dp.sysctl_set(k, v).map_err(dp_err("set sysctl"))?;
        }
        if let Some(route) = &plan.host_route {
            self.dp
                .route_replace(route)
                .map_err(dp_err("route to pod"))?;
        }
        self.dp
            .pod_configure(netns.as_fd(), &plan.pod)
            .map_err(dp_err("configure pod interface"))?;
        Ok(info.host_mac)
    }

    fn undo(&self, host: &str, key: &OwnerKey) {
        if let (Some(gate), Some(std::net::IpAddr::V4(ip))) =
            (&self.policy, self.pool().allocator().lookup(key))
        {
            gate.release(ip);
        }
        if let Err(e) = self.dp.link_delete(host) {
            tracing::error!("rollback: {e}");
        }
        if let Err(e) = self.pool().release(key) {
            tracing::error!("rollback: {e}");
        }
    }

    fn del(&self, env: &Env, conf: &NetConf) -> Result<(), CniError> {
        let host = host_veth_name(&env.container_id, &env.ifname);
        self.reaper
            .retire(&host)
            .map_err(dp_err("take the host veth out of service"))?;
        let mut pool = self.pool();
        let released = pool.release(&Self::key(env, conf)).map_err(pool_err)?;
        // queued before the lock goes: an ADD that takes the address next
        // asks the policy loop after this
        if let (Some(gate), Some(std::net::IpAddr::V4(ip))) = (&self.policy, released) {
            gate.release(ip);
        }
        drop(pool);
        Ok(())
    }

    fn check(&self, env: &Env, conf: &NetConf, netns: Option<OwnedFd>) -> Result<(), CniError> {
        let Some(ip) = self.pool().allocator().lookup(&Self::key(env, conf)) else {
            return Err(CniError::new(
                UNKNOWN_CONTAINER,
                format!(
                    "container {} interface {} is not attached to network {}",
                    env.container_id, env.ifname, conf.name
                ),
            ));
        };
        let netns = self.pod_netns(env, netns)?;
        let plan = self.plan_for(env, conf, ip)?;
        let mismatch = |what: String| {
            Err(CniError::new(
                CHECK_MISMATCH,
                format!("container {}: {what}", env.container_id),
            ))
        };
        if self
            .dp
            .link_index(&plan.veth.host)
            .map_err(dp_err("look up host veth"))?
            .is_none()
        {
            return mismatch(format!("host veth {} is missing", plan.veth.host));
        }
        let Some(state) = self
            .dp
            .pod_inspect(netns.as_fd(), &env.ifname)
            .map_err(dp_err("inspect pod"))?
        else {
            return mismatch(format!(
                "interface {} is missing in {}",
                env.ifname, env.netns
            ));
        };
        if !state.addresses.contains(&plan.address) {
            return mismatch(format!(
                "{} lacks address {} (has {:?})",
                env.ifname, plan.address, state.addresses
            ));
        }
        if !state.default_via.contains(&plan.gateway) {
            return mismatch(format!(
                "no default route via {} on {}",
                plan.gateway, env.ifname
            ));
        }
        if state.mtu != plan.veth.mtu {
            return mismatch(format!(
                "{} has MTU {}, expected {}",
                env.ifname, state.mtu, plan.veth.mtu
            ));
        }
        if let Some(prev) = &conf.prev_result {
            let claimed = prev_result_addresses(prev);
            if !claimed.contains(&plan.address) {
                return mismatch(format!(
                    "prevResult lists {claimed:?}, the agent holds {}",
                    plan.address
                ));
            }
        }
        Ok(())
    }

    fn status(&self) -> Result<(), CniError> {
        let free = self.pool().allocator().free();
        if free == 0 {
            return Err(CniError::new(
                NOT_AVAILABLE,
                format!("no free pod address left in {}", self.range.net()),
            ));
        }
        Ok(())
    }

    fn gc(&self, conf: &NetConf) -> Result<(), CniError> {
        let valid: HashSet<(String, String)> = conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let stale = self.pool().stale(&conf.name, &valid);
        // go on past failures, report them all at the end
        let mut failures = Vec::new();
        for (ip, owner) in stale {
            let host = host_veth_name(&owner.container_id, &owner.ifname);
            if let Err(e) = self.dp.link_delete(&host) {
                failures.push(e.to_string());
                continue;
            }
            match self.pool().release_ip(ip) {
                Ok(()) => {
                    tracing::info!("gc: freed {ip} of {} {}", owner.container_id, owner.ifname)
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                DATAPLANE_FAILURE,
                format!("gc: {} attachment(s) not freed", failures.len()),
            )
            .with_details(failures.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use trellis_dataplane::FakeDataplane;

    fn service(dir: &std::path::Path) -> (CniService, Arc<FakeDataplane>) {
        let cfg = AgentConfig::parse(&format!(
            r#"{{"nodeName":"n1","subnet":"10.244.1.0/24","dataDir":"{}"}}"#,
            dir.display()
        ))
        .expect("cfg");
        let fake = Arc::new(FakeDataplane::new());
        let subnet = cfg.subnet.expect("subnet");
        (
            CniService::new(cfg, subnet, 1500, fake.clone()).expect("service"),
            fake,
        )
    }

    fn request(cmd: &str, mode: &str) -> Request {
        let env = Env::from_lookup(|k| {
            Some(match k {
                "CNI_COMMAND" => cmd.into(),
                "CNI_CONTAINERID" => "c1".into(),
                "CNI_NETNS" => "/var/run/netns/p".into(),
                "CNI_IFNAME" => "eth0".into(),
                "CNI_PATH" => "/opt/cni/bin".into(),
                _ => return None,
            })
        })
        .expect("env");
        Request {
            env,
            config: serde_json::json!({"cniVersion":"1.1.0","name":"net","mode":mode}),
            has_netns_fd: true,
        }
    }

    fn pod_fd() -> Option<OwnedFd> {
        Some(std::fs::File::open("/dev/null").expect("fd").into())
    }

    #[test]
    fn every_failing_step_rolls_back() {
        for (mode, verb) in [
            ("bridge", "bridge_ensure"),
            ("bridge", "veth_into_netns"),
            ("bridge", "bridge_port_hairpin"),
            ("routed", "sysctl_set"),
            ("routed", "route_replace"),
            ("routed", "pod_configure"),
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            let (svc, fake) = service(dir.path());
            fake.fail_next(verb, Errno::EIO);
            match svc.handle(request("ADD", mode), pod_fd()) {
                Response::Error(e) => assert_eq!(e.code, DATAPLANE_FAILURE, "{mode}/{verb}: {e}"),
                other => panic!("{mode}/{verb}: {other:?}"),
            }
            let veths: Vec<_> = fake
                .links()
                .into_keys()
                .filter(|l| l.starts_with("tl"))
                .collect();
            assert!(veths.is_empty(), "{mode}/{verb}: {veths:?}");
            assert!(svc.allocations().is_empty(), "{mode}/{verb}");
            // and the next ADD succeeds
            assert!(
                matches!(
                    svc.handle(request("ADD", mode), pod_fd()),
                    Response::Added(_)
                ),
                "{mode}/{verb}"
            );
        }
    }

    #[test]
    fn del_takes_the_veth_out_of_service_at_once_and_a_readd_finds_the_names_free() {
        let dir = tempfile::tempdir().expect("tmp");
        let (svc, fake) = service(dir.path());
        let host = host_veth_name("c1", "eth0");
        for round in 0..3 {
            assert!(
                matches!(
                    svc.handle(request("ADD", "routed"), pod_fd()),
                    Response::Added(_)
                ),
                "round {round}"
            );
            assert!(fake.links().contains_key(&host));
            assert!(matches!(
                svc.handle(request("DEL", "routed"), None),
                Response::Done
            ));
            // when DEL answers, the pod's link and route are out of service
            assert!(!fake.links().contains_key(&host), "round {round}");
            assert!(fake.routes().iter().all(|r| r.dev != host), "round {round}");
            assert!(svc.allocations().is_empty(), "round {round}");
        }
        // DEL of what is gone already is fine
        assert!(matches!(
            svc.handle(request("DEL", "routed"), None),
            Response::Done
        ));
        // an ADD clears a tombstone of the same container at once
        assert!(matches!(
            svc.handle(request("ADD", "routed"), pod_fd()),
            Response::Added(_)
        ));
        let tomb = crate::reaper::tombstone_name(&host);
        assert!(!fake.links().contains_key(&tomb));
    }

    #[test]
    fn add_is_refused_once_the_subnet_is_lost() {
        let dir = tempfile::tempdir().expect("tmp");
        let (svc, fake) = service(dir.path());
        let (health, _exit) = crate::health::Health::new();
        let health = Arc::new(health);
        let svc = svc.with_health(health.clone());
        assert!(matches!(
            svc.handle(request("ADD", "routed"), pod_fd()),
            Response::Added(_)
        ));
        health.fatal("subnet 10.244.1.0/24 was lost".into());
        fake.clear_calls();
        match svc.handle(request("ADD", "bridge"), pod_fd()) {
            Response::Error(e) => {
                assert_eq!(e.code, TRY_AGAIN_LATER, "{e}");
                assert!(e.msg.contains("10.244.1.0/24"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(fake.calls().is_empty(), "no kernel work after the loss");
        // DEL still works: pods can be torn down
        assert!(matches!(
            svc.handle(request("DEL", "routed"), None),
            Response::Done
        ));
    }

    #[test]
    fn routed_add_programs_route_and_sysctls() {
        let dir = tempfile::tempdir().expect("tmp");
        let (svc, fake) = service(dir.path());
        let Response::Added(a) = svc.handle(request("ADD", "routed"), pod_fd()) else {
            panic!("add")
        };
        assert_eq!(a.ips[0].address.to_string(), "10.244.1.2/32");
        assert_eq!(fake.routes()[0].dst.to_string(), "10.244.1.2/32");
        assert!(fake.sysctls().keys().any(|k| k.ends_with("proxy_arp")));
        assert!(matches!(
            svc.handle(request("DEL", "routed"), None),
            Response::Done
        ));
        assert!(fake.routes().is_empty());
        assert!(svc.allocations().is_empty());
    }
}
