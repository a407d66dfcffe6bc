//! Services and EndpointSlices of the API server -> the proxy's model,
//! checked: what trellis cannot serve becomes a problem that names the
//! Service and the field (the Service is then not programmed at all).

use crate::model::{Endpoint, Protocol, Service, ServicePort, ServiceType, Slice, SlicePort};
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::net::IpAddr;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// What kube-proxy watches, and so does trellis: Services and slices that
/// no other proxy claims and that are not headless.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The affinity timeout when `sessionAffinityConfig` does not say (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The longest affinity timeout the API allows (1 day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("{other:?} is not TCP, UDP or SCTP")),
    }
}

fn port(p: i32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{p} is not a port (1-65535)"))
}

/// The proxy's view of `s`; fields it cannot serve are listed in
/// `problems`.
pub fn service(s: &KService) -> Service {
    let mut out = Service {
        namespace: s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: s.metadata.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    let Some(spec) = s.spec.as_ref() else {
        out.problems.push("spec: missing".into());
        return out;
    };
    out.kind = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            problems.push(problem(
                "spec.type",
                format!("{other:?} is not a Service type"),
            ));
            ServiceType::ClusterIP
        }
    };
    if out.kind == ServiceType::ExternalName {
        // a DNS alias: nothing for a proxy to do (as kube-proxy)
        return out;
    }
    let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    for (i, ip) in ips.iter().enumerate() {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(a) => out.cluster_ips.push(a),
            Err(_) => problems.push(problem(
                &format!("spec.clusterIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )),
        }
    }
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| problems.push(problem(&format!("{field}.protocol"), m)));
        let number = port(p.port).map_err(|m| problems.push(problem(&format!("{field}.port"), m)));
        let node_port = match p.node_port {
            None | Some(0) => Ok(None),
            Some(n) => port(n)
                .map(Some)
                .map_err(|m| problems.push(problem(&format!("{field}.nodePort"), m))),
        };
        if let (Ok(protocol), Ok(port), Ok(node_port)) = (proto, number, node_port) {
            out.ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
                node_port,
            });
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(a) => out.external_ips.push(a),
            Err(_) => problems.push(problem(
                &format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )),
        }
    }
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let t = r.trim();
        // a bare address is a /32 (or /128), as kube-proxy reads it
        let parsed = t
            .parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(n) => out.lb_source_ranges.push(n.trunc()),
            Err(_) => problems.push(problem(
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{r:?} is not a CIDR"),
            )),
        }
    }
    if out.kind == ServiceType::LoadBalancer {
        let ingress = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // hostname-only ingress (and ipMode Proxy) is the load
            // balancer's business: nothing to capture here
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                match ip.parse::<IpAddr>() {
                    Ok(a) => out.lb_ips.push(a),
                    Err(_) => problems.push(problem(
                        &format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("{ip:?} is not an IP address"),
                    )),
                }
            }
        }
    }
    match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => {}
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            match u32::try_from(t) {
                Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => out.affinity_timeout = Some(t),
                _ => problems.push(problem(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT}"),
                )),
            }
        }
        other => problems.push(problem(
            "spec.sessionAffinity",
            format!("{other:?} is not None or ClientIP"),
        )),
    }
    out.external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            problems.push(problem(
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            ));
            false
        }
    };
    out.internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            problems.push(problem(
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            ));
            false
        }
    };
    if let Some(h) = spec.health_check_node_port.filter(|h| *h != 0) {
        match port(h) {
            Ok(h) => out.health_check_node_port = Some(h),
            Err(m) => problems.push(problem("spec.healthCheckNodePort", m)),
        }
    }
    out.problems = problems;
    out
}

fn problem(field: &str, msg: String) -> String {
    format!("{field}: {msg}")
}

/// The proxy's view of `s`; `None` for slices it does not serve (no
/// Service label, FQDN addresses).
pub fn slice(s: &EndpointSlice) -> Option<Slice> {
    let service = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
    if s.address_type == "FQDN" {
        return None;
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            // a port without a number means "all ports": not proxied
            let port = port(p.port?).ok()?;
            Some(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_deref()).ok()?,
                port,
            })
        })
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| {
            let address = e.addresses.first()?.parse().ok()?;
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            Some(Endpoint {
                address,
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                node: e.node_name.clone(),
            })
        })
        .collect();
    Some(Slice {
        namespace: s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: s.metadata.name.clone().unwrap_or_default(),
        service,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        service(&serde_json::from_value(json).expect("service json"))
    }

    #[test]
    fn reads_a_full_service() {
        let s = svc(serde_json::json!({
            "metadata": {"namespace": "web", "name": "front"},
            "spec": {
                "type": "LoadBalancer", "clusterIPs": ["10.96.0.20"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                          {"name": "dns", "port": 53, "protocol": "UDP"}],
                "externalIPs": ["203.0.113.9"],
                "loadBalancerSourceRanges": ["198.51.100.0/24", " 192.0.2.7 "],
                "sessionAffinity": "ClientIP",
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}
        }));
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.kind, ServiceType::LoadBalancer);
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(s.lb_source_ranges[1].to_string(), "192.0.2.7/32");
        assert_eq!(s.lb_ips[0].to_string(), "203.0.113.50");
        assert!(s.external_local && !s.internal_local);
        assert_eq!(s.health_check_node_port, Some(31000));
    }

    #[test]
    fn problems_name_the_field() {
        let s = svc(serde_json::json!({
            "metadata": {"namespace": "a", "name": "b"},
            "spec": {
                "clusterIP": "10.96.0.300",
                "ports": [{"port": 80, "protocol": "QUIC"}, {"port": 70000}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                "loadBalancerSourceRanges": ["nonsense"],
                "externalTrafficPolicy": "Nearest"
            }
        }));
        let all = s.problems.join("\n");
        for want in [
            "spec.clusterIPs[0]: \"10.96.0.300\" is not an IP address",
            "spec.ports[0].protocol: \"QUIC\" is not TCP, UDP or SCTP",
            "spec.ports[1].port: 70000 is not a port",
            "timeoutSeconds: 0 is outside 1-86400",
            "spec.loadBalancerSourceRanges[0]: \"nonsense\" is not a CIDR",
            "spec.externalTrafficPolicy: \"Nearest\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn external_name_and_headless_have_no_virtual_ip() {
        let s = svc(serde_json::json!({"metadata": {"name": "x"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}}));
        assert!(s.cluster_ips.is_empty() && s.problems.is_empty());
        let h = svc(serde_json::json!({"metadata": {"name": "x"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}));
        assert!(h.cluster_ips.is_empty() && h.problems.is_empty());
    }

    #[test]
    fn reads_slices() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "web", "name": "front-abc",
                         "labels": {"kubernetes.io/service-name": "front"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "all"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "nodeName": "n1"},
                {"addresses": ["10.244.2.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["bogus"]}
            ]
        }))
        .expect("slice");
        let v = slice(&s).expect("served");
        assert_eq!(v.service_key(), "web/front");
        assert_eq!(v.ports.len(), 1);
        assert_eq!(v.endpoints.len(), 2);
        assert!(v.endpoints[0].ready && v.endpoints[0].serving && !v.endpoints[0].terminating);
        assert!(!v.endpoints[1].ready && v.endpoints[1].serving && v.endpoints[1].terminating);
        let mut unlabeled = s.clone();
        unlabeled.metadata.labels = None;
        assert!(slice(&unlabeled).is_none());
    }
}
