//! How the connection path's lookups and the config pipeline grow with cluster size
//! (`cargo bench -p ztunnel --bench lookups`; a filter after `--` picks benchmarks, e.g.
//! `-- route/vip`). Each lookup benchmark runs at 10, 1,000 and 100,000 workloads in a
//! generated cluster where services and policies grow with it (one per ten workloads, at
//! most 10,000 of each: 100,000 workloads, 10,000 services, 10,000 policies at the top),
//! and cycles over targets spread across the whole config, so a scan is not flattered by
//! finding its target first.
//!
//! Before the criterion benchmarks, the binary prints the memory a 10,000-workload config
//! takes at each stage (xDS resources, the merged config, the store), counted by a global
//! allocator.
//!
//! The machine these run on is usually shared: compare how a figure grows with size, not
//! its absolute value.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{BTreeMap, HashMap},
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
    time::{Duration, Instant},
};

use criterion::{BatchSize, Criterion, Throughput};
use prost::Message as _;
use tokio::sync::watch;
use ztunnel::{
    istio::{
        proto::{
            ADDRESS_TYPE, AUTHORIZATION_TYPE,
            envoy::{DeltaDiscoveryResponse, Resource},
            security, workload as xds,
        },
        source::{Base, IstioSource},
    },
    policy::{self, Action, Authorization, MtlsMode, PeerAuthentication, Scope},
    proxy::{ConnectionRecord, Direction, metric_labels},
    state::{LocalConfig, Namespace, Service, ServicePort, Store, Workload, settle::Settler},
};

/// Counts live heap bytes, for the memory report.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; only a counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller passes a block this allocator (so `System`) gave out.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const ROOT: &str = "istio-system";
const NODE: &str = "node-0";
const NODES: usize = 100;
/// Workload counts of the lookup benchmarks.
const SIZES: [usize; 3] = [10, 1_000, 100_000];
/// Workload counts of the xDS apply benchmarks (10,000: the figure per workload).
const XDS_SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
/// How many different targets each lookup benchmark cycles over.
const TARGETS: usize = 256;

/// The generated cluster's shape at `n` workloads: namespaces, services, policies.
fn shape(n: usize) -> (usize, usize, usize) {
    let tenth = (n / 10).clamp(1, 10_000);
    ((n / 100).max(1), tenth, tenth)
}

fn workload_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))
}

fn vip(j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + j as u32))
}

/// Workload `i` backs service `i % services`; service `j` lives in namespace
/// `j % namespaces`, and so do its workloads.
fn namespace_of_service(j: usize, namespaces: usize) -> String {
    format!("ns-{}", j % namespaces)
}

/// A cluster of `n` workloads as the workload file or the Kubernetes source gives it:
/// ambient namespaces, services selecting their pods by `app`, selector ALLOW policies per
/// service, NAMESPACE DENY policies, a GLOBAL DENY, a STRICT mesh peer authentication.
fn cluster(n: usize) -> LocalConfig {
    let (namespaces, services, policies) = shape(n);
    let namespaces_list = (0..namespaces)
        .map(|k| Namespace {
            name: format!("ns-{k}"),
            labels: BTreeMap::from([("istio.io/dataplane-mode".into(), "ambient".into())]),
        })
        .collect();
    let workloads = (0..n)
        .map(|i| {
            let j = i % services;
            let node = format!("node-{}", i % NODES);
            let local = node == NODE;
            Arc::new(Workload {
                name: format!("svc-{j}-{i}"),
                namespace: namespace_of_service(j, namespaces),
                uid: None,
                node,
                network: String::new(),
                addresses: vec![workload_ip(i)],
                service_account: format!("sa-{j}"),
                trust_domain: None,
                protocol: None,
                labels: BTreeMap::from([
                    ("app".into(), format!("svc-{j}")),
                    ("version".into(), "v1".into()),
                    ("pod-template-hash".into(), format!("{:x}", i % 7)),
                ]),
                canonical_name: None,
                canonical_revision: None,
                workload_type: Some("deployment".into()),
                workload_name: Some(format!("svc-{j}")),
                netns: local.then(|| PathBuf::from(format!("/run/netns/{i}"))),
                cgroup: local.then(|| PathBuf::from(format!("/sys/fs/cgroup/{i}"))),
                locality: None,
                waypoint: None,
            })
        })
        .collect();
    let services_list = (0..services)
        .map(|j| Service {
            name: format!("svc-{j}"),
            namespace: namespace_of_service(j, namespaces),
            hostname: None,
            addresses: vec![vip(j)],
            ports: vec![ServicePort {
                port: 80,
                target_port: Some(8080),
                name: None,
                app_protocol: None,
            }],
            selector: BTreeMap::from([("app".into(), format!("svc-{j}"))]),
            subject_alt_names: Vec::new(),
            waypoint: None,
            weighted_waypoints: Vec::new(),
        })
        .collect();
    let from = |m: policy::Match| policy::Rule {
        from: Some(vec![m]),
        to: None,
        when: None,
    };
    let mut policies_list: Vec<Authorization> = (0..policies)
        .map(|k| {
            let j = k % services;
            let namespace = namespace_of_service(j, namespaces);
            if k % 10 == 9 {
                Authorization {
                    name: format!("deny-{k}"),
                    namespace,
                    scope: Scope::Namespace,
                    selector: BTreeMap::new(),
                    action: Action::Deny,
                    rules: vec![from(policy::Match {
                        namespaces: vec!["quarantine".into()],
                        ..Default::default()
                    })],
                }
            } else {
                Authorization {
                    name: format!("allow-{k}"),
                    namespace: namespace.clone(),
                    scope: Scope::WorkloadSelector,
                    selector: BTreeMap::from([("app".into(), format!("svc-{j}"))]),
                    action: Action::Allow,
                    rules: vec![from(policy::Match {
                        principals: vec![format!("cluster.local/ns/{namespace}/sa/client").into()],
                        ..Default::default()
                    })],
                }
            }
        })
        .collect();
    policies_list.push(Authorization {
        name: "deny-quarantine".into(),
        namespace: ROOT.into(),
        scope: Scope::Global,
        selector: BTreeMap::new(),
        action: Action::Deny,
        rules: vec![from(policy::Match {
            namespaces: vec!["quarantine".into()],
            ..Default::default()
        })],
    });
    LocalConfig {
        namespaces: namespaces_list,
        workloads,
        services: services_list,
        root_namespace: ROOT.into(),
        policies: policies_list,
        peer_authentications: vec![PeerAuthentication {
            name: "default".into(),
            namespace: ROOT.into(),
            selector: BTreeMap::new(),
            mode: MtlsMode::Strict,
        }],
        ..LocalConfig::default()
    }
}

/// `TARGETS` indices spread evenly over `0..n`.
fn spread(n: usize) -> Vec<usize> {
    (0..TARGETS).map(|t| t * n / TARGETS).collect()
}

/// Cycles through `items`, one per call.
fn cycle<'a, T>(items: &'a [T]) -> impl FnMut() -> &'a T {
    let mut next = 0;
    move || {
        next = (next + 1) % items.len();
        &items[next]
    }
}

fn lookups(c: &mut Criterion) {
    for n in SIZES {
        let cfg = cluster(n);
        let (_, services, _) = shape(n);
        let store = Store::new(cfg.clone());

        let vips: Vec<SocketAddr> = spread(services)
            .into_iter()
            .map(|j| SocketAddr::new(vip(j), 80))
            .collect();
        // The VIP's service only, as Istio's `vip_match/exact-hit-N` measures it.
        let mut g = c.benchmark_group("vip_match");
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{n}"), |b| {
            let mut next = cycle(&vips);
            b.iter(|| black_box(store.service_by_vip(next().ip())))
        });
        g.finish();

        // The whole route: the service, the round robin's endpoint, and the route's
        // strings (endpoint identity, workload key, service hostname).
        let mut g = c.benchmark_group("route");
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("vip/{n}"), |b| {
            let mut next = cycle(&vips);
            b.iter(|| black_box(store.route(None, *next())))
        });
        let pods: Vec<SocketAddr> = spread(n)
            .into_iter()
            .map(|i| SocketAddr::new(workload_ip(i), 8080))
            .collect();
        g.bench_function(format!("workload/{n}"), |b| {
            let mut next = cycle(&pods);
            b.iter(|| black_box(store.route(None, *next())))
        });
        g.finish();

        let mut g = c.benchmark_group("authorize");
        g.throughput(Throughput::Elements(1));
        let conns: Vec<(String, policy::Connection)> = spread(n)
            .into_iter()
            .map(|i| {
                let w = &cfg.workloads[i];
                let conn = policy::Connection {
                    src_ip: IpAddr::from([192, 168, 0, 1]),
                    src_identity: Some(format!(
                        "spiffe://cluster.local/ns/{}/sa/client",
                        w.namespace
                    )),
                    dst: SocketAddr::new(w.addresses[0], 8080),
                };
                (w.key(), conn)
            })
            .collect();
        for (key, conn) in &conns {
            assert_eq!(
                store.authorize(key, conn),
                policy::Decision::Allow,
                "the generated policies allow the client into {key}"
            );
        }
        g.bench_function(format!("{n}"), |b| {
            let mut next = cycle(&conns);
            b.iter(|| {
                let (key, conn) = next();
                black_box(store.authorize(key, conn))
            })
        });
        g.finish();

        let mut g = c.benchmark_group("metric_labels");
        g.throughput(Throughput::Elements(1));
        // Sometimes slow before the index: a few samples are plenty for its shape.
        g.sample_size(10);
        let records: Vec<ConnectionRecord> = spread(n)
            .into_iter()
            .map(|i| {
                let src = &cfg.workloads[(i + n / 2) % n];
                record(src, SocketAddr::new(workload_ip(i), 8080))
            })
            .collect();
        g.bench_function(format!("{n}"), |b| {
            let mut next = cycle(&records);
            b.iter(|| black_box(metric_labels(&store, next())))
        });
        g.finish();

        let mut g = c.benchmark_group("store_build");
        g.sample_size(10);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}"), |b| {
            b.iter_batched(|| cfg.clone(), Store::new, BatchSize::PerIteration)
        });
        g.finish();

        let mut g = c.benchmark_group("settle");
        g.sample_size(10);
        g.throughput(Throughput::Elements(n as u64));
        // The file and Kubernetes sources: each version goes through the settler.
        g.bench_function(format!("{n}"), |b| {
            b.iter_batched(
                || {
                    (
                        Settler::new(cfg.clone(), Duration::from_secs(5), NODE),
                        cfg.clone(),
                    )
                },
                |(mut settler, next)| {
                    settler.update(next, Instant::now());
                    settler
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

/// Round robin over one service with 10,000 endpoints (Istio's `load_balance/basic-10000`).
fn load_balance(c: &mut Criterion) {
    let mut cfg = cluster(10_000);
    for w in &mut cfg.workloads {
        let w = Arc::make_mut(w);
        w.labels.insert("app".into(), "svc-0".into());
        w.namespace = "ns-0".into();
    }
    let store = Store::new(cfg);
    let dst = SocketAddr::new(vip(0), 80);
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    g.bench_function("vip_one_service_10000_endpoints", |b| {
        b.iter(|| black_box(store.route(None, dst)))
    });
    g.finish();
}

fn record(src: &Workload, dst: SocketAddr) -> ConnectionRecord {
    ConnectionRecord {
        id: 1,
        direction: Direction::Outbound,
        pod: src.key(),
        src: SocketAddr::new(src.addresses[0], 40000),
        dst,
        src_identity: Some(format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            src.namespace, src.service_account
        )),
        dst_identity: None,
        security_policy: "mutual_tls".into(),
        bytes_sent: 0,
        bytes_received: 0,
        opened_ms: 0,
        duration_ms: None,
        outcome: None,
        probe: false,
        hbone_addr: None,
    }
}

/// The same cluster as istiod sends it: one response of `Address` resources (services,
/// then workloads naming the services they back and the selector policies that apply to
/// them), and one of `Authorization` resources. Every other service maps its port to a
/// named target port (0 on the wire), resolved from its endpoints.
fn xds_responses(n: usize) -> (DeltaDiscoveryResponse, DeltaDiscoveryResponse) {
    let (namespaces, services, policies) = shape(n);
    let hostname = |j: usize| {
        format!(
            "svc-{j}.{}.svc.cluster.local",
            namespace_of_service(j, namespaces)
        )
    };
    let resource = |type_url: &str, name: String, value: Vec<u8>| Resource {
        version: "1".into(),
        name,
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        aliases: Vec::new(),
    };
    let mut addresses = Vec::with_capacity(n + services);
    for j in 0..services {
        let ns = namespace_of_service(j, namespaces);
        let svc = xds::Service {
            name: format!("svc-{j}"),
            namespace: ns.clone(),
            hostname: hostname(j),
            addresses: vec![xds::NetworkAddress {
                network: String::new(),
                address: ip_bytes(vip(j)),
            }],
            ports: vec![xds::Port {
                service_port: 80,
                target_port: if j % 2 == 0 { 0 } else { 8080 },
            }],
            ..Default::default()
        };
        let addr = xds::Address {
            r#type: Some(xds::address::Type::Service(svc)),
        };
        addresses.push(resource(
            ADDRESS_TYPE,
            format!("{ns}/{}", hostname(j)),
            addr.encode_to_vec(),
        ));
    }
    for i in 0..n {
        addresses.push(xds_workload(i, n));
    }
    let mut authorizations = Vec::with_capacity(policies);
    for k in 0..policies {
        let j = k % services;
        let ns = namespace_of_service(j, namespaces);
        let a = security::Authorization {
            name: format!("allow-{k}"),
            namespace: ns.clone(),
            scope: security::Scope::WorkloadSelector as i32,
            action: security::Action::Allow as i32,
            rules: vec![security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![security::Match {
                        principals: vec![security::StringMatch {
                            match_type: Some(security::string_match::MatchType::Exact(format!(
                                "cluster.local/ns/{ns}/sa/client"
                            ))),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
        };
        authorizations.push(resource(
            AUTHORIZATION_TYPE,
            format!("{ns}/allow-{k}"),
            a.encode_to_vec(),
        ));
    }
    let response = |type_url: &str, resources| DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources,
        nonce: "1".into(),
        ..Default::default()
    };
    (
        response(ADDRESS_TYPE, addresses),
        response(AUTHORIZATION_TYPE, authorizations),
    )
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Workload `i` of an `n`-workload cluster as an `Address` resource.
fn xds_workload(i: usize, n: usize) -> Resource {
    let (namespaces, services, policies) = shape(n);
    let j = i % services;
    let ns = namespace_of_service(j, namespaces);
    let selected = (j..policies)
        .step_by(services)
        .map(|k| format!("{ns}/allow-{k}"))
        .collect();
    xds_pod(i, j, &ns, selected)
}

/// Pod `i` backing service `j` in `ns`, with the selector policies istiod says apply.
fn xds_pod(i: usize, j: usize, ns: &str, policies: Vec<String>) -> Resource {
    let uid = format!("Kubernetes//Pod/{ns}/svc-{j}-{i}");
    let w = xds::Workload {
        uid: uid.clone(),
        name: format!("svc-{j}-{i}"),
        namespace: ns.to_owned(),
        addresses: vec![ip_bytes(workload_ip(i))],
        tunnel_protocol: xds::TunnelProtocol::Hbone as i32,
        service_account: format!("sa-{j}"),
        node: format!("node-{}", i % NODES),
        workload_name: format!("svc-{j}"),
        workload_type: xds::WorkloadType::Deployment as i32,
        status: xds::WorkloadStatus::Healthy as i32,
        services: HashMap::from([(
            format!("{ns}/svc-{j}.{ns}.svc.cluster.local"),
            xds::PortList {
                ports: vec![xds::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]),
        authorization_policies: policies,
        ..Default::default()
    };
    Resource {
        version: "1".into(),
        name: uid,
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: xds::Address {
                r#type: Some(xds::address::Type::Workload(w)),
            }
            .encode_to_vec(),
        }),
        aliases: Vec::new(),
    }
}

fn source() -> (IstioSource, watch::Receiver<LocalConfig>) {
    let base = Base {
        node: NODE.into(),
        trust_domain: "cluster.local".into(),
        cluster: "Kubernetes".into(),
    };
    let (tx, rx) = watch::channel(IstioSource::empty(&base));
    let (_results_tx, results) = watch::channel(BTreeMap::new());
    (IstioSource::new(base, tx, results), rx)
}

/// istiod's first push into a ztunnel that holds nothing, then one workload changing in a
/// ztunnel that holds them all (the steady state: a pod starts or stops somewhere).
fn xds_apply(c: &mut Criterion) {
    for n in XDS_SIZES {
        let (addresses, authorizations) = xds_responses(n);
        let mut g = c.benchmark_group("xds_apply");
        g.sample_size(10);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("initial/{n}"), |b| {
            b.iter_batched(
                source,
                |(source, rx)| {
                    assert!(source.apply_xds(&authorizations).is_empty());
                    assert!(source.apply_xds(&addresses).is_empty());
                    (source, rx)
                },
                BatchSize::PerIteration,
            )
        });
        let (source, rx) = source();
        assert!(source.apply_xds(&authorizations).is_empty());
        assert!(source.apply_xds(&addresses).is_empty());
        assert_eq!(rx.borrow().workloads.len(), n);
        g.throughput(Throughput::Elements(1));
        let mut version = 0u64;
        g.bench_function(format!("one_workload/{n}"), |b| {
            b.iter(|| {
                version += 1;
                let mut r = xds_workload((version as usize * 7919) % n, n);
                r.version = version.to_string();
                let resp = DeltaDiscoveryResponse {
                    type_url: ADDRESS_TYPE.into(),
                    resources: vec![r],
                    nonce: version.to_string(),
                    ..Default::default()
                };
                black_box(source.apply_xds(&resp))
            })
        });
        g.finish();
    }

    // Istio's `xds/insert-remove` inserts endpoints of one service one by one; here 4,000
    // workloads of one service, each its own response.
    let mut g = c.benchmark_group("xds_apply");
    g.sample_size(10);
    let n = 4_000;
    let (service, _) = xds_responses(10);
    let one_service: Vec<DeltaDiscoveryResponse> = (0..n)
        .map(|i| {
            let r = xds_pod(i, 0, &namespace_of_service(0, 1), Vec::new());
            DeltaDiscoveryResponse {
                type_url: ADDRESS_TYPE.into(),
                resources: vec![r],
                nonce: i.to_string(),
                ..Default::default()
            }
        })
        .collect();
    g.bench_function("one_service_4000_one_by_one", |b| {
        b.iter_batched(
            || {
                let (source, rx) = source();
                // Service 0 and its 10 workloads, then 4,000 more workloads for it.
                assert!(source.apply_xds(&service).is_empty());
                (source, rx)
            },
            |(source, rx)| {
                for resp in &one_service {
                    source.apply_xds(resp);
                }
                (source, rx)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Live heap at each stage of a 10,000-workload config from xDS, per workload.
fn memory_report() {
    let n = 10_000;
    let (addresses, authorizations) = xds_responses(n);
    let base = LIVE.load(Ordering::Relaxed);
    let (source, rx) = source();
    assert!(source.apply_xds(&authorizations).is_empty());
    assert!(source.apply_xds(&addresses).is_empty());
    let with_config = LIVE.load(Ordering::Relaxed);
    let cfg = rx.borrow().clone();
    let cfg_copy = LIVE.load(Ordering::Relaxed) - with_config;
    let resources = with_config - base - cfg_copy;
    // The config moves into the store: what the heap gains is the indexes.
    let before_store = LIVE.load(Ordering::Relaxed);
    let store = Store::new(cfg);
    let indexes = LIVE.load(Ordering::Relaxed) - before_store;
    println!("memory at {n} workloads from xDS (live heap, per workload):");
    for (what, bytes) in [
        ("xDS resources held by the source", resources),
        ("merged config (one copy)", cfg_copy),
        ("store indexes beyond the config", indexes),
    ] {
        println!(
            "  {what:<34} {:>8.2} MiB  {:>6} B/workload",
            mib(bytes),
            bytes / n as isize
        );
    }
    drop((store, source, rx));
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each benchmark once.
    if std::env::args().any(|a| a == "--bench") {
        memory_report();
    }
    lookups(&mut c);
    load_balance(&mut c);
    xds_apply(&mut c);
    c.final_summary();
}
