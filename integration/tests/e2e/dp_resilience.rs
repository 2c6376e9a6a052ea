//! `portico-dp` keeps serving through change and failure: config applied
//! under load, the control plane killed and back, a NACKed update, a
//! removed listener draining, a drain on SIGTERM before exit, and booting
//! from the cached config.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_integration::dataplane::DataPlane;
use portico_integration::upstream::Upstream;
use portico_integration::{wait_for, ControlPlane};
use serde_json::json;

use super::dp_common::{api, apply, gateway, http1, service, Env};

fn routes(n: usize) -> serde_json::Value {
    let mut r: Vec<_> = (0..n).map(|i| json!({"name": format!("r{i}"), "match": {"path": format!("/extra{i}")}, "action": {"service": "s"}})).collect();
    r.push(json!({"name": "main", "match": {"path": "/"}, "action": {"service": "s", "responseHeaders": {"set": {"x-gen": format!("{n}")}}}}));
    json!(r)
}

/// A request for a 1.5 s answer over HTTP/2, read through the GOAWAY a
/// drain sends: (the GOAWAY's last stream, its code, the answer's first
/// header field, the stream its end came on).
fn slow_h2_through_goaway(port: u16) -> (u32, u32, u8, u32) {
    use super::dp_h2_downstream::{fields, first_field, get, Raw, DATA, END_STREAM, GOAWAY};
    let mut c = Raw::connect(port, &[]);
    c.request(1, &fields(&get("/a/slow/1500")), None);
    let g = c.until("GOAWAY", |f| f.kind == GOAWAY);
    let last = u32::from_be_bytes([g.payload[0], g.payload[1], g.payload[2], g.payload[3]]);
    let code = u32::from_be_bytes([g.payload[4], g.payload[5], g.payload[6], g.payload[7]]);
    let h = c.until("the answer", |f| f.kind == super::dp_h2_downstream::HEADERS);
    let end = c.until("its end", |f| f.kind == DATA && f.flags & END_STREAM != 0);
    (last, code, first_field(&h), end.stream)
}

/// Whether connecting to `port` fails within a few seconds (the listener
/// stopped accepting).
fn stops_accepting(port: u16) -> bool {
    wait_for(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    })
    .is_some()
}

/// A gateway with Service `s` on `up` behind Api `a` (`/a`).
fn one_api(up: &Upstream) -> Env {
    Env::new(|_| {
        vec![
            service("s", &[up], json!({})),
            api("a", "/a", &[], routes(0)),
        ]
    })
}

#[test]
fn config_applied_under_load_fails_no_request() {
    let up = Upstream::start("u");
    let env = one_api(&up);
    let _dp = env.dp("dp1", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, port) = (stop.clone(), ok.clone(), failed.clone(), env.port);
            std::thread::spawn(move || {
                let mut last = String::new();
                // Bounded: at most 20,000 requests per worker.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match http1(port, "GET", "/a/x", "gw", &[], "") {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            last = format!("{} {}", r.status, r.body);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            last = e.to_string();
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                last
            })
        })
        .collect();
    // Eight revisions while the load runs: routes added, the matched
    // route's response headers changed, a second service swapped in.
    let up2 = Upstream::start("u2");
    for gen in 1..=8 {
        let mut docs = vec![
            gateway(env.port),
            service("s", &[&up], json!({})),
            api("a", "/a", &[], routes(gen * 10)),
        ];
        if gen % 2 == 0 {
            docs.push(service("s2", &[&up2], json!({})));
        }
        apply(&env.cp, &docs);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .filter(|e| !e.is_empty())
        .collect();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "load ran: {ok} requests");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {errors:?}",
        ok + failed
    );
    let r = http1(env.port, "GET", "/a/x", "gw", &[], "").expect("request");
    assert_eq!(
        r.header("x-gen"),
        Some("80"),
        "the last revision is in effect"
    );
}

#[test]
fn traffic_flows_while_the_control_plane_is_down_and_the_node_reconnects() {
    let up = Upstream::start("u");
    let env = one_api(&up);
    let dp = env.dp("dp1", &[]);
    let xds = env.cp.xds_addr.clone();
    let data_dir = env.cp.data_dir.clone();
    let Env {
        dir: _dir,
        mut cp,
        port,
    } = env;
    cp.kill9();
    wait_for(Duration::from_secs(10), || {
        (dp.stat("control_plane.connected_state") == 0).then_some(())
    })
    .expect("the node notices");
    for _ in 0..50 {
        let r = http1(port, "GET", "/a/x", "gw", &[], "").expect("request");
        assert_eq!(r.status, 200, "last config keeps serving: {r:?}");
    }
    let connects = dp.stat("http.xds_connects");
    let cp = ControlPlane::start_on(&data_dir, &xds);
    wait_for(Duration::from_secs(30), || {
        (dp.stat("control_plane.connected_state") == 1).then_some(())
    })
    .expect("the node reconnects");
    assert!(dp.stat("http.xds_connects") > connects);
    // And takes new config again.
    apply(
        &cp,
        &[
            gateway(port),
            service("s", &[&up], json!({})),
            api("a", "/a", &[], routes(3)),
        ],
    );
    wait_for(Duration::from_secs(10), || {
        (http1(port, "GET", "/a/x", "gw", &[], "")
            .ok()?
            .header("x-gen")?
            == "3")
            .then_some(())
    })
    .expect("new config after the reconnect");
}

#[test]
fn a_nacked_update_keeps_the_old_config_and_shows_in_status() {
    let up = Upstream::start("u");
    let env = one_api(&up);
    let dp = env.dp("dp1", &[]);
    // Upstream TLS is something this data plane does not run yet: the
    // control plane accepts it, the node must refuse it and say why.
    let tls = service(
        "s",
        &[&up],
        json!({"tls": {"sni": "u.internal", "insecureSkipVerify": true}}),
    );
    apply(
        &env.cp,
        &[gateway(env.port), tls, api("a", "/a", &[], routes(0))],
    );
    let out = wait_for(Duration::from_secs(10), || {
        let out = env.cp.run(&["status"]);
        out.stdout.contains("NACK").then_some(out.stdout)
    })
    .unwrap_or_else(|| panic!("status shows no NACK; node log:\n{}", dp.logs()));
    assert!(out.contains("upstream TLS"), "the reason is shown: {out}");
    let r = http1(env.port, "GET", "/a/x", "gw", &[], "").expect("request");
    assert_eq!(r.status, 200, "the old config still serves: {r:?}");
    assert!(dp.stat("http.xds_update_rejected") >= 1);
    let (_, dump) = dp.admin_get("/config_dump");
    assert!(
        dump.contains("upstream TLS"),
        "config_dump shows the rejection"
    );
}

#[test]
fn a_removed_listener_drains_open_requests() {
    let up = Upstream::start("u");
    let env = one_api(&up);
    let _dp = env.dp("dp1", &[]);
    let port = env.port;
    let slow = std::thread::spawn(move || http1(port, "GET", "/a/slow/1500", "gw", &[], ""));
    // The same over HTTP/2: the connection gets a GOAWAY, its open stream
    // still its answer.
    let slow_h2 = std::thread::spawn(move || slow_h2_through_goaway(port));
    std::thread::sleep(Duration::from_millis(300));
    // Move the gateway to another port: the old listener drains.
    let other = portico_integration::dataplane::free_port();
    apply(
        &env.cp,
        &[
            gateway(other),
            service("s", &[&up], json!({})),
            api("a", "/a", &[], routes(0)),
        ],
    );
    wait_for(Duration::from_secs(10), || {
        (http1(other, "GET", "/a/x", "gw", &[], "").ok()?.status == 200).then_some(())
    })
    .expect("new listener serves");
    assert!(stops_accepting(port), "the old listener stops accepting");
    let r = slow
        .join()
        .expect("thread")
        .expect("the open request finishes");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        slow_h2.join().expect("thread"),
        (1, 0, 0x88, 1),
        "GOAWAY(NO_ERROR, last stream 1), then 200 and the body's end on stream 1"
    );
}

/// SIGTERM, as an orchestrator sends before a restart: `/ready` turns 503
/// at once, the listener stops accepting, an idle kept-alive connection
/// closes, open requests on both protocols get their answers (HTTP/1.1
/// with `Connection: close`, HTTP/2 after a GOAWAY), and the process exits
/// cleanly as soon as they are done, well before the drain timeout (5 s).
#[test]
fn sigterm_drains_open_requests_then_exits() {
    use std::io::{Read, Write};
    let up = Upstream::start("u");
    let env = one_api(&up);
    let mut dp = env.dp("dp1", &[]);
    let port = env.port;
    // A kept-alive connection, idle after its first answer.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    idle.write_all(b"GET /a/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = idle.read(&mut buf).expect("read");
        assert!(n > 0, "closed before its answer");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse().ok())
            .expect("content-length");
        if got.len() >= end + 4 + len {
            assert!(text.starts_with("http/1.1 200"), "{text}");
            break;
        }
    }
    let slow = std::thread::spawn(move || http1(port, "GET", "/a/slow/1500", "gw", &[], ""));
    let slow_h2 = std::thread::spawn(move || slow_h2_through_goaway(port));
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    dp.terminate();
    let draining = wait_for(Duration::from_secs(2), || {
        let (status, body) = dp.admin_get("/ready");
        (status == 503).then_some(body)
    });
    assert_eq!(
        draining.as_deref(),
        Some("DRAINING\n"),
        "/ready while draining"
    );
    assert!(stops_accepting(port), "the listener stops accepting");
    assert_eq!(
        idle.read(&mut buf).expect("read"),
        0,
        "the idle connection closes"
    );
    assert!(
        signalled.elapsed() < Duration::from_millis(1000),
        "closed at once, not after the open requests: {:?}",
        signalled.elapsed()
    );
    let r = slow
        .join()
        .expect("thread")
        .expect("the open request finishes");
    assert_eq!(
        (r.status, r.header("connection")),
        (200, Some("close")),
        "{r:?}"
    );
    assert_eq!(
        slow_h2.join().expect("thread"),
        (1, 0, 0x88, 1),
        "GOAWAY(NO_ERROR, last stream 1), then 200 and the body's end on stream 1"
    );
    let status = dp
        .exited_within(Duration::from_secs(10))
        .expect("portico-dp exits after the drain");
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_millis(4500),
        "exits when the open requests are done, not at the drain timeout: {:?}",
        signalled.elapsed()
    );
}

/// Envoy's `POST /drain_listeners`: every listener stops accepting and
/// `/ready` turns 503, while the process (and its admin) keeps running; a
/// GET is refused. A SIGTERM afterwards exits at once, nothing being open.
#[test]
fn drain_listeners_stops_accepting_and_keeps_running() {
    let up = Upstream::start("u");
    let env = one_api(&up);
    let mut dp = env.dp("dp1", &[]);
    let port = env.port;
    assert_eq!(dp.admin_get("/drain_listeners").0, 405, "GET is refused");
    assert_eq!(
        http1(port, "GET", "/a/x", "gw", &[], "")
            .expect("serves")
            .status,
        200
    );
    assert_eq!(dp.admin_post("/drain_listeners"), (200, "OK\n".to_string()));
    assert!(stops_accepting(port), "the listener stops accepting");
    assert_eq!(dp.admin_get("/ready"), (503, "DRAINING\n".to_string()));
    assert!(
        dp.exited_within(Duration::from_millis(500)).is_none(),
        "the process keeps running"
    );
    assert!(
        dp.stat("http.downstream_rq_total") >= 1,
        "the admin still answers"
    );
    let signalled = Instant::now();
    dp.terminate();
    let status = dp
        .exited_within(Duration::from_secs(5))
        .expect("exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
}

#[test]
fn boots_from_the_cached_config_when_the_control_plane_is_unreachable() {
    let up = Upstream::start("u");
    let env = Env::new(|_| {
        vec![
            service("s", &[&up], json!({})),
            api("a", "/a", &[], routes(2)),
        ]
    });
    let cache = env.dir.path().join("dp.cache");
    let cache_arg = cache.display().to_string();
    let dp = env.dp("dp1", &["--config-cache", &cache_arg]);
    wait_for(Duration::from_secs(10), || cache.exists().then_some(())).expect("cache written");
    drop(dp);
    let Env { dir, mut cp, port } = env;
    let xds = cp.xds_addr.clone();
    cp.kill9();
    let started = Instant::now();
    let dp = DataPlane::start(
        dir.path(),
        "dp2",
        &xds,
        "edge",
        &["--config-cache", &cache_arg],
    );
    let r = wait_for(Duration::from_secs(10), || {
        http1(port, "GET", "/a/x", "gw", &[], "")
            .ok()
            .filter(|r| r.status == 200)
    })
    .expect("serves the cached config");
    assert_eq!(r.header("x-gen"), Some("2"));
    assert!(
        dp.logs().contains("cached configuration"),
        "says so in its log"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}
