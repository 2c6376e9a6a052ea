//! Upstream behaviour and bad input: retries, timeouts, resets, health
//! checks, outlier detection, malformed and hostile requests, and the
//! admin endpoints.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use portico_integration::upstream::Upstream;
use portico_integration::{json_log_lines, log_lines, wait_for};
use serde_json::json;

use super::dp_common::{api, http1, parse, raw, service, Env};

/// A GET carrying `x-keep: me`, which the test upstream echoes: whether
/// a retried request's last try still carried the client's headers.
fn get_keeping(port: u16, path: &str) -> super::dp_common::Resp {
    http1(port, "GET", path, "gw", &[("x-keep", "me")], "").expect("request")
}

#[test]
fn retries_timeouts_resets_and_no_healthy_upstream() {
    let up = Upstream::start("u");
    let sick = Upstream::start("sick");
    sick.unhealthy.store(true, Ordering::Relaxed);
    let env = Env::new(|_| {
        vec![
            service("s", &[&up], json!({})),
            service(
                "sick",
                &[&sick],
                json!({"healthCheck": {"path": "/healthz", "interval": "200ms", "unhealthyInterval": "250ms", "timeout": "100ms", "unhealthyThreshold": 1, "healthyThreshold": 1}}),
            ),
            // Failover: the sick endpoint first, the good one behind it.
            service(
                "failover",
                &[],
                json!({"endpoints": [
                    {"address": "127.0.0.1", "port": sick.addr.port()},
                    {"address": "127.0.0.1", "port": up.addr.port(), "priority": 1}
                ], "healthCheck": {"path": "/healthz", "interval": "200ms", "unhealthyInterval": "250ms", "timeout": "100ms", "unhealthyThreshold": 1, "healthyThreshold": 1}}),
            ),
            service(
                "closed",
                &[],
                json!({"endpoints": [{"address": "127.0.0.1", "port": portico_integration::dataplane::free_port()}]}),
            ),
            api(
                "a",
                "/a",
                &[],
                json!([
                    {"name": "retry", "match": {"path": "/flaky"}, "action": {"service": "s", "retries": {"attempts": 2, "on": ["5xx"], "backoff": "5ms"}}},
                    {"name": "noretry", "match": {"path": "/once"}, "action": {"service": "s"}},
                    {"name": "timeout", "match": {"path": "/slow"}, "action": {"service": "s", "timeout": "300ms"}},
                    {"name": "sick", "match": {"path": "/sick"}, "action": {"service": "sick"}},
                    {"name": "failover", "match": {"path": "/failover"}, "action": {"service": "failover"}},
                    {"name": "closed", "match": {"path": "/closed"}, "action": {"service": "closed"}},
                    {"name": "rest", "match": {"path": "/"}, "action": {"service": "s"}}
                ]),
            ),
        ]
    });
    let dp = env.dp("dp1", &[]);
    let get = |p: &str| http1(env.port, "GET", p, "gw", &[], "").expect("request");

    let r = get_keeping(env.port, "/a/flaky/k1/2");
    assert_eq!(r.status, 200, "two 503s retried away: {r:?}");
    assert!(dp.stat("http.upstream_rq_retry") >= 2);
    // The third try carried the request's headers and the proxy's own, as
    // the first did (the tries before the last lend their header map).
    for h in [
        "x-keep: me",
        "host: gw",
        "x-forwarded-for: ",
        "x-request-id: ",
    ] {
        assert!(r.body.contains(h), "{h} on the last try: {}", r.body);
    }
    assert_eq!(
        get("/a/once/flaky/k2/1").status,
        503,
        "without a retry policy the 503 passes through"
    );

    let t = Instant::now();
    let r = get("/a/slow/3000");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the route timeout cut it: {:?}",
        t.elapsed()
    );
    assert!(r.body.contains("upstream request timeout"));

    let r = get("/a/reset");
    assert_eq!(r.status, 502, "upstream reset: {r:?}");

    let r = get("/a/closed");
    assert_eq!(r.status, 503, "connect failure: {r:?}");
    assert!(r.body.contains("connection failure"), "{}", r.body);

    let r = wait_for(Duration::from_secs(10), || {
        Some(get("/a/sick")).filter(|r| r.status == 503)
    })
    .expect("health check marks the endpoint down");
    assert!(r.body.contains("no healthy upstream"), "{}", r.body);
    let (_, clusters) = dp.admin_get("/clusters");
    assert!(clusters.contains("failed_active_hc"), "{clusters}");
    // The Service's second tier takes over while its first is down...
    let served_by = |name: &'static str| {
        move || {
            (0..6)
                .all(|_| get("/a/failover").header("x-upstream") == Some(name))
                .then_some(())
        }
    };
    wait_for(Duration::from_secs(10), served_by("u")).expect("priority 1 takes over");
    assert!(
        clusters.contains(&format!("::127.0.0.1:{}::priority::1", up.addr.port())),
        "{clusters}"
    );
    let (_, dump) = dp.admin_get("/config_dump");
    assert!(
        dump.contains(r#""unhealthy_interval": "0.250s""#),
        "the Service's unhealthyInterval reaches the node: {dump}"
    );
    sick.unhealthy.store(false, Ordering::Relaxed);
    wait_for(Duration::from_secs(10), || {
        (get("/a/sick").status == 200).then_some(())
    })
    .expect("and back up when it passes");
    // ...and hands the traffic back when it recovers.
    wait_for(Duration::from_secs(10), served_by("sick")).expect("priority 0 takes it back");
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint() {
    let good = Upstream::start("good");
    let bad = Upstream::start("bad");
    bad.failing.store(true, Ordering::Relaxed);
    // The default 10% of two endpoints allows none, but a Service always
    // lets one go (the control plane sets `always_eject_one_host`).
    let env = Env::one_route(
        &[&good, &bad],
        json!({"outlierDetection": {"consecutive5xx": 3, "baseEjectionTime": "30s"}}),
    );
    let _dp = env.dp("dp1", &[]);
    let mut fails = 0;
    for _ in 0..20 {
        if http1(env.port, "GET", "/a/x", "gw", &[], "")
            .expect("request")
            .status
            == 500
        {
            fails += 1;
        }
    }
    assert!(
        fails <= 3,
        "after 3 consecutive 5xx the endpoint is ejected; saw {fails} failures"
    );
    for _ in 0..10 {
        let r = http1(env.port, "GET", "/a/x", "gw", &[], "").expect("request");
        assert_eq!(r.header("x-upstream"), Some("good"));
    }
}

#[test]
fn bad_requests_get_clear_answers_and_cost_nothing_else() {
    let up = Upstream::start("u");
    let env = Env::one_route(&[&up], json!({}));
    let dp = env.dp("dp1", &[]);
    let port = env.port;

    // A slow client trickling its headers, opened first and kept going.
    let trickler = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let start = Instant::now();
        let _ = s.write_all(b"GET /a/x HTTP/1.1\r\nHost: gw\r\n");
        // Bounded: at most 30 s of one header byte per second.
        for _ in 0..30 {
            std::thread::sleep(Duration::from_secs(1));
            if s.write_all(b"x").is_err() {
                break;
            }
        }
        let mut buf = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let _ = s.read_to_end(&mut buf);
        (start.elapsed(), String::from_utf8_lossy(&buf).into_owned())
    });

    let r = raw(port, b"GARBAGE\r\n\r\n").expect("answer");
    assert_eq!(r.status, 400, "malformed: {r:?}");
    let big = format!(
        "GET /a/x HTTP/1.1\r\nHost: gw\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let r = raw(port, big.as_bytes()).expect("answer");
    assert_eq!(r.status, 431, "headers too large: {r:?}");
    let smuggle = b"POST /a/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /a/admin HTTP/1.1\r\nHost: gw\r\n\r\n";
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(smuggle).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = parse(&out).expect("answer");
    assert_eq!(
        r.status, 400,
        "both Content-Length and Transfer-Encoding: {r:?}"
    );
    assert!(
        r.body.contains("Content-Length and Transfer-Encoding"),
        "{r:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out).matches("HTTP/1.1 ").count(),
        1,
        "one answer, then the connection closes: {r:?}"
    );
    // The same headers in the other order, behind a good request on the
    // same connection: the first is served, the second refused.
    let pipelined = b"GET /a/x HTTP/1.1\r\nHost: gw\r\n\r\nPOST /a/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n";
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(pipelined).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{out}");

    // Other clients are served all along.
    for _ in 0..20 {
        assert_eq!(
            http1(port, "GET", "/a/x", "gw", &[], "")
                .expect("request")
                .status,
            200
        );
    }
    let (elapsed, answer) = trickler.join().expect("trickler");
    assert!(
        elapsed < Duration::from_secs(15),
        "the header timeout cut the trickler off after {elapsed:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert_eq!(dp.admin_get("/ready").0, 200);
}

#[test]
fn admin_endpoints_and_bootstrap_file() {
    let up = Upstream::start("u");
    let env = Env::one_route(&[&up], json!({}));
    let (host, xport) = env.cp.xds_addr.rsplit_once(':').expect("addr");
    let bootstrap = format!(
        "node: {{id: boot-1, cluster: edge}}\n\
         dynamic_resources:\n  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}\n  cds_config: {{ads: {{}}}}\n  lds_config: {{ads: {{}}}}\n\
         static_resources:\n  clusters:\n  - name: xds\n    type: STATIC\n    load_assignment: {{cluster_name: xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {xport}}}}}}}}}]}}]}}\n"
    );
    let file = super::file(env.dir.path(), "bootstrap.yaml", &bootstrap);
    let dp = portico_integration::dataplane::DataPlane::spawn(
        env.dir.path(),
        "boot",
        &["--bootstrap", &file],
    );
    dp.wait_ready();
    assert_eq!(
        http1(env.port, "GET", "/a/x", "gw", &[], "")
            .expect("request")
            .status,
        200,
        "a SotW node from an Envoy bootstrap serves"
    );
    let (_, stats) = dp.admin_get("/stats");
    assert!(stats.contains("cluster.s.upstream_rq_total: 1"), "{stats}");
    let (_, prom) = dp.admin_get("/stats/prometheus");
    assert!(
        prom.contains("# TYPE envoy_cluster_upstream_rq_total counter\nenvoy_cluster_upstream_rq_total{envoy_cluster_name=\"s\"} 1\n"),
        "{prom}"
    );
    assert!(
        prom.contains("# TYPE envoy_http_downstream_cx_active gauge\n"),
        "{prom}"
    );
    // Envoy's query options: a regex filter, non-zero only, JSON; a bad
    // regex is named in a 400.
    let (_, some) = dp.admin_get("/stats?filter=%5Ecluster%5C.s%5C.upstream_rq_&usedonly");
    // (The one request waited for a connection: a pending request, as
    // in Envoy.)
    assert_eq!(
        some,
        "cluster.s.upstream_rq_total: 1\ncluster.s.upstream_rq_2xx: 1\n\
         cluster.s.upstream_rq_pending_total: 1\n"
    );
    let (_, json) = dp.admin_get("/stats?format=json&filter=upstream_rq_total");
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"stats": [{"name": "cluster.s.upstream_rq_total", "value": 1}]})
    );
    let (status, why) = dp.admin_get("/stats?filter=(");
    assert_eq!(status, 400);
    assert!(why.starts_with("filter: not a valid regex"), "{why}");
    let (_, dump) = dp.admin_get("/config_dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert!(
        dump["configs"].as_array().is_some_and(|c| c.len() == 4),
        "{dump}"
    );
    // Every resource in Envoy's own JSON (proto field names, `@type`s).
    let cluster = &dump["configs"][0]["dynamic_active_clusters"][0]["cluster"];
    assert_eq!(
        cluster["@type"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(cluster["name"], "s", "{cluster}");
    let cla = &dump["configs"][1]["dynamic_endpoint_configs"][0]["endpoint_config"];
    assert_eq!(
        cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"],
        up.addr.port(),
        "{cla}"
    );
    let listener = &dump["configs"][2]["dynamic_listeners"][0]["active_state"]["listener"];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(
        hcm["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "{listener}"
    );
    assert!(
        hcm["http_filters"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{hcm}"
    );
    let routes = &dump["configs"][3]["dynamic_route_configs"][0]["route_config"];
    assert!(
        routes["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == "s",
        "{routes}"
    );
    let (_, clusters) = dp.admin_get("/clusters");
    assert!(
        clusters.contains(&format!("s::{}::health_flags::healthy", up.addr)),
        "{clusters}"
    );
    let nodes = env.cp.api("GET", "/api/v1/nodes", None).body;
    assert!(nodes.contains("boot-1"), "{nodes}");

    // Unknown bootstrap fields are named and stop the start.
    let bad = super::file(
        env.dir.path(),
        "bad.yaml",
        &format!("{bootstrap}tracing: {{}}\n"),
    );
    let out = std::process::Command::new(portico_integration::bin("portico-dp"))
        .args(["--bootstrap", &bad])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported field(s): tracing"), "{err}");
}

#[test]
fn access_log_lines_carry_envoy_fields_route_and_cluster() {
    let up = Upstream::start("u");
    let env = Env::one_route(&[&up], json!({}));
    let log = env.dir.path().join("access.log");
    let log_arg = log.display().to_string();
    let _dp = env.dp("dp1", &["--access-log", &log_arg]);
    let r = http1(
        env.port,
        "GET",
        "/a/x?q=1",
        "gw",
        &[("user-agent", "test-agent"), ("x-request-id", "rid-1")],
        "",
    )
    .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(
        http1(env.port, "GET", "/nope", "gw", &[], "")
            .expect("request")
            .status,
        404
    );
    let lines = wait_for(Duration::from_secs(10), || {
        let lines = json_log_lines(&log)?;
        lines
            .iter()
            .any(|l| l["request_id"] == "rid-1")
            .then_some(lines)
    })
    .expect("access log lines");
    let ok = lines
        .iter()
        .find(|l| l["request_id"] == "rid-1")
        .expect("line");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/a/x?q=1");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["response_code"], 200);
    assert_eq!(ok["user_agent"], "test-agent");
    assert_eq!(ok["upstream_cluster"], "s");
    assert_eq!(ok["route_name"], "a/all");
    assert_eq!(ok["upstream_host"], up.addr.to_string());
    assert!(ok["bytes_sent"].as_u64().is_some_and(|b| b > 0), "{ok}");
    assert!(
        ok["start_time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{ok}"
    );
    wait_for(Duration::from_secs(5), || {
        log_lines(&log)?
            .iter()
            .any(|l| l.contains("\"response_flags\":\"NR\"") && l.contains("\"response_code\":404"))
            .then_some(())
    })
    .expect("the 404 is logged with flag NR");
}

#[test]
fn weights_circuit_breakers_and_http2_upstreams() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let env = Env::new(|_| {
        vec![
            service("a", &[&a], json!({})),
            service("b", &[&b], json!({})),
            service("h2", &[&a], json!({"protocol": "http2"})),
            service(
                "tight",
                &[&a],
                json!({"circuitBreaker": {"maxRequests": 1}}),
            ),
            service("lr", &[&a, &b], json!({"loadBalancing": "least_request"})),
            api(
                "w",
                "/w",
                &[],
                json!([
                    {"name": "split", "match": {"path": "/split"}, "action": {"services": [{"name": "a", "weight": 80}, {"name": "b", "weight": 20}]}},
                    {"name": "h2", "match": {"path": "/h2"}, "action": {"service": "h2"}},
                    {"name": "h2retry", "match": {"path": "/h2r"}, "action": {"service": "h2", "retries": {"attempts": 2, "on": ["5xx"], "backoff": "5ms"}}},
                    {"name": "tight", "match": {"path": "/tight"}, "action": {"service": "tight"}},
                    {"name": "lr", "match": {"path": "/lr"}, "action": {"service": "lr"}}
                ]),
            ),
        ]
    });
    let _dp = env.dp("dp1", &[]);
    let get = |p: &str| http1(env.port, "GET", p, "gw", &[], "").expect("request");

    let mut to_a = 0;
    for _ in 0..200 {
        if get("/w/split").header("x-upstream") == Some("a") {
            to_a += 1;
        }
    }
    assert!(
        (130..=190).contains(&to_a),
        "80/20 split: {to_a} of 200 went to a"
    );

    // The HTTP/1.1 client's request reaches the upstream over HTTP/2.
    let r = get("/w/h2/x");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("GET /w/h2/x\n"), "{}", r.body);
    // Retried over HTTP/2, the last try carries the request's headers too.
    let r = get_keeping(env.port, "/w/h2r/flaky/h2k/2");
    assert_eq!(r.status, 200, "two 503s retried away over HTTP/2: {r:?}");
    assert!(r.body.contains("x-keep: me"), "{}", r.body);

    // max_requests 1: a second request while one is in flight overflows.
    let port = env.port;
    let slow = std::thread::spawn(move || {
        http1(port, "GET", "/w/tight/slow/800", "gw", &[], "").expect("request")
    });
    // Let the slow request take the only slot first.
    std::thread::sleep(Duration::from_millis(300));
    let overflow = wait_for(Duration::from_secs(5), || {
        Some(get("/w/tight/x")).filter(|r| r.status == 503)
    });
    let r = overflow.expect("a 503 while the slow request holds the only slot");
    assert!(r.body.contains("overflow"), "{}", r.body);
    assert_eq!(slow.join().expect("thread").status, 200);

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(get("/w/lr").header("x-upstream").unwrap_or("").to_string());
    }
    assert_eq!(seen.len(), 2, "least request uses both endpoints: {seen:?}");
}
