//! Data-plane configuration benchmark: `portico-dp`'s memory idle and with
//! 5,000 routes, and how long a route change takes to show in traffic
//! after `apply` returns. Prints a Markdown table; see bench/dp-config.sh.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use portico_integration::dataplane::{free_port, DataPlane};
use portico_integration::upstream::Upstream;
use portico_integration::{wait_for, ControlPlane};
use serde_json::{json, Value};

const APIS: usize = 500;
const ROUTES_PER_API: usize = 10;
const SERVICES: usize = 50;
const CHANGES: usize = 30;

fn state(port: u16, upstream: u16, extra_route: Option<usize>) -> Vec<Value> {
    let mut docs = vec![
        json!({"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": "edge"},
        "spec": {"nodeGroup": "edge", "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}]}}),
    ];
    for s in 0..SERVICES {
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": format!("svc-{s}")},
            "spec": {"endpoints": [{"address": "127.0.0.1", "port": upstream}]}}));
    }
    for a in 0..APIS {
        let mut routes: Vec<Value> = (0..ROUTES_PER_API)
            .map(|r| json!({"name": format!("r{r}"), "match": {"path": format!("/items{r}"), "methods": ["GET", "POST"]},
                            "action": {"service": format!("svc-{}", (a + r) % SERVICES), "timeout": "5s"}}))
            .collect();
        if let (0, Some(i)) = (a, extra_route) {
            routes.push(json!({"name": "new", "match": {"path": format!("/new{i}"), "pathType": "exact"},
                               "action": {"directResponse": {"status": 200, "body": format!("new {i}\n")}}}));
        }
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": format!("api-{a}")},
            "spec": {"version": "v1", "gateways": ["edge"], "hostnames": [format!("api{a}.example.com")],
                     "basePath": format!("/a{a}"), "lifecycle": {"state": "published"}, "routes": routes}}));
    }
    docs
}

/// Status of one GET through the gateway, on a fresh connection.
fn status(port: u16, host: &str, path: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return 0;
    }
    let mut buf = [0u8; 12];
    if s.read_exact(&mut buf).is_err() {
        return 0;
    }
    String::from_utf8_lossy(&buf[9..12]).parse().unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        &[("PORTICO_LOG", "warn,portico_cp::xds=info")],
    );
    let up = Upstream::start("origin");
    let port = free_port();
    let gateway_only = vec![state(port, up.addr.port(), None)[0].clone()];
    let apply = |docs: &[Value]| {
        let r = cp.api(
            "POST",
            "/api/v1/apply",
            Some(&json!({"documents": docs}).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    apply(&gateway_only);
    let dp = DataPlane::start(dir.path(), "bench-dp", &cp.xds_addr, "edge", &[]);
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(dp.pid());

    apply(&state(port, up.addr.port(), None));
    let last_host = format!("api{}.example.com", APIS - 1);
    wait_for(Duration::from_secs(60), || {
        (status(port, &last_host, &format!("/a{}/items9", APIS - 1)) == 200).then_some(())
    })
    .expect("5,000 routes served");
    // Touch every service once so pools and endpoint state exist too.
    for a in 0..SERVICES {
        status(
            port,
            &format!("api{a}.example.com"),
            &format!("/a{a}/items0"),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let loaded = rss_kib(dp.pid());

    let mut visible = Vec::new();
    let mut applies = Vec::new();
    for i in 0..CHANGES {
        let docs = state(port, up.addr.port(), Some(i));
        let t = Instant::now();
        apply(&docs);
        let applied = t.elapsed();
        let t0 = Instant::now();
        // Bounded: give up after 5 s.
        while status(port, "api0.example.com", &format!("/a0/new{i}")) != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "route change {i} not visible after 5 s"
            );
        }
        visible.push(t0.elapsed().as_secs_f64() * 1000.0);
        applies.push(applied.as_secs_f64() * 1000.0);
    }
    for l in dp
        .logs()
        .lines()
        .filter(|l| l.contains("slow configuration update"))
        .take(8)
    {
        eprintln!("{l}");
    }
    let cp_log = std::fs::read_to_string(dir.path().join("cp").join("cp.log")).unwrap_or_default();
    for l in cp_log
        .lines()
        .filter(|l| l.contains("slow xDS rendering"))
        .take(8)
    {
        eprintln!("{l}");
    }
    println!("| portico-dp | idle RSS | RSS with 5,000 routes | route change visible after apply p50 | p99 | max | apply (CLI-side) p50 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| Delta ADS, 2 workers | {:.1} MiB | {:.1} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms |",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        pct(&visible, 0.5),
        pct(&visible, 0.99),
        pct(&visible, 1.0),
        pct(&applies, 0.5)
    );
}
