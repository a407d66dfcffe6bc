//! `trellisctl`: the trellis command line.

mod apply;
mod bgp;
mod cluster_demo;
mod demo;
mod kube_demo;
mod policy;
mod policy_demo;
mod services;
mod status;
mod svc_demo;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trellis_lab::{Lab, LabOptions};

/// trellis command line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// This node's subnet, backend, peers and programmed routes/ARP/FDB.
    Status {
        /// The agent's status socket.
        #[arg(long, default_value = "/run/trellis/status.sock")]
        socket: std::path::PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
    },
    /// Write BGP resources (BGPConfiguration, BGPPeer, Node; YAML or JSON,
    /// several documents per file) to the datastore.
    Apply {
        /// Manifest file ("-": stdin).
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove the resources named in a manifest from the datastore.
    Delete {
        /// Manifest file ("-": stdin).
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List BGP resources of one kind from the datastore (`-o yaml` prints
    /// a manifest `apply -f` takes back), or `services`: the Services as
    /// this node's agent programmed them (`-o wide`: with endpoints).
    Get {
        /// bgpconfigurations, bgppeers, nodes or services.
        #[arg(value_enum)]
        kind: GetKind,
        /// Only this one.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
        /// `services`: the agent's status socket.
        #[arg(long, default_value = "/run/trellis/status.sock")]
        socket: std::path::PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// How this node serves something, read from its kernel.
    Trace {
        #[command(subcommand)]
        what: TraceCmd,
    },
    /// Network policy on this node.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// BGP on this node.
    Bgp {
        #[command(subcommand)]
        cmd: BgpCmd,
    },
    /// A virtual cluster on this machine, in network namespaces.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

/// What `get` lists.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum GetKind {
    /// BGPConfiguration.
    #[value(alias = "bgpconfiguration")]
    Bgpconfigurations,
    /// BGPPeer.
    #[value(alias = "bgppeer")]
    Bgppeers,
    /// Node (BGP settings of a node).
    #[value(alias = "node")]
    Nodes,
    /// Services as this node's agent programmed them.
    #[value(alias = "service", alias = "svc")]
    Services,
}

#[derive(Subcommand, Debug)]
enum TraceCmd {
    /// The nftables objects serving Service NAMESPACE/NAME, with counters.
    Svc {
        /// `namespace/name`.
        name: String,
        /// The agent's status socket.
        #[arg(long, default_value = "/run/trellis/status.sock")]
        socket: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Allowed or denied, and by which tier, policy and rule: a new
    /// connection from SRC to DST as this node's table decides it.
    Trace {
        /// Source address.
        src: std::net::Ipv4Addr,
        /// Destination address.
        dst: std::net::Ipv4Addr,
        /// `PORT/PROTO` (tcp, udp, sctp); absent: a flow without ports
        /// (ICMP).
        port: Option<String>,
        /// The agent's HTTP address.
        #[arg(long, default_value = "127.0.0.1:9750")]
        http: std::net::SocketAddr,
        /// Output format (table or json).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
    },
    /// The last denied packets the agent logged (with
    /// `kubernetes.policy.logDenied`), oldest first.
    Denials {
        /// The agent's HTTP address.
        #[arg(long, default_value = "127.0.0.1:9750")]
        http: std::net::SocketAddr,
        /// Output format (table or json).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
    },
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// Where the cluster keeps its state: etcd, or the Kubernetes API
    /// (the project's custom resources).
    #[arg(long, value_enum, env = "TRELLIS_DATASTORE", default_value_t = LabDatastore::Etcd)]
    datastore: LabDatastore,
    /// Kubernetes mode: the kubeconfig (default ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Kubernetes mode: the API server's address, overriding the
    /// kubeconfig's (`https://IP:PORT`).
    #[arg(long)]
    server: Option<String>,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "TRELLIS_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of the cluster in etcd.
    #[arg(long, env = "TRELLIS_ETCD_PREFIX", default_value = "/trellis/v1/")]
    prefix: String,
}

#[derive(Subcommand, Debug)]
enum BgpCmd {
    /// Each peer: type, state, uptime, prefixes received/accepted/advertised.
    Status {
        /// The agent's status socket.
        #[arg(long, default_value = "/run/trellis/status.sock")]
        socket: std::path::PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
    },
}

/// Where a cluster keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LabDatastore {
    /// etcd (subnet leases).
    Etcd,
    /// The Kubernetes API (podCIDRs, Node annotations).
    Kubernetes,
}

#[derive(Subcommand, Debug)]
enum LabCmd {
    /// Add one more node (with its agent) to a cluster lab.
    AddNode {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Run kubectl as the lab's admin against a Kubernetes-mode lab.
    Kubectl {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
        /// kubectl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Build a one-node lab, attach pods in both modes, show them talking, tear it down.
    Demo,
    /// Create a persistent lab (kept until `lab down`).
    Up {
        /// Lab name (letters and digits, up to 12).
        #[arg(long, default_value = "dev")]
        name: String,
        /// Number of nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Pod MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Also run a real etcd on the fabric (192.0.2.2:2379).
        #[arg(long)]
        etcd: bool,
        /// Cluster mode: etcd plus subnet leases and cross-node routing with
        /// this backend (vxlan, host-gw or directrouting).
        #[arg(long)]
        backend: Option<String>,
        /// Underlay segments: 1 (one L2 fabric) or 2 (routed between).
        #[arg(long, default_value_t = 1)]
        segments: usize,
        /// BGP resources to apply before the agents start (bgp backend).
        #[arg(long, value_name = "MANIFEST")]
        bgp: Option<std::path::PathBuf>,
        /// Where the cluster state lives with --backend: etcd, or the real
        /// Kubernetes control plane (API server, controller manager) the
        /// lab runs, playing the kubelet itself.
        #[arg(long, value_enum, default_value_t = LabDatastore::Etcd)]
        datastore: LabDatastore,
        /// Kubernetes mode: nodes (comma-separated) that run the real
        /// kube-proxy (nftables mode) while their agent only routes.
        #[arg(long, value_delimiter = ',')]
        kube_proxy: Vec<String>,
    },
    /// Destroy a persistent lab.
    Down {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Attach a pod (runs the trellis CNI plugin like a runtime).
    Add {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
        /// Node.
        #[arg(long, default_value = "n1")]
        node: String,
        /// Attach mode: bridge or routed.
        #[arg(long, default_value = "bridge")]
        mode: String,
        /// Pod name.
        pod: String,
    },
    /// Detach a pod (CNI DEL) and remove its namespace.
    Del {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
        /// Node.
        #[arg(long, default_value = "n1")]
        node: String,
        /// Pod name.
        pod: String,
    },
    /// `trellisctl status` of one lab node.
    Status {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
        /// Node.
        #[arg(long, default_value = "n1")]
        node: String,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: status::Output,
    },
    /// Show a lab's nodes and pods.
    Show {
        /// Lab name.
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Remove labs whose owner is gone and stray lab namespaces.
    Gc {
        /// Also remove persistent labs and labs whose owner still runs.
        #[arg(long)]
        all: bool,
    },
}

impl StoreArgs {
    fn target(self) -> anyhow::Result<apply::Target> {
        Ok(match self.datastore {
            LabDatastore::Etcd => apply::Target::Etcd {
                endpoints: self.etcd_endpoints,
                prefix: self.prefix,
            },
            LabDatastore::Kubernetes => {
                // KUBECONFIG may list several files: the first that exists;
                // none at all: ~/.kube/config, else the pod's service account
                let kubeconfig = match self.kubeconfig {
                    Some(k) => {
                        let listed = k.to_string_lossy().into_owned();
                        let first = std::env::split_paths(&listed).find(|p| p.exists());
                        Some(first.with_context(|| {
                            format!("--kubeconfig/KUBECONFIG {listed}: no such file")
                        })?)
                    }
                    None => std::env::var_os("HOME")
                        .map(|h| std::path::Path::new(&h).join(".kube/config"))
                        .filter(|p| p.exists()),
                };
                anyhow::ensure!(
                    kubeconfig.is_some()
                        || std::path::Path::new(trellis_kube::SERVICE_ACCOUNT_DIR).exists(),
                    "--datastore kubernetes: no kubeconfig (pass --kubeconfig, set KUBECONFIG, \
                     or have ~/.kube/config) and no service account mounted"
                );
                apply::Target::Kubernetes(trellis_kube::ClientOptions {
                    kubeconfig,
                    server: self.server,
                    on_request: None,
                })
            }
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cmd = match cli.cmd {
        Cmd::Status { socket, output } => return print_status(&socket, output),
        Cmd::Lab { cmd } => cmd,
        Cmd::Apply { file, store } => return apply::apply(&file, &store.target()?),
        Cmd::Delete { file, store } => return apply::delete(&file, &store.target()?),
        Cmd::Policy {
            cmd:
                PolicyCmd::Trace {
                    src,
                    dst,
                    port,
                    http,
                    output,
                },
        } => {
            let d = policy::fetch(http, src, dst, port.as_deref())?;
            if output == status::Output::Json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", policy::render(&d, src, dst, port.as_deref()));
            }
            return Ok(());
        }
        Cmd::Policy {
            cmd: PolicyCmd::Denials { http, output },
            ..
        } => {
            let d = policy::denials(http)?;
            if output == status::Output::Json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", policy::render_denials(&d));
            }
            return Ok(());
        }
        Cmd::Trace {
            what: TraceCmd::Svc { name, socket },
        } => {
            let p = services::section(&status::fetch(&socket)?)?;
            print!("{}", services::trace(&p, &name)?);
            return Ok(());
        }
        Cmd::Get {
            kind: GetKind::Services,
            name,
            output,
            socket,
            ..
        } => {
            let mut p = services::section(&status::fetch(&socket)?)?;
            if let Some(n) = &name {
                p.services.retain(|s| &s.service == n);
            }
            let wide = output == status::Output::Wide;
            return status::print(output, &p, |p| services::render(p, wide));
        }
        Cmd::Get {
            kind,
            name,
            output,
            store,
            ..
        } => {
            let kind = match kind {
                GetKind::Bgpconfigurations => apply::Kind::Bgpconfigurations,
                GetKind::Bgppeers => apply::Kind::Bgppeers,
                GetKind::Nodes | GetKind::Services => apply::Kind::Nodes,
            };
            let rs = apply::get(kind, name.as_deref(), &store.target()?)?;
            return match output {
                status::Output::Table | status::Output::Wide => {
                    print!("{}", apply::render(kind, &rs));
                    Ok(())
                }
                status::Output::Json => {
                    status::print(output, &apply::manifests(&rs), |_| String::new())
                }
                status::Output::Yaml => {
                    for r in &rs {
                        print!("---\n{}", serde_yaml::to_string(&r.manifest())?);
                    }
                    Ok(())
                }
            };
        }
        Cmd::Bgp {
            cmd: BgpCmd::Status { socket, output },
        } => {
            let b = bgp::section(&status::fetch(&socket)?)?;
            return status::print(output, &b, bgp::render);
        }
    };
    match cmd {
        LabCmd::Status { name, node, output } => {
            let lab = Lab::open(&name)?;
            print_status(&lab.status_socket(&node), output)
        }
        LabCmd::Demo => demo::run(),
        LabCmd::Up {
            name,
            nodes,
            mtu,
            etcd,
            backend,
            segments,
            bgp,
            datastore,
            kube_proxy,
        } => {
            let bgp = bgp
                .map(|f| {
                    std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))
                })
                .transpose()?;
            let lab = Lab::create(LabOptions {
                bgp,
                nodes,
                name: Some(name.clone()),
                mtu,
                etcd,
                segments,
                cluster: match datastore {
                    LabDatastore::Etcd => backend
                        .as_deref()
                        .map(trellis_lab::cluster_config)
                        .transpose()?,
                    LabDatastore::Kubernetes => None,
                },
                kubernetes: match datastore {
                    LabDatastore::Etcd => None,
                    LabDatastore::Kubernetes => Some(trellis_lab::cluster_config(
                        backend.as_deref().unwrap_or("vxlan"),
                    )?),
                },
                kube_proxy,
                routing_only: vec![],
            })?;
            println!(
                "lab {} is up: {} node(s); state in {}",
                lab.id(),
                nodes,
                lab.dir().display()
            );
            if datastore == LabDatastore::Kubernetes {
                println!(
                    "kubectl: trellisctl lab kubectl --name {name} get nodes, or\n  \
                     ip netns exec {} {} --kubeconfig {} get nodes",
                    lab.etcd_ns(),
                    trellis_lab::k8s::bin_dir()?.join("kubectl").display(),
                    lab.kubeconfig().display()
                );
            }
            Ok(())
        }
        LabCmd::Kubectl { name, args } => {
            let lab = Lab::open(&name)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            print!("{}", lab.kubectl(&args)?);
            Ok(())
        }
        LabCmd::AddNode { name } => {
            let mut lab = Lab::open(&name)?;
            let node = lab.add_node()?;
            println!("{node} added to lab {name}");
            Ok(())
        }
        LabCmd::Down { name } => {
            Lab::open(&name)?.destroy()?;
            println!("lab {name} removed");
            Ok(())
        }
        LabCmd::Add {
            name,
            node,
            mode,
            pod,
        } => {
            let mut lab = Lab::open(&name)?;
            let a = lab.add_pod(&node, &pod, &mode)?;
            println!(
                "{pod} on {node} ({mode}): {} in {:.1} ms",
                a.address,
                a.took.as_secs_f64() * 1e3
            );
            Ok(())
        }
        LabCmd::Del { name, node, pod } => {
            let mut lab = Lab::open(&name)?;
            let took = lab.del_pod(&node, &pod)?;
            println!(
                "{pod} on {node} deleted in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
            Ok(())
        }
        LabCmd::Show { name } => {
            let lab = Lab::open(&name)?;
            println!(
                "{}",
                serde_json::to_string_pretty(lab.state()).context("encode")?
            );
            Ok(())
        }
        LabCmd::Gc { all } => {
            let r = trellis_lab::gc::sweep(all);
            println!(
                "removed labs: {:?}; stray namespaces: {:?}; kept: {:?}",
                r.labs, r.strays, r.kept
            );
            if !r.errors.is_empty() {
                anyhow::bail!("gc: {}", r.errors.join("; "));
            }
            Ok(())
        }
    }
}

fn print_status(socket: &std::path::Path, output: status::Output) -> anyhow::Result<()> {
    status::print(output, &status::fetch(socket)?, status::render)
}
