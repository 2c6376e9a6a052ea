//! Active HTTP health checks: one task per cluster, which ends when the
//! cluster is dropped (it holds only a weak reference).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::Request;

use super::{Cluster, Endpoint};
use crate::config::cluster::HealthCheckConfig;

/// Starts checking the cluster's endpoints; the first round runs at once.
pub fn spawn(cluster: Weak<Cluster>, cfg: HealthCheckConfig) {
    let cfg = Arc::new(cfg);
    tokio::spawn(async move {
        loop {
            let Some(c) = cluster.upgrade() else { return };
            let set = c.endpoints.load_full();
            drop(c);
            // Checks run concurrently, each bounded by the check timeout.
            let mut checks = tokio::task::JoinSet::new();
            for (i, e) in set.endpoints.iter().enumerate() {
                let (e, cfg) = (e.clone(), cfg.clone());
                checks.spawn(async move { (i, check_one(e, &cfg).await) });
            }
            let mut results = vec![Outcome::NoAnswer; set.endpoints.len()];
            while let Some(Ok((i, outcome))) = checks.join_next().await {
                results[i] = outcome;
            }
            let Some(c) = cluster.upgrade() else { return };
            for (e, outcome) in set.endpoints.iter().zip(results) {
                record(&c, e, outcome, &cfg);
            }
            drop(c);
            // Jitter keeps a fleet of proxies from checking in lockstep.
            let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
            tokio::time::sleep(cfg.interval + jitter).await;
        }
    });
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
/// HTTP/2), then the configured header edits.
fn request(cfg: &HealthCheckConfig) -> Option<Request<crate::upstream::pool::ReqBody>> {
    let uri = if cfg.http2 {
        format!("http://{}{}", cfg.host, cfg.path)
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
            .header(http::header::HOST, cfg.host.as_str())
            .header(http::header::CONNECTION, "close");
    }
    let mut req = b.body(Either::Right(Full::new(Bytes::new()))).ok()?;
    cfg.edits.apply_request(req.headers_mut(), None);
    Some(req)
}

async fn check_one(e: Arc<Endpoint>, cfg: &HealthCheckConfig) -> Outcome {
    let Some(req) = request(cfg) else {
        // Not an answer from the endpoint (the config is checked for this
        // at conversion).
        return Outcome::NoAnswer;
    };
    let fut = async {
        let resp = if cfg.http2 {
            let mut tx = e.pool.connect_h2().await.ok()?;
            tx.ready().await.ok()?;
            tx.send_request(req).await.ok()?
        } else {
            let mut tx = e.pool.connect_h1().await.ok()?;
            tx.send_request(req).await.ok()?
        };
        Some(resp.status().as_u16())
    };
    let within = |ranges: &[(u16, u16)], s: u16| ranges.iter().any(|(lo, hi)| s >= *lo && s < *hi);
    match tokio::time::timeout(cfg.timeout, fut).await {
        Ok(Some(s)) if within(&cfg.expected, s) => Outcome::Pass,
        Ok(Some(s)) if within(&cfg.retriable, s) => Outcome::Retriable,
        Ok(Some(_)) => Outcome::Fail,
        _ => Outcome::NoAnswer,
    }
}

fn record(c: &Cluster, e: &Endpoint, outcome: Outcome, cfg: &HealthCheckConfig) {
    let ok = outcome == Outcome::Pass;
    let healthy = e.hc_healthy.load(Relaxed);
    if ok == healthy {
        e.hc_streak.store(0, Relaxed);
        return;
    }
    let streak = e.hc_streak.fetch_add(1, Relaxed) + 1;
    let needed = match outcome {
        Outcome::Pass => cfg.healthy_threshold,
        Outcome::Fail => 1,
        Outcome::Retriable | Outcome::NoAnswer => cfg.unhealthy_threshold,
    };
    if streak >= needed {
        e.hc_healthy.store(ok, Relaxed);
        e.hc_streak.store(0, Relaxed);
        c.stats.health_flaps.fetch_add(1, Relaxed);
        tracing::info!(cluster = %c.config.name, endpoint = %e.addr, healthy = ok, "health check changed endpoint state");
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
        let second = Some(portico_proto::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        });
        ClusterConfig::convert(&PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            health_checks: vec![HealthCheck {
                interval: second,
                timeout: second,
                health_checker: Some(HealthChecker::HttpHealthCheck(h)),
                ..Default::default()
            }],
            ..Default::default()
        })
        .map(|c| c.health_check.expect("a health check"))
        .map_err(|e| e.to_string())
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
        let req = request(&cfg).expect("a request");
        assert_eq!(req.method(), http::Method::HEAD);
        assert_eq!(req.version(), http::Version::HTTP_2);
        assert_eq!(req.uri().to_string(), "http://svc.internal/ready");
        assert_eq!(req.headers()["x-hc"], "100%");
        assert!(!req.headers().contains_key("user-agent"));
        assert!(!req.headers().contains_key("host"), "HTTP/2: the authority");

        let h1 = config(HttpHealthCheck {
            path: "/h".into(),
            ..Default::default()
        })
        .expect("converts");
        let req = request(&h1).expect("a request");
        assert_eq!((req.method(), req.uri().path()), (&http::Method::GET, "/h"));
        assert_eq!(req.headers()["host"], "c", "the cluster's name by default");

        for (h, what) in [
            (
                HttpHealthCheck {
                    path: "/h".into(),
                    send: Some(Default::default()),
                    ..Default::default()
                },
                "send",
            ),
            (
                HttpHealthCheck {
                    path: "/h".into(),
                    codec_client_type: 2,
                    ..Default::default()
                },
                "codec_client_type",
            ),
            (
                HttpHealthCheck {
                    path: "/h".into(),
                    request_headers_to_add: vec![add("x-up", "%UPSTREAM_HOST%")],
                    ..Default::default()
                },
                "command operators",
            ),
            (
                HttpHealthCheck {
                    path: "/h".into(),
                    method: RequestMethod::Connect as i32,
                    ..Default::default()
                },
                "method",
            ),
            (
                HttpHealthCheck {
                    path: "/h".into(),
                    host: "outbound|8080||svc".into(),
                    codec_client_type: 1,
                    ..Default::default()
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
