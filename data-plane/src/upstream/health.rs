//! Active HTTP health checks: one task per cluster, which ends when the
//! cluster is dropped or retired (it holds only a weak reference), and
//! under it one task per endpoint, each on its own schedule (Envoy's
//! intervals depend on the endpoint's state and its last check).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::Request;

use super::{Cluster, Endpoint};
use crate::config::cluster::HealthCheckConfig;

/// Starts checking the cluster's endpoints: each endpoint's first check
/// runs at once (or within `initial_jitter`), an endpoint added later too
/// (each new endpoint set wakes this task; it also looks every
/// `interval`, at most a second).
pub fn spawn(cluster: Weak<Cluster>, cfg: HealthCheckConfig) {
    let cfg = Arc::new(cfg);
    let look = cfg.interval.min(Duration::from_secs(1));
    tokio::spawn(async move {
        // Each endpoint's checker, by the endpoint's address in memory
        // (endpoints are kept across updates while their address, weight,
        // names and check settings stay, whatever their priority, so a
        // kept endpoint keeps its schedule). Dropping
        // the set when the cluster goes stops them all.
        let mut checkers = tokio::task::JoinSet::new();
        let mut running: HashMap<usize, tokio::task::AbortHandle> = HashMap::new();
        let mut seen: Option<Arc<super::EndpointSet>> = None;
        let Some(changed) = cluster.upgrade().map(|c| c.endpoints_changed.clone()) else {
            return;
        };
        loop {
            let Some(c) = super::live(&cluster) else {
                return;
            };
            let set = c.endpoints.load_full();
            drop(c);
            if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &set)) {
                let now: HashMap<usize, &Arc<Endpoint>> = set
                    .endpoints
                    .iter()
                    .map(|e| (Arc::as_ptr(e) as usize, e))
                    .collect();
                running.retain(|k, task| {
                    let keep = now.contains_key(k);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                // (Not those whose checks are turned off: healthy as far
                // as checks go.)
                for (k, e) in now
                    .into_iter()
                    .filter(|(_, e)| !e.check.as_ref().is_some_and(|c| c.disabled))
                {
                    running.entry(k).or_insert_with(|| {
                        checkers.spawn(check_endpoint(cluster.clone(), e.clone(), cfg.clone()))
                    });
                }
                seen = Some(set);
            }
            // Reap the aborted ones (the set holds each until reaped).
            while let Some(ended) = checkers.try_join_next() {
                if let Err(e) = ended {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a health checker failed; its endpoint is no longer checked");
                    }
                }
            }
            // Until the next look, or a new endpoint set (its new
            // endpoints are checked at once).
            let _ = tokio::time::timeout(look, changed.notified()).await;
        }
    });
}

/// Checks one endpoint until its cluster is gone (or the cluster's task
/// stops it), waiting between checks as `next_wait` says.
async fn check_endpoint(cluster: Weak<Cluster>, e: Arc<Endpoint>, cfg: Arc<HealthCheckConfig>) {
    tokio::time::sleep(jitter(cfg.initial_jitter)).await;
    loop {
        let (outcome, degraded) = check_one(e.clone(), &cfg).await;
        let Some(c) = super::live(&cluster) else {
            return;
        };
        let change = record(&c, &e, outcome, &cfg);
        // Envoy's active degraded flag: set or cleared by each passing
        // check, at once (no threshold).
        if outcome == Outcome::Pass && e.hc_degraded.swap(degraded, Relaxed) != degraded {
            tracing::info!(cluster = %c.config.name, endpoint = %e.addr, degraded, "health check changed whether endpoint is degraded");
            c.degraded_changed();
        }
        // Envoy's `successful_active_health_check_uneject_host`: a check
        // that passes, leaving the endpoint healthy, ends an outlier
        // ejection.
        if outcome == Outcome::Pass
            && e.hc_healthy.load(Relaxed)
            && c.config
                .outlier
                .as_ref()
                .is_some_and(|o| o.health_check_unejects)
            && e.uneject()
        {
            c.availability_changed();
        }
        drop(c);
        tokio::time::sleep(next_wait(&cfg, outcome == Outcome::Pass, change)).await;
    }
}

/// A random wait of up to `max` (none when zero).
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(fastrand::f64())
}

/// What a check did to its endpoint's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The check agreed with the state.
    None,
    /// It disagreed, but the threshold to change is not reached yet.
    Pending,
    /// It changed the state.
    Changed,
}

/// The wait before an endpoint's next check, as Envoy computes it: after
/// a pass `healthy_edge_interval` while a change to healthy is pending,
/// otherwise `interval`; after a failure `unhealthy_edge_interval` while a
/// change to unhealthy is pending, otherwise `unhealthy_interval`; then
/// the jitters added.
fn next_wait(cfg: &HealthCheckConfig, passed: bool, change: Change) -> Duration {
    let base = match (passed, change == Change::Pending) {
        (true, true) => cfg.healthy_edge_interval,
        (true, false) => cfg.interval,
        (false, true) => cfg.unhealthy_edge_interval,
        (false, false) => cfg.unhealthy_interval,
    };
    // Saturating: the config's durations are not capped (Envoy does not
    // cap them either), and a wait of centuries is still a wait.
    let percent = Duration::try_from_secs_f64(
        base.as_secs_f64() * f64::from(cfg.interval_jitter_percent) / 100.0,
    )
    .unwrap_or(Duration::MAX);
    base.saturating_add(jitter(percent))
        .saturating_add(jitter(cfg.interval_jitter))
}

/// How one check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// An expected status.
    Pass,
    /// A status in `retriable_statuses`: counts toward the threshold.
    Retriable,
    /// Any other status: unhealthy at once (Envoy's rule).
    Fail,
    /// No connection or no answer in time: counts toward the threshold.
    NoAnswer,
}

/// The check request: the method, the path and host (as `:authority` over
/// HTTP/2; the endpoint's own, else the cluster's), then the configured
/// header edits.
fn request(
    cfg: &HealthCheckConfig,
    host: Option<&str>,
) -> Option<Request<crate::upstream::pool::ReqBody>> {
    let host = host.unwrap_or(&cfg.host);
    let uri = if cfg.http2 {
        format!("http://{host}{}", cfg.path)
    } else {
        cfg.path.clone()
    };
    let mut b = Request::builder()
        .method(cfg.method.clone())
        .uri(uri)
        .header(http::header::USER_AGENT, "portico-dp-health-check");
    if cfg.http2 {
        b = b.version(http::Version::HTTP_2);
    } else {
        b = b
            .header(http::header::HOST, host)
            .header(http::header::CONNECTION, "close");
    }
    let mut req = b.body(Either::Right(Full::new(Bytes::new()))).ok()?;
    cfg.edits.apply_request(req.headers_mut(), None);
    Some(req)
}

/// Checks `e` once: how it went, and whether the answer said the endpoint
/// is degraded (`x-envoy-degraded`, Envoy's).
async fn check_one(e: Arc<Endpoint>, cfg: &HealthCheckConfig) -> (Outcome, bool) {
    let own = e.check.as_deref();
    let Some(req) = request(cfg, own.and_then(|c| c.host.as_deref())) else {
        // Not an answer from the endpoint (the config is checked for this
        // at conversion).
        return (Outcome::NoAnswer, false);
    };
    // The endpoint's own check address, else its address.
    let target = own.map_or(e.addr, |c| c.target(e.addr));
    let fut = async {
        let resp = if cfg.http2 {
            let mut tx = e.pool.connect_h2_at(target).await.ok()?;
            tx.ready().await.ok()?;
            tx.send_request(req).await.ok()?
        } else {
            let mut tx = e.pool.connect_h1_at(target).await.ok()?;
            tx.send_request(req).await.ok()?
        };
        let degraded = resp.headers().contains_key("x-envoy-degraded");
        Some((resp.status().as_u16(), degraded))
    };
    let within = |ranges: &[(u16, u16)], s: u16| ranges.iter().any(|(lo, hi)| s >= *lo && s < *hi);
    match tokio::time::timeout(cfg.timeout, fut).await {
        Ok(Some((s, degraded))) if within(&cfg.expected, s) => (Outcome::Pass, degraded),
        Ok(Some((s, _))) if within(&cfg.retriable, s) => (Outcome::Retriable, false),
        Ok(Some(_)) => (Outcome::Fail, false),
        _ => (Outcome::NoAnswer, false),
    }
}

/// Counts a check toward its endpoint's state and says what it did.
fn record(c: &Cluster, e: &Endpoint, outcome: Outcome, cfg: &HealthCheckConfig) -> Change {
    let ok = outcome == Outcome::Pass;
    let healthy = e.hc_healthy.load(Relaxed);
    // An endpoint's first check after it was added decides alone (and,
    // either way, ends its exclusion from panic).
    let first = e.hc_first.swap(false, Relaxed);
    if first && e.hc_excluded.swap(false, Relaxed) {
        // It counts in its level again (panic, bounded loads).
        c.availability_changed();
    }
    if ok == healthy {
        e.hc_streak.store(0, Relaxed);
        return Change::None;
    }
    let streak = e.hc_streak.fetch_add(1, Relaxed) + 1;
    let needed = match outcome {
        _ if first => 1,
        Outcome::Pass => cfg.healthy_threshold,
        Outcome::Fail => 1,
        Outcome::Retriable | Outcome::NoAnswer => cfg.unhealthy_threshold,
    };
    if streak >= needed {
        e.hc_healthy.store(ok, Relaxed);
        e.hc_streak.store(0, Relaxed);
        c.availability_changed();
        if ok {
            // Back: it ramps up again (with a slow start configured).
            c.start_slow(e, super::now_ms());
        }
        c.stats.health_flaps.fetch_add(1, Relaxed);
        if !ok {
            c.drop_removed(e);
        }
        tracing::info!(cluster = %c.config.name, endpoint = %e.addr, healthy = ok, "health check changed endpoint state");
        Change::Changed
    } else {
        Change::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::ClusterConfig;
    use portico_proto::envoy::config::cluster::v3::{
        cluster::{ClusterDiscoveryType, DiscoveryType},
        Cluster as PbCluster,
    };
    use portico_proto::envoy::config::core::v3::{
        health_check::{HealthChecker, HttpHealthCheck},
        HeaderValue as PbHeaderValue, HeaderValueOption, HealthCheck, RequestMethod,
    };

    fn config(h: HttpHealthCheck) -> Result<HealthCheckConfig, String> {
        config_with(h, |_| {})
    }

    fn ms(n: u32) -> Option<portico_proto::google::protobuf::Duration> {
        Some(portico_proto::google::protobuf::Duration {
            seconds: i64::from(n / 1000),
            nanos: (n % 1000) as i32 * 1_000_000,
        })
    }

    /// A health check of `h`, every second with a second to answer, then
    /// `edit` applied to the check's other fields.
    fn config_with(
        h: HttpHealthCheck,
        edit: impl FnOnce(&mut HealthCheck),
    ) -> Result<HealthCheckConfig, String> {
        let mut hc = HealthCheck {
            interval: ms(1000),
            timeout: ms(1000),
            health_checker: Some(HealthChecker::HttpHealthCheck(h)),
            ..Default::default()
        };
        edit(&mut hc);
        ClusterConfig::convert(&PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            health_checks: vec![hc],
            ..Default::default()
        })
        .map(|c| c.health_check.expect("a health check"))
        .map_err(|e| e.to_string())
    }

    fn path(p: &str) -> HttpHealthCheck {
        HttpHealthCheck {
            path: p.into(),
            ..Default::default()
        }
    }

    /// Envoy's waits: by the check's result and whether a change of state
    /// is pending, each interval defaulting to the one Envoy names.
    #[test]
    fn waits_follow_the_state_and_the_last_check() {
        let d = Duration::from_millis;
        let plain = config(path("/h")).expect("converts");
        assert_eq!(
            (
                plain.unhealthy_interval,
                plain.unhealthy_edge_interval,
                plain.healthy_edge_interval
            ),
            (d(1000), d(1000), d(1000)),
            "every interval defaults to `interval`"
        );
        let only_unhealthy =
            config_with(path("/h"), |hc| hc.unhealthy_interval = ms(3000)).expect("converts");
        assert_eq!(
            only_unhealthy.unhealthy_edge_interval,
            d(3000),
            "the unhealthy edge defaults to the unhealthy interval"
        );
        let cfg = config_with(path("/h"), |hc| {
            hc.unhealthy_interval = ms(3000);
            hc.unhealthy_edge_interval = ms(200);
            hc.healthy_edge_interval = ms(100);
        })
        .expect("converts");
        for (passed, change, want) in [
            (true, Change::None, 1000),
            (true, Change::Changed, 1000),
            (true, Change::Pending, 100),
            (false, Change::None, 3000),
            (false, Change::Changed, 3000),
            (false, Change::Pending, 200),
        ] {
            assert_eq!(
                next_wait(&cfg, passed, change),
                d(want),
                "{passed} {change:?}"
            );
        }
        let jittery = config_with(path("/h"), |hc| {
            hc.interval_jitter = ms(100);
            hc.interval_jitter_percent = 50;
        })
        .expect("converts");
        let waits: Vec<Duration> = (0..200)
            .map(|_| next_wait(&jittery, true, Change::None))
            .collect();
        assert!(
            waits.iter().all(|w| *w >= d(1000) && *w < d(1600)),
            "{waits:?}"
        );
        assert!(
            waits.iter().any(|w| *w > d(1100)),
            "the percentage adds too"
        );
        let err =
            config_with(path("/h"), |hc| hc.unhealthy_interval = ms(0)).expect_err("zero refused");
        assert!(
            err.contains("unhealthy_interval must be > 0") && err.contains("health_checks[0]"),
            "{err}"
        );
    }

    /// A health-check target on a real socket answering every check with
    /// `answer`; counts the checks.
    async fn check_target(
        answer: &'static [u8],
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        check_target_with(move || answer).await
    }

    /// As [`check_target`], answering what `answer` says at the time.
    async fn check_target_with(
        answer: impl Fn() -> &'static [u8] + Clone + Send + 'static,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        use std::sync::atomic::AtomicU32;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let checks = Arc::new(AtomicU32::new(0));
        let counted = checks.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = counted.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    counted.fetch_add(1, Relaxed);
                    let _ = s.write_all(answer()).await;
                });
            }
        });
        (addr, checks)
    }

    /// A check target's answers: passing, and failing.
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    const BAD: &[u8] =
        b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    /// An origin that accepts connections and never answers (a first
    /// check to it stays pending).
    async fn silent_origin() -> std::net::SocketAddr {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        addr
    }

    /// A cluster of the one endpoint at `addr`, checked every 20 ms, its
    /// health checks running.
    fn checked_cluster(
        addr: std::net::SocketAddr,
        edit: impl FnOnce(&mut PbCluster),
    ) -> Arc<Cluster> {
        let mut pb = PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            health_checks: vec![HealthCheck {
                interval: ms(20),
                timeout: ms(2000),
                health_checker: Some(HealthChecker::HttpHealthCheck(path("/h"))),
                ..Default::default()
            }],
            ..Default::default()
        };
        edit(&mut pb);
        let cfg = ClusterConfig::convert(&pb).expect("converts");
        let hc = cfg.health_check.clone().expect("a health check");
        let c = Cluster::new(
            Arc::new(cfg),
            Arc::new(crate::stats::ClusterStats::default()),
        );
        c.set_endpoints(
            &[crate::config::cluster::EndpointSpec::at(addr)],
            crate::config::cluster::LoadPolicy::default(),
        );
        spawn(Arc::downgrade(&c), hc);
        c
    }

    /// Through real sockets: an endpoint added to a health-checked
    /// cluster is out of play until its first check, which runs at once
    /// (not at the checker's next look, a second here) and decides alone
    /// (a healthy threshold of 3 notwithstanding); the cluster's first
    /// endpoints take traffic from the start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_added_endpoint_waits_for_its_first_check() {
        let (first, _) = check_target(OK).await;
        let (added, checks) = check_target(OK).await;
        let c = checked_cluster(first, |pb| {
            pb.health_checks[0].interval = ms(10_000);
            pb.health_checks[0].healthy_threshold =
                Some(portico_proto::google::protobuf::UInt32Value { value: 3 });
        });
        let e = c.endpoints.load_full().endpoints[0].clone();
        assert!(
            e.available(crate::upstream::now_ms()),
            "a first endpoint is in play"
        );
        let specs = [
            crate::config::cluster::EndpointSpec::at(first),
            crate::config::cluster::EndpointSpec::at(added),
        ];
        c.set_endpoints(&specs, crate::config::cluster::LoadPolicy::default());
        let new = c.endpoints.load_full().endpoints[1].clone();
        assert_eq!(new.addr, added);
        assert!(!new.hc_healthy.load(Relaxed), "out of play until checked");
        let started = std::time::Instant::now();
        while !new.hc_healthy.load(Relaxed) {
            assert!(started.elapsed() < Duration::from_secs(5), "never checked");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(checks.load(Relaxed), 1, "one passing check was enough");
    }

    /// Through real sockets: an endpoint's own `health_check_config` sends
    /// its checks to another port (the endpoint's own address fails them,
    /// and is never asked), and one with checks turned off is not checked
    /// and stays healthy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_are_checked_where_they_say() {
        use crate::config::cluster::{EndpointCheck, EndpointSpec, LoadPolicy};
        let (serving, asked_serving) = check_target(BAD).await;
        let (admin, asked_admin) = check_target(OK).await;
        let (quiet, asked_quiet) = check_target(BAD).await;
        let c = checked_cluster(serving, |_| {});
        let own = |port: Option<u16>, disabled: bool| {
            Some(Arc::new(EndpointCheck {
                address: None,
                port,
                host: None,
                disabled,
            }))
        };
        let specs = [
            EndpointSpec {
                check: own(Some(admin.port()), false),
                ..EndpointSpec::at(serving)
            },
            EndpointSpec {
                check: own(None, true),
                ..EndpointSpec::at(quiet)
            },
        ];
        c.set_endpoints(&specs, LoadPolicy::default());
        let set = c.endpoints.load_full();
        let started = std::time::Instant::now();
        while asked_admin.load(Relaxed) < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "not checked there"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let now = crate::upstream::now_ms();
        assert!(set.endpoints[0].available(now), "healthy by its check port");
        assert!(set.endpoints[1].available(now), "not checked: healthy");
        // (The first endpoint's checker, before its own settings came,
        // may have asked its address once.)
        assert!(asked_serving.load(Relaxed) <= 1);
        assert_eq!(asked_quiet.load(Relaxed), 0);
    }

    /// Through real sockets: Envoy's default for a health-checked cluster:
    /// an endpoint the control plane removes stays, flagged, while it
    /// passes its checks and goes when it fails one; one the control plane
    /// names again is no longer flagged. With
    /// `ignore_health_on_host_removal`, it goes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removed_endpoints_stay_while_their_checks_pass() {
        use crate::config::cluster::{EndpointSpec, LoadPolicy};
        use std::sync::atomic::AtomicBool;
        let failing = Arc::new(AtomicBool::new(false));
        let f = failing.clone();
        let (leaving, _) = check_target_with(move || if f.load(Relaxed) { BAD } else { OK }).await;
        let (staying, _) = check_target(OK).await;
        let wait_until = |what: &str, done: &dyn Fn() -> bool| {
            let started = std::time::Instant::now();
            while !done() {
                assert!(started.elapsed() < Duration::from_secs(5), "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        for ignore in [false, true] {
            failing.store(false, Relaxed);
            let c = checked_cluster(staying, |pb| pb.ignore_health_on_host_removal = ignore);
            let both = [EndpointSpec::at(staying), EndpointSpec::at(leaving)];
            c.set_endpoints(&both, LoadPolicy::default());
            let addrs = || -> Vec<_> {
                c.endpoints
                    .load()
                    .endpoints
                    .iter()
                    .map(|e| e.addr)
                    .collect()
            };
            let now = crate::upstream::now_ms;
            wait_until("both checked healthy", &|| {
                c.endpoints
                    .load()
                    .endpoints
                    .iter()
                    .all(|e| e.available(now()))
            });
            c.set_endpoints(&[EndpointSpec::at(staying)], LoadPolicy::default());
            if ignore {
                assert_eq!(addrs(), [staying], "gone at once");
                continue;
            }
            assert_eq!(addrs(), [staying, leaving], "kept while it passes");
            let flags = c.endpoints.load().endpoints[1].health_flags();
            assert_eq!(flags, "/pending_dynamic_removal");
            // Named again: an endpoint like any other.
            c.set_endpoints(&both, LoadPolicy::default());
            assert_eq!(c.endpoints.load().endpoints[1].health_flags(), "healthy");
            // Removed again, then failing its check: gone.
            c.set_endpoints(&[EndpointSpec::at(staying)], LoadPolicy::default());
            assert_eq!(addrs(), [staying, leaving]);
            failing.store(true, Relaxed);
            wait_until("gone after a failed check", &|| addrs() == [staying]);
        }
    }

    /// Through real sockets: an endpoint kept out until its first check
    /// counts nowhere (Envoy's excluded hosts): one healthy and one
    /// failing endpoint are half available, not in panic (Envoy's 50%),
    /// and an unchecked third does not tip them into it (a third would
    /// put the failing one in play). A weight change keeps what checks
    /// said of an endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn excluded_endpoints_count_nowhere() {
        use crate::config::cluster::{EndpointSpec, LoadPolicy};
        use portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig;
        let (good, _) = check_target(OK).await;
        let (failing, _) = check_target(BAD).await;
        let mute = silent_origin().await;
        let c = checked_cluster(good, |pb| {
            pb.health_checks[0].timeout = ms(30_000);
            pb.common_lb_config = Some(CommonLbConfig {
                ignore_new_hosts_until_first_hc: true,
                ..Default::default()
            });
        });
        c.set_endpoints(
            &[EndpointSpec::at(good), EndpointSpec::at(failing)],
            LoadPolicy::default(),
        );
        let started = std::time::Instant::now();
        while c.endpoints.load().endpoints[1].hc_healthy.load(Relaxed) {
            assert!(started.elapsed() < Duration::from_secs(5), "never failed");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.set_endpoints(
            &[
                EndpointSpec::at(good),
                EndpointSpec::at(failing),
                EndpointSpec::at(mute),
            ],
            LoadPolicy::default(),
        );
        assert!(c.endpoints.load().endpoints[2].hc_excluded.load(Relaxed));
        for _ in 0..60 {
            assert_eq!(c.pick(None, None).expect("a pick").addr, good, "no panic");
        }
        // Its weight changes: made anew, still failed by its checks.
        c.set_endpoints(
            &[
                EndpointSpec::at(good),
                EndpointSpec {
                    weight: 5,
                    ..EndpointSpec::at(failing)
                },
                EndpointSpec::at(mute),
            ],
            LoadPolicy::default(),
        );
        let e = c.endpoints.load().endpoints[1].clone();
        assert_eq!((e.weight, e.hc_healthy.load(Relaxed)), (5, false));
    }

    /// Through real sockets: with `ignore_new_hosts_until_first_hc`, an
    /// added endpoint awaiting its first check is kept out even in panic
    /// (a threshold of 100 puts every other endpoint in play); without
    /// it, panic mode takes it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignore_new_hosts_keeps_unchecked_endpoints_out_of_panic() {
        use portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig;
        let (first, _) = check_target(OK).await;
        // Accepts and never answers: the first check stays pending.
        let mute = silent_origin().await;
        for ignore in [true, false] {
            let c = checked_cluster(first, |pb| {
                pb.health_checks[0].timeout = ms(30_000);
                pb.common_lb_config = Some(CommonLbConfig {
                    healthy_panic_threshold: Some(portico_proto::envoy::r#type::v3::Percent {
                        value: 100.0,
                    }),
                    ignore_new_hosts_until_first_hc: ignore,
                    ..Default::default()
                });
            });
            let specs = [
                crate::config::cluster::EndpointSpec::at(first),
                crate::config::cluster::EndpointSpec::at(mute),
            ];
            c.set_endpoints(&specs, crate::config::cluster::LoadPolicy::default());
            let picked: std::collections::HashSet<_> = (0..60)
                .map(|_| c.pick(None, None).expect("a pick").addr)
                .collect();
            assert_eq!(
                picked.contains(&mute),
                !ignore,
                "ignore {ignore}: {picked:?}"
            );
            let flags = c.endpoints.load().endpoints[1].health_flags();
            assert_eq!(flags.contains("/pending_active_hc"), ignore, "{flags}");
        }
    }

    /// Through real sockets: a passing check that answers with
    /// `x-envoy-degraded` makes its endpoint degraded (Envoy's active
    /// flag), which takes traffic only when no healthy endpoint can; the
    /// next passing check without it makes the endpoint healthy again.
    // (Multi-threaded: the waits below block their thread.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_answered_degraded_makes_its_endpoint_degraded() {
        use std::sync::atomic::AtomicBool;
        const DEGRADED: &[u8] = b"HTTP/1.1 200 OK\r\nx-envoy-degraded: true\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let flag = Arc::new(AtomicBool::new(true));
        let said = flag.clone();
        let (sick, _) =
            check_target_with(move || if said.load(Relaxed) { DEGRADED } else { OK }).await;
        // Three healthy of four carry it all (75% × the overprovisioning
        // factor 1.4 is over 100%).
        let mut fine = Vec::new();
        for _ in 0..3 {
            fine.push(check_target(OK).await.0);
        }
        let c = checked_cluster(sick, |_| {});
        let specs: Vec<_> = std::iter::once(sick)
            .chain(fine.iter().copied())
            .map(crate::config::cluster::EndpointSpec::at)
            .collect();
        c.set_endpoints(&specs, crate::config::cluster::LoadPolicy::default());
        let until = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !f() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let set = c.endpoints.load_full();
        let e = set.endpoints[0].clone();
        assert_eq!(e.addr, sick);
        until("never degraded", &|| e.degraded());
        // (The three added ones wait for their first check.)
        until("the others never checked", &|| {
            set.endpoints[1..]
                .iter()
                .all(|o| o.hc_healthy.load(Relaxed))
        });
        assert_eq!(e.health_flags(), "/degraded_active_hc");
        assert!(e.hc_healthy.load(Relaxed), "degraded is not unhealthy");
        for _ in 0..50 {
            assert_ne!(c.pick(None, None).expect("a pick").addr, sick);
        }
        flag.store(false, Relaxed);
        until("never healthy again", &|| !e.degraded());
        assert_eq!(e.health_flags(), "healthy");
        let picked: std::collections::HashSet<_> = (0..50)
            .map(|_| c.pick(None, None).expect("a pick").addr)
            .collect();
        assert!(picked.contains(&sick), "it takes traffic again");
    }

    /// Through a real socket: an endpoint that fails its check is checked
    /// again only after `unhealthy_interval`, not every `interval`.
    #[tokio::test]
    async fn an_unhealthy_endpoint_is_checked_at_the_unhealthy_interval() {
        let (addr, checks) = check_target(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let c = checked_cluster(addr, |pb| {
            pb.health_checks[0].unhealthy_interval = ms(60_000)
        });
        let e = c.endpoints.load_full().endpoints[0].clone();
        // A 503 is not a retriable status: one makes the endpoint unhealthy.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.hc_healthy.load(Relaxed) {
            assert!(
                std::time::Instant::now() < deadline,
                "never marked unhealthy"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Every 20 ms that would be a dozen more checks by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            checks.load(Relaxed),
            1,
            "checked again before unhealthy_interval"
        );

        // Once the cluster no longer has it, its checker stops and lets
        // it go (the test's clone is then the last).
        c.set_endpoints(&[], crate::config::cluster::LoadPolicy::default());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&e) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the checker outlived its endpoint"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Through a real socket: a passing check ends an outlier ejection
    /// (Envoy's `successful_active_health_check_uneject_host`), unless the
    /// cluster says not to.
    #[tokio::test]
    async fn a_passing_check_ends_an_ejection_unless_told_not_to() {
        use portico_proto::envoy::config::cluster::v3::OutlierDetection;
        let (addr, checks) = check_target(OK).await;
        for unejects in [true, false] {
            let c = checked_cluster(addr, |pb| {
                pb.outlier_detection = Some(OutlierDetection {
                    successful_active_health_check_uneject_host: Some(
                        portico_proto::google::protobuf::BoolValue { value: unejects },
                    ),
                    ..Default::default()
                })
            });
            let e = c.endpoints.load_full().endpoints[0].clone();
            e.ejected_until
                .store(super::super::now_ms() + 600_000, Relaxed);
            let before = checks.load(Relaxed);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            // Until it is back, or (told not to) until several checks
            // passed without bringing it back.
            while !e.available(super::super::now_ms())
                && (unejects || checks.load(Relaxed) < before + 5)
            {
                assert!(std::time::Instant::now() < deadline, "no checks passed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(e.available(super::super::now_ms()), unejects);
        }
    }

    #[test]
    fn check_requests_follow_the_config() {
        let add = |k: &str, v: &str| HeaderValueOption {
            header: Some(PbHeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cfg = config(HttpHealthCheck {
            path: "/ready".into(),
            host: "svc.internal".into(),
            method: RequestMethod::Head as i32,
            codec_client_type: 1,
            request_headers_to_add: vec![add("x-hc", "100%%")],
            request_headers_to_remove: vec!["user-agent".into()],
            ..Default::default()
        })
        .expect("converts");
        let req = request(&cfg, None).expect("a request");
        assert_eq!(req.method(), http::Method::HEAD);
        assert_eq!(req.version(), http::Version::HTTP_2);
        assert_eq!(req.uri().to_string(), "http://svc.internal/ready");
        assert_eq!(req.headers()["x-hc"], "100%");
        assert!(!req.headers().contains_key("user-agent"));
        assert!(!req.headers().contains_key("host"), "HTTP/2: the authority");

        let h1 = config(path("/h")).expect("converts");
        let req = request(&h1, None).expect("a request");
        assert_eq!((req.method(), req.uri().path()), (&http::Method::GET, "/h"));
        assert_eq!(req.headers()["host"], "c", "the cluster's name by default");
        // An endpoint's own host name for checks wins.
        let req = request(&h1, Some("ep.internal")).expect("a request");
        assert_eq!(req.headers()["host"], "ep.internal");
        let req = request(&cfg, Some("ep.internal")).expect("a request");
        assert_eq!(req.uri().to_string(), "http://ep.internal/ready");

        for (h, what) in [
            (
                HttpHealthCheck {
                    send: Some(Default::default()),
                    ..path("/h")
                },
                "send",
            ),
            (
                HttpHealthCheck {
                    codec_client_type: 2,
                    ..path("/h")
                },
                "codec_client_type",
            ),
            (
                HttpHealthCheck {
                    request_headers_to_add: vec![add("x-up", "%UPSTREAM_HOST%")],
                    ..path("/h")
                },
                "command operators",
            ),
            (
                HttpHealthCheck {
                    method: RequestMethod::Connect as i32,
                    ..path("/h")
                },
                "method",
            ),
            (
                HttpHealthCheck {
                    host: "outbound|8080||svc".into(),
                    codec_client_type: 1,
                    ..path("/h")
                },
                "no valid request",
            ),
        ] {
            let msg = config(h).expect_err(what);
            assert!(
                msg.contains(what) && msg.contains("health_checks[0]"),
                "{msg}"
            );
        }
    }
}
