//! Outlier detection as Envoy's: consecutive 5xx and gateway errors (and,
//! when split, local-origin failures) judged per answer; success rate and
//! failure percentage judged per interval; ejections with a backoff that
//! grows and decays, bounded by `max_ejection_percent`; an active health
//! check that passes ends one.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use super::{live, now_ms, Cluster, Endpoint};
use crate::config::cluster::OutlierConfig;

impl Endpoint {
    /// Starts every run of consecutive failures over.
    fn reset_outlier_counts(&self) {
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
        self.consecutive_local.store(0, Relaxed);
    }

    /// Brings an ejected endpoint back at once (its active health check
    /// found it healthy); its backoff stays, and decays from now. Says
    /// whether it was out.
    pub(crate) fn uneject(&self) -> bool {
        let now = now_ms();
        let was_out = self
            .ejected_until
            .fetch_update(Relaxed, Relaxed, |u| (u > now).then_some(now))
            .is_ok();
        if was_out {
            self.reset_outlier_counts();
        }
        was_out
    }
}

impl Cluster {
    /// Records the outcome of a request for outlier detection: the
    /// upstream's status, or `None` when there was no answer (a failure to
    /// connect, a reset or a timeout: a local-origin failure).
    pub fn observe(&self, ep: &Endpoint, status: Option<u16>) {
        let Some(o) = &self.config.outlier else {
            return;
        };
        let trip = |counter: &AtomicU32, bad: bool, limit: u32| -> bool {
            if !bad {
                counter.store(0, Relaxed);
                return false;
            }
            limit > 0 && counter.fetch_add(1, Relaxed) + 1 >= limit
        };
        if let Some(lo) = &o.local_origin {
            // Split: a connection that carried an answer is a local-origin
            // success; the answers alone count below.
            if lo.success_rate.is_some() || lo.failure_percentage.is_some() {
                ep.window_local_total.fetch_add(1, Relaxed);
                if status.is_none() {
                    ep.window_local_failed.fetch_add(1, Relaxed);
                }
            }
            if trip(&ep.consecutive_local, status.is_none(), lo.consecutive) {
                if enforced(lo.enforce_consecutive) {
                    self.eject(ep, o, now_ms(), "consecutive local-origin failures");
                } else {
                    ep.consecutive_local.store(0, Relaxed);
                }
            }
            if status.is_none() {
                return;
            }
        }
        let is_5xx = status.is_none_or(|s| s >= 500);
        let is_gw = status.is_none_or(|s| (502..=504).contains(&s));
        if o.success_rate.is_some() || o.failure_percentage.is_some() {
            ep.window_total.fetch_add(1, Relaxed);
            if is_5xx {
                ep.window_failed.fetch_add(1, Relaxed);
            }
        }
        let t1 = trip(&ep.consecutive_5xx, is_5xx, o.consecutive_5xx);
        let t2 = trip(&ep.consecutive_gateway, is_gw, o.consecutive_gateway);
        // Each detection ejects with its `enforcing_*` chance.
        if (t1 && enforced(o.enforce_5xx)) || (t2 && enforced(o.enforce_gateway)) {
            self.eject(ep, o, now_ms(), "consecutive errors");
        } else if t1 || t2 {
            // Detected, not enforced: the next run of errors starts over.
            ep.consecutive_5xx.store(0, Relaxed);
            ep.consecutive_gateway.store(0, Relaxed);
        }
    }

    /// Ejects an endpoint for its backoff's length (plus jitter), unless
    /// that would put more than `max_ejection_percent` out (one always may
    /// be with `always_eject_one_host`).
    fn eject(&self, ep: &Endpoint, o: &OutlierConfig, now: u64, why: &'static str) {
        // One at a time, so that workers ejecting at once respect the
        // limit together (ejections are rare).
        let _one = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        // Already out (answers still in flight when it was ejected, or a
        // second detection in the same interval): nothing more.
        if ep.ejected_until.load(Relaxed) > now {
            ep.reset_outlier_counts();
            return;
        }
        let set = self.endpoints.load();
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.ejected_until.load(Relaxed) > now)
            .count();
        let too_many = (ejected + 1) * 100 > set.endpoints.len() * o.max_ejection_percent as usize;
        if too_many && !(o.always_eject_one && ejected == 0) {
            ep.reset_outlier_counts();
            return;
        }
        // Envoy's backoff: one more step while the next ejection would not
        // already be past the longest.
        let mut n = ep.ejections.load(Relaxed);
        if o.base_ejection.saturating_mul(n) < o.max_ejection.saturating_add(o.base_ejection) {
            n += 1;
            ep.ejections.store(n, Relaxed);
        }
        let jitter = u64::try_from(o.ejection_jitter.as_millis()).unwrap_or(u64::MAX);
        let length = u64::try_from(
            o.base_ejection
                .saturating_mul(n)
                .min(o.max_ejection)
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
        .saturating_add(if jitter > 0 {
            fastrand::u64(..=jitter)
        } else {
            0
        });
        ep.ejected_until.store(now.saturating_add(length), Relaxed);
        ep.reset_outlier_counts();
        self.availability_changed();
        self.stats.outlier_ejections.fetch_add(1, Relaxed);
        tracing::warn!(cluster = %self.config.name, endpoint = %ep.addr, for_ms = length, why, "endpoint ejected by outlier detection");
    }

    /// The outlier detector's interval: judges the interval's success
    /// rates (Envoy's success-rate and failure-percentage ejection) and
    /// lets the ejection backoff of endpoints that stayed in decay.
    fn outlier_interval(&self, o: &OutlierConfig) {
        let now = now_ms();
        let set = self.endpoints.load();
        let answers = interval_rates(&set.endpoints, now, |e| (&e.window_total, &e.window_failed));
        self.judge_rates(
            o,
            &answers,
            (o.success_rate, o.failure_percentage),
            now,
            ["success rate", "failure percentage"],
        );
        if let Some(lo) = &o.local_origin {
            let local = interval_rates(&set.endpoints, now, |e| {
                (&e.window_local_total, &e.window_local_failed)
            });
            self.judge_rates(
                o,
                &local,
                (lo.success_rate, lo.failure_percentage),
                now,
                [
                    "success rate (local origin)",
                    "failure percentage (local origin)",
                ],
            );
        }
        let interval = u64::try_from(o.interval.as_millis()).unwrap_or(u64::MAX);
        for e in &set.endpoints {
            let until = e.ejected_until.load(Relaxed);
            // Back for a whole interval: the next ejection is shorter.
            if until != 0 && until.saturating_add(interval) <= now {
                let _ = e
                    .ejections
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
            }
        }
    }

    /// Ejects the endpoints whose interval's rates fall below Envoy's
    /// success-rate threshold or reach its failure percentage.
    fn judge_rates(
        &self,
        o: &OutlierConfig,
        rates: &[(&Arc<Endpoint>, f64, u32)],
        (success_rate, failure_percentage): (
            Option<crate::config::cluster::SuccessRateEjection>,
            Option<crate::config::cluster::FailurePercentageEjection>,
        ),
        now: u64,
        why: [&'static str; 2],
    ) {
        if let Some(sr) = success_rate {
            if let Some(valid) = judged(rates, sr.request_volume, sr.minimum_hosts) {
                let threshold = success_rate_threshold(
                    &valid.iter().map(|(_, r, _)| *r).collect::<Vec<_>>(),
                    sr.stdev_factor,
                );
                for (e, r, _) in valid {
                    if *r < threshold && enforced(sr.enforcing) {
                        self.eject(e, o, now, why[0]);
                    }
                }
            }
        }
        if let Some(fp) = failure_percentage {
            if let Some(valid) = judged(rates, fp.request_volume, fp.minimum_hosts) {
                for (e, r, _) in valid {
                    if 100.0 - *r >= f64::from(fp.threshold) && enforced(fp.enforcing) {
                        self.eject(e, o, now, why[1]);
                    }
                }
            }
        }
    }
}

/// The rates a detection by rate judges: those of endpoints with at least
/// `volume` requests, when there are at least `min_hosts` (and one).
fn judged<'r, 'e>(
    rates: &'r [(&'e Arc<Endpoint>, f64, u32)],
    volume: u32,
    min_hosts: u32,
) -> Option<Vec<&'r (&'e Arc<Endpoint>, f64, u32)>> {
    let valid: Vec<_> = rates.iter().filter(|(_, _, n)| *n >= volume).collect();
    (!valid.is_empty() && valid.len() >= min_hosts as usize).then_some(valid)
}

/// Takes each endpoint's interval counts (`counts`: total and failed) and
/// returns (endpoint, success rate in percent, total) for those not
/// ejected that had any.
fn interval_rates(
    eps: &[Arc<Endpoint>],
    now: u64,
    counts: impl Fn(&Endpoint) -> (&AtomicU32, &AtomicU32),
) -> Vec<(&Arc<Endpoint>, f64, u32)> {
    eps.iter()
        .filter_map(|e| {
            let (total, failed) = counts(e);
            let total = total.swap(0, Relaxed);
            let failed = failed.swap(0, Relaxed).min(total);
            let out = e.ejected_until.load(Relaxed) > now;
            (!out && total > 0).then(|| {
                (
                    e,
                    100.0 * f64::from(total - failed) / f64::from(total),
                    total,
                )
            })
        })
        .collect()
}

/// Whether a detection with an `enforcing_*` chance of `percent` ejects.
fn enforced(percent: u32) -> bool {
    percent >= 100 || fastrand::u32(..100) < percent
}

/// Envoy's success-rate ejection threshold: the mean of the rates less
/// `stdev_factor` (population) standard deviations.
fn success_rate_threshold(rates: &[f64], stdev_factor: f64) -> f64 {
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    mean - stdev_factor * variance.sqrt()
}

/// Runs a cluster's outlier detector interval while the cluster is live.
pub(super) fn spawn(cluster: std::sync::Weak<Cluster>) {
    tokio::spawn(async move {
        loop {
            let every = match live(&cluster) {
                Some(c) => match &c.config.outlier {
                    Some(o) => o.interval,
                    None => return,
                },
                None => return,
            };
            tokio::time::sleep(every).await;
            let Some(c) = live(&cluster) else { return };
            if let Some(o) = &c.config.outlier {
                c.outlier_interval(o);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::{
        ClusterConfig, EndpointSpec, FailurePercentageEjection, LoadPolicy, SuccessRateEjection,
    };
    use crate::stats::ClusterStats;
    use portico_proto::envoy::config::cluster::v3::{
        cluster::{ClusterDiscoveryType, DiscoveryType},
        Cluster as PbCluster, OutlierDetection,
    };

    #[test]
    fn success_rate_threshold_is_envoys() {
        // Envoy's own example: mean 90, stdev 20, factor 1.9.
        let t = success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1.9);
        assert!((t - 52.0).abs() < 1e-9, "{t}");
    }

    /// Six endpoints; one fails half its requests over an interval.
    fn cluster(edit: impl FnOnce(&mut OutlierDetection)) -> Arc<Cluster> {
        let mut od = OutlierDetection {
            max_ejection_percent: Some(portico_proto::google::protobuf::UInt32Value { value: 50 }),
            ..Default::default()
        };
        edit(&mut od);
        let cfg = ClusterConfig::convert(&PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            outlier_detection: Some(od),
            ..Default::default()
        })
        .expect("converts");
        let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
        let specs: Vec<EndpointSpec> = (1..=6)
            .map(|p| EndpointSpec::at(([127, 0, 0, 1], p)))
            .collect();
        c.set_endpoints(&specs, LoadPolicy::default());
        c
    }

    fn serve(c: &Cluster, requests: u32, failing_every: Option<u32>) {
        let set = c.endpoints.load();
        for (i, e) in set.endpoints.iter().enumerate() {
            for n in 0..requests {
                let bad = i == 0 && failing_every.is_some_and(|k| n % k == 0);
                c.observe(e, Some(if bad { 503 } else { 200 }));
            }
        }
    }

    #[test]
    fn interval_ejects_by_success_rate_and_backoffs_decay() {
        // A 1 ms interval: the process's clock is young in a test.
        let c = cluster(|od| {
            od.interval = Some(portico_proto::google::protobuf::Duration {
                seconds: 0,
                nanos: 1_000_000,
            })
        });
        let o = c.config.outlier.clone().expect("outlier detection");
        assert_eq!(
            o.success_rate,
            Some(SuccessRateEjection {
                minimum_hosts: 5,
                request_volume: 100,
                stdev_factor: 1.9,
                enforcing: 100
            })
        );
        assert!(o.failure_percentage.is_none());
        // Too few requests: nothing is judged.
        serve(&c, 50, Some(2));
        c.outlier_interval(&o);
        assert_eq!(c.stats.outlier_ejections.load(Relaxed), 0);
        // Enough: the one at 50% (the others at 100%) is out.
        serve(&c, 120, Some(2));
        c.outlier_interval(&o);
        assert_eq!(c.stats.outlier_ejections.load(Relaxed), 1);
        let now = now_ms();
        let set = c.endpoints.load();
        assert!(!set.endpoints[0].available(now));
        assert!(set.endpoints[1..].iter().all(|e| e.available(now)));
        // Its backoff decays once it has been back for an interval.
        set.endpoints[0].ejected_until.store(1, Relaxed);
        set.endpoints[0].ejections.store(2, Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.outlier_interval(&o);
        assert_eq!(set.endpoints[0].ejections.load(Relaxed), 1);

        // Turned off, nothing is counted or ejected by rate.
        let off = cluster(|od| {
            od.enforcing_success_rate =
                Some(portico_proto::google::protobuf::UInt32Value { value: 0 })
        });
        let o = off.config.outlier.clone().unwrap();
        serve(&off, 200, Some(2));
        off.outlier_interval(&o);
        assert_eq!(off.stats.outlier_ejections.load(Relaxed), 0);
    }

    #[test]
    fn failure_percentage_ejects_when_enforced() {
        use portico_proto::google::protobuf::UInt32Value;
        let c = cluster(|od| {
            od.enforcing_success_rate = Some(UInt32Value { value: 0 });
            od.enforcing_failure_percentage = Some(UInt32Value { value: 100 });
            od.failure_percentage_threshold = Some(UInt32Value { value: 40 });
        });
        let o = c.config.outlier.clone().unwrap();
        assert_eq!(
            o.failure_percentage,
            Some(FailurePercentageEjection {
                threshold: 40,
                minimum_hosts: 5,
                request_volume: 50,
                enforcing: 100
            })
        );
        serve(&c, 60, Some(2));
        c.outlier_interval(&o);
        assert_eq!(c.stats.outlier_ejections.load(Relaxed), 1);
    }

    /// Envoy's `max_ejection_percent` holds even for the first ejection
    /// unless `always_eject_one_host`; ejections last their backoff plus
    /// up to `max_ejection_time_jitter`.
    #[test]
    fn ejection_limits_and_jitter_are_envoys() {
        use portico_proto::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
        let five_fail = |c: &Cluster| {
            let e = c.endpoints.load().endpoints[0].clone();
            for _ in 0..5 {
                c.observe(&e, Some(503));
            }
            e
        };
        // 1 of 6 is 16.7%: over 10%, so none...
        let strict = cluster(|od| od.max_ejection_percent = Some(UInt32Value { value: 10 }));
        let e = five_fail(&strict);
        assert!(e.available(now_ms()));
        assert_eq!(e.consecutive_5xx.load(Relaxed), 0, "the run starts over");
        // ...unless one always may go.
        let one = cluster(|od| {
            od.max_ejection_percent = Some(UInt32Value { value: 10 });
            od.always_eject_one_host = Some(BoolValue { value: true });
        });
        let e = five_fail(&one);
        assert!(!e.available(now_ms()));
        // But only one.
        let second = one.endpoints.load().endpoints[1].clone();
        for _ in 0..5 {
            one.observe(&second, Some(503));
        }
        assert!(second.available(now_ms()));
        // 30 s base, up to 10 s more.
        let jittered = cluster(|od| {
            od.max_ejection_time_jitter = Some(PbDuration {
                seconds: 10,
                nanos: 0,
            })
        });
        let lengths: Vec<u64> = (0..20)
            .map(|_| {
                let now = now_ms();
                let e = five_fail(&jittered);
                let length = e.ejected_until.load(Relaxed) - now;
                e.ejected_until.store(0, Relaxed);
                e.ejections.store(0, Relaxed);
                length
            })
            .collect();
        assert!(
            lengths.iter().all(|l| (30_000..=40_100).contains(l)),
            "{lengths:?}"
        );
        assert!(lengths.iter().any(|l| *l > 31_000), "{lengths:?}");
    }

    /// Split: connect failures, resets and timeouts (no answer) count as
    /// local-origin failures and never as 5xx; answers count only as
    /// answers; each kind ejects on its own run.
    #[test]
    fn local_origin_failures_are_judged_apart_when_split() {
        use portico_proto::google::protobuf::UInt32Value;
        let c = cluster(|od| {
            od.split_external_local_origin_errors = true;
            od.consecutive_local_origin_failure = Some(UInt32Value { value: 3 });
        });
        let set = c.endpoints.load();
        let (a, b) = (&set.endpoints[0], &set.endpoints[1]);
        // Four 503s then two failures to connect: neither run is long
        // enough (5 answers, 3 local failures).
        for s in [Some(503), Some(503), Some(503), Some(503), None, None] {
            c.observe(a, s);
        }
        assert!(a.available(now_ms()));
        assert_eq!(a.consecutive_5xx.load(Relaxed), 4, "no answer is not a 5xx");
        // An answer (even a 503) means the connection worked.
        c.observe(a, Some(503));
        assert!(!a.available(now_ms()), "the fifth 503 in a row ejects");
        for s in [None, None, Some(500), None, None] {
            c.observe(b, s);
        }
        assert!(b.available(now_ms()), "an answer broke the local run");
        c.observe(b, None);
        assert!(
            !b.available(now_ms()),
            "three local failures in a row eject"
        );
        // Not split: a failure to connect is a 5xx (and a gateway error).
        let flat = cluster(|_| {});
        let e = flat.endpoints.load().endpoints[0].clone();
        for _ in 0..5 {
            flat.observe(&e, None);
        }
        assert!(!e.available(now_ms()));
    }

    /// An active health check that finds an ejected endpoint healthy
    /// brings it back (Envoy's default), unless told not to.
    #[test]
    fn a_healthy_check_unejects_unless_told_not_to() {
        use portico_proto::google::protobuf::BoolValue;
        let c = cluster(|_| {});
        assert!(c.config.outlier.as_ref().unwrap().health_check_unejects);
        let e = c.endpoints.load().endpoints[0].clone();
        for _ in 0..5 {
            c.observe(&e, Some(503));
        }
        assert!(!e.available(now_ms()));
        e.uneject();
        assert!(e.available(now_ms()));
        let keep = cluster(|od| {
            od.successful_active_health_check_uneject_host = Some(BoolValue { value: false })
        });
        assert!(!keep.config.outlier.as_ref().unwrap().health_check_unejects);
    }

    /// An endpoint already out is not ejected again (answers still in
    /// flight); the backoff grows only while it can still lengthen an
    /// ejection; bringing one back leaves a past ejection's time alone, so
    /// that its backoff decays.
    #[test]
    fn ejections_do_not_stack_and_backoffs_stay_bounded() {
        let c = cluster(|_| {});
        let o = c.config.outlier.clone().unwrap();
        let e = c.endpoints.load().endpoints[0].clone();
        let now = now_ms();
        c.eject(&e, &o, now, "test");
        c.eject(&e, &o, now, "test");
        assert_eq!(e.ejections.load(Relaxed), 1);
        assert_eq!(c.stats.outlier_ejections.load(Relaxed), 1);
        // 30 s steps up to 300 s: eleven steps at most.
        for _ in 0..20 {
            e.ejected_until.store(0, Relaxed);
            c.eject(&e, &o, now, "test");
        }
        assert_eq!(e.ejections.load(Relaxed), 11);
        e.ejected_until.store(1, Relaxed);
        e.uneject();
        assert_eq!(e.ejected_until.load(Relaxed), 1, "a past ejection stays");
        let t = now_ms() + 60_000;
        e.ejected_until.store(t, Relaxed);
        e.uneject();
        assert!(e.ejected_until.load(Relaxed) < t && e.available(now_ms()));
    }

    #[test]
    fn outlier_settings_envoy_refuses_are_refused() {
        use portico_proto::google::protobuf::Duration as PbDuration;
        let convert = |edit: &dyn Fn(&mut OutlierDetection)| {
            let mut od = OutlierDetection::default();
            edit(&mut od);
            ClusterConfig::convert(&PbCluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                outlier_detection: Some(od),
                ..Default::default()
            })
            .map_err(|e| e.to_string())
        };
        let secs = |seconds| Some(PbDuration { seconds, nanos: 0 });
        let e = convert(&|od| {
            od.base_ejection_time = secs(60);
            od.max_ejection_time = secs(30);
        })
        .unwrap_err();
        assert!(
            e.contains("max_ejection_time 30s is below base_ejection_time 60s"),
            "{e}"
        );
        // Only the first set: the longest defaults to 300 s or the first.
        let ok = convert(&|od| od.base_ejection_time = secs(600)).unwrap();
        assert_eq!(
            ok.outlier.unwrap().max_ejection,
            std::time::Duration::from_secs(600)
        );
        let e = convert(&|od| od.monitors = vec![Default::default()]).unwrap_err();
        assert!(e.contains("monitors are not supported"), "{e}");
    }

    #[test]
    fn enforcing_percentages_are_chances() {
        assert!((0..1000).all(|_| enforced(100)));
        assert!((0..1000).all(|_| !enforced(0)));
        let n = (0..10_000).filter(|_| enforced(30)).count();
        assert!((2_500..3_500).contains(&n), "{n}");
    }
}
