//! A fleet of simulated data-plane nodes on one control plane: each node
//! has its own HTTP/2 connection and ADS stream (SotW or Delta), follows
//! references like Envoy (CDS and LDS wildcard, then EDS and RDS by name),
//! and ACKs everything. Measures control-plane RSS per connected node,
//! time from an apply touching one route to each node's ACK, and CPU.
//!
//! Usage: xds-fleet NODES sotw|delta   (run via bench/xds-fleet.sh)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use portico_bench::{ms, size, stats};
use portico_integration::xds_client::{channel, node, CLUSTER, ENDPOINT, LISTENER, ROUTE};
use portico_integration::ControlPlane;
use portico_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use portico_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Field 1 of Listener, Cluster, RouteConfiguration and
/// ClusterLoadAssignment is the name: decode only that.
#[derive(Clone, PartialEq, Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

const SERVICES: usize = 20;
const APIS: usize = 20;
const ROUTES: usize = 5;

fn state(timeout: u32) -> Vec<Value> {
    let mut docs = vec![
        json!({"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": "edge"},
        "spec": {"nodeGroup": "edge", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}}),
    ];
    for s in 0..SERVICES {
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": format!("svc{s}")},
            "spec": {"endpoints": [{"address": "127.0.0.1", "port": 9000 + s}]}}));
    }
    for a in 0..APIS {
        let routes: Vec<Value> = (0..ROUTES)
            .map(|r| {
                // Api 0, route 0 carries the timeout the change touches.
                let t = if a == 0 && r == 0 { timeout } else { 5 };
                json!({"match": {"path": format!("/r{r}")}, "action": {"service": format!("svc{}", (a + r) % SERVICES), "timeout": format!("{t}s")}})
            })
            .collect();
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": format!("api{a}")},
            "spec": {"version": "v1", "gateways": ["edge"], "hostnames": [format!("a{a}.example.com")], "basePath": "/",
                     "lifecycle": {"state": "published"}, "routes": routes}}));
    }
    docs
}

#[derive(Default)]
struct Fleet {
    /// Nodes that have their first RouteConfiguration.
    ready: AtomicUsize,
    /// When the change was applied.
    t0: OnceLock<Instant>,
    /// Time from the apply to each node's ACK of the changed routes.
    acks: Mutex<Vec<Duration>>,
}

fn names(resources: &[portico_proto::google::protobuf::Any]) -> Vec<String> {
    resources
        .iter()
        .filter_map(|a| NameOnly::decode(&*a.value).ok().map(|n| n.name))
        .collect()
}

async fn sotw_node(ch: tonic::transport::Channel, id: usize, fleet: Arc<Fleet>) {
    let (tx, rx) = mpsc::channel(8);
    let mut client = AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(64 << 20);
    let send = |req: DiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(req).await.is_ok() }
    };
    send(DiscoveryRequest {
        node: Some(node(&format!("node-{id}"), "edge")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    send(DiscoveryRequest {
        type_url: LISTENER.into(),
        ..Default::default()
    })
    .await;
    let Ok(resp) = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let (mut eds, mut rds): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let mut got_routes = false;
    while let Ok(Some(r)) = inbound.message().await {
        let ack = |names: Vec<String>| DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names,
            ..Default::default()
        };
        match r.type_url.as_str() {
            CLUSTER => {
                send(ack(Vec::new())).await;
                let n = names(&r.resources);
                if n != eds {
                    eds = n;
                    send(DiscoveryRequest {
                        type_url: ENDPOINT.into(),
                        resource_names: eds.clone(),
                        ..Default::default()
                    })
                    .await;
                }
            }
            LISTENER => {
                send(ack(Vec::new())).await;
                let n = names(&r.resources);
                if n != rds {
                    rds = n;
                    send(DiscoveryRequest {
                        type_url: ROUTE.into(),
                        resource_names: rds.clone(),
                        ..Default::default()
                    })
                    .await;
                }
            }
            ENDPOINT => {
                send(ack(eds.clone())).await;
            }
            _ => {
                send(ack(rds.clone())).await;
                record(&fleet, &mut got_routes);
            }
        }
    }
}

async fn delta_node(ch: tonic::transport::Channel, id: usize, fleet: Arc<Fleet>) {
    let (tx, rx) = mpsc::channel(8);
    let mut client = AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(64 << 20);
    let send = |req: DeltaDiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(req).await.is_ok() }
    };
    send(DeltaDiscoveryRequest {
        node: Some(node(&format!("node-{id}"), "edge")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    send(DeltaDiscoveryRequest {
        type_url: LISTENER.into(),
        ..Default::default()
    })
    .await;
    let Ok(resp) = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let mut got_routes = false;
    while let Ok(Some(r)) = inbound.message().await {
        send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
        let added: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
        match r.type_url.as_str() {
            CLUSTER if !added.is_empty() => {
                send(DeltaDiscoveryRequest {
                    type_url: ENDPOINT.into(),
                    resource_names_subscribe: added,
                    ..Default::default()
                })
                .await;
            }
            LISTENER if !added.is_empty() => {
                send(DeltaDiscoveryRequest {
                    type_url: ROUTE.into(),
                    resource_names_subscribe: added,
                    ..Default::default()
                })
                .await;
            }
            ROUTE => record(&fleet, &mut got_routes),
            _ => {}
        }
    }
}

/// The first routes make a node ready; later ones are the change.
fn record(fleet: &Fleet, got_routes: &mut bool) {
    if !*got_routes {
        *got_routes = true;
        fleet.ready.fetch_add(1, Ordering::Relaxed);
    } else if let Some(t0) = fleet.t0.get() {
        fleet.acks.lock().unwrap().push(t0.elapsed());
    }
}

/// RSS in bytes and CPU seconds (user + system) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss_kb * 1024, ticks / 100.0)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let delta = args.get(2).map(|v| v == "delta").unwrap_or(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path());
    let pid = cp.pid();
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(&json!({"documents": state(5)}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(Duration::from_secs(10), || {
        cp.api("GET", "/api/v1/status", None).json()["xdsRevision"] == 1
    });
    let (rss0, cpu0) = usage(pid);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fleet = Arc::new(Fleet::default());
    let started = Instant::now();
    runtime.block_on(async {
        // Connect in waves so the accept queue never overflows.
        for wave in (0..n).collect::<Vec<_>>().chunks(250) {
            let mut handles = Vec::new();
            for &i in wave {
                let addr = cp.xds_addr.clone();
                let fleet = fleet.clone();
                handles.push(tokio::spawn(async move {
                    let ch = channel(&addr).await;
                    tokio::spawn(async move {
                        if delta {
                            delta_node(ch, i, fleet).await
                        } else {
                            sotw_node(ch, i, fleet).await
                        }
                    });
                }));
            }
            for h in handles {
                let _ = h.await;
            }
        }
    });
    let all_ready = wait_until(Duration::from_secs(300), || {
        fleet.ready.load(Ordering::Relaxed) >= n
    });
    let connect_time = started.elapsed();
    // Let allocations settle before reading the idle footprint.
    std::thread::sleep(Duration::from_secs(2));
    let (rss1, cpu1) = usage(pid);

    // The change: one route's timeout.
    let _ = fleet.t0.set(Instant::now());
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(&json!({"documents": state(7)}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let all_acked = wait_until(Duration::from_secs(120), || {
        fleet.acks.lock().unwrap().len() >= n
    });
    let (rss2, cpu2) = usage(pid);
    let mut acks = fleet.acks.lock().unwrap().clone();
    let got = acks.len();
    let s = stats(&mut acks);
    let p99 = acks[((acks.len() - 1) as f64 * 0.99).round() as usize];
    let mode = if delta { "Delta" } else { "SotW" };
    println!(
        "| {mode} | {n} | {} | {} | {:.1} KiB | {} | {} | {} | {} | {:.2} s | {:.2} s |",
        if all_ready {
            "all".to_string()
        } else {
            format!("{} only", fleet.ready.load(Ordering::Relaxed))
        },
        size(rss1),
        (rss1.saturating_sub(rss0)) as f64 / 1024.0 / n as f64,
        if all_acked {
            format!("{got}")
        } else {
            format!("{got} of {n}")
        },
        ms(s.p50),
        ms(p99),
        ms(s.max),
        cpu1 - cpu0,
        cpu2 - cpu1,
    );
    eprintln!(
        "connect+initial config: {connect_time:?}; RSS before {} after {} after change {}",
        size(rss0),
        size(rss1),
        size(rss2)
    );
    // A graceful stop lets a profiler wrapped around the control plane
    // (PORTICO_CP_WRAPPER) write its report.
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    wait_until(Duration::from_secs(30), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    runtime.shutdown_background();
}
