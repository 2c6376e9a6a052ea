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
            let mut results = vec![false; set.endpoints.len()];
            while let Some(Ok((i, ok))) = checks.join_next().await {
                results[i] = ok;
            }
            let Some(c) = cluster.upgrade() else { return };
            for (e, ok) in set.endpoints.iter().zip(results) {
                record(&c, e, ok, &cfg);
            }
            drop(c);
            // Jitter keeps a fleet of proxies from checking in lockstep.
            let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
            tokio::time::sleep(cfg.interval + jitter).await;
        }
    });
}

async fn check_one(e: Arc<Endpoint>, cfg: &HealthCheckConfig) -> bool {
    let req = Request::get(cfg.path.as_str())
        .header(http::header::HOST, cfg.host.as_str())
        .header(http::header::USER_AGENT, "portico-dp-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Either::Right(Full::new(Bytes::new())));
    let Ok(req) = req else { return false };
    let fut = async {
        let mut tx = e.pool.connect_h1().await.ok()?;
        let resp = tx.send_request(req).await.ok()?;
        Some(resp.status().as_u16())
    };
    match tokio::time::timeout(cfg.timeout, fut).await {
        Ok(Some(status)) => cfg
            .expected
            .iter()
            .any(|(lo, hi)| status >= *lo && status < *hi),
        _ => false,
    }
}

fn record(c: &Cluster, e: &Endpoint, ok: bool, cfg: &HealthCheckConfig) {
    let healthy = e.hc_healthy.load(Relaxed);
    if ok == healthy {
        e.hc_streak.store(0, Relaxed);
        return;
    }
    let streak = e.hc_streak.fetch_add(1, Relaxed) + 1;
    let needed = if ok {
        cfg.healthy_threshold
    } else {
        cfg.unhealthy_threshold
    };
    if streak >= needed {
        e.hc_healthy.store(ok, Relaxed);
        e.hc_streak.store(0, Relaxed);
        c.stats.health_flaps.fetch_add(1, Relaxed);
        tracing::info!(cluster = %c.config.name, endpoint = %e.addr, healthy = ok, "health check changed endpoint state");
    }
}
