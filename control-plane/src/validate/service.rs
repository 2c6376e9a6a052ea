//! Rules for `kind: Service`.

use std::collections::HashSet;

use super::{rules, Report};
use crate::model::gateway::SecretRef;
use crate::model::service::{LoadBalancing, ServiceSpec};

/// The lowest failover tier an endpoint may have.
const MAX_PRIORITY: u32 = 10;

pub(super) fn check(spec: &ServiceSpec, r: &mut Report<'_>) {
    if spec.endpoints.is_empty() {
        r.value("spec.endpoints", "a Service needs at least one endpoint");
    }
    let mut seen = HashSet::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let at = format!("spec.endpoints[{i}]");
        r.check(format!("{at}.address"), rules::check_address(&e.address));
        if e.port == 0 {
            r.value(format!("{at}.port"), "must be between 1 and 65535");
        }
        if !(1..=1000).contains(&e.weight) {
            r.value(format!("{at}.weight"), "must be between 1 and 1000");
        }
        if e.priority > MAX_PRIORITY {
            r.value(
                format!("{at}.priority"),
                format!("must be between 0 and {MAX_PRIORITY}"),
            );
        }
        if !seen.insert((e.address.as_str(), e.port)) {
            r.value(at, format!("duplicate endpoint {}:{}", e.address, e.port));
        }
    }
    // Tiers in use start at 0 and skip none (proxyless gRPC clients refuse
    // a missing one).
    let tiers: std::collections::BTreeSet<u32> = spec
        .endpoints
        .iter()
        .map(|e| e.priority)
        .filter(|p| *p <= MAX_PRIORITY)
        .collect();
    if let Some(gap) = (0..tiers.len() as u32).find(|p| !tiers.contains(p)) {
        r.value(
            "spec.endpoints",
            format!("priorities must start at 0 and skip none: no endpoint has priority {gap}"),
        );
    }
    if let Some(t) = &spec.slow_start {
        r.check("spec.slowStart", rules::check_duration(t, false));
        if !matches!(
            spec.load_balancing,
            LoadBalancing::RoundRobin | LoadBalancing::LeastRequest
        ) {
            r.value(
                "spec.slowStart",
                "slow start applies to round_robin and least_request load balancing only",
            );
        }
    }
    if let Some(t) = &spec.connect_timeout {
        r.check("spec.connectTimeout", rules::check_duration(t, false));
    }
    if let Some(t) = &spec.request_timeout {
        r.check("spec.requestTimeout", rules::check_duration(t, true));
    }
    if let Some(hc) = &spec.health_check {
        r.check("spec.healthCheck.path", rules::check_path(&hc.path));
        let interval = hc
            .interval
            .as_deref()
            .and_then(|t| r.check("spec.healthCheck.interval", rules::check_duration(t, false)));
        let timeout = hc
            .timeout
            .as_deref()
            .and_then(|t| r.check("spec.healthCheck.timeout", rules::check_duration(t, false)));
        if let Some(t) = hc.unhealthy_interval.as_deref() {
            r.check(
                "spec.healthCheck.unhealthyInterval",
                rules::check_duration(t, false),
            );
        }
        let interval = interval.unwrap_or(std::time::Duration::from_secs(10));
        if let Some(timeout) = timeout {
            if timeout >= interval {
                r.value(
                    "spec.healthCheck.timeout",
                    "must be shorter than the interval",
                );
            }
        }
        for (name, v) in [
            ("healthyThreshold", hc.healthy_threshold),
            ("unhealthyThreshold", hc.unhealthy_threshold),
        ] {
            if let Some(v) = v.filter(|v| !(1..=100).contains(v)) {
                r.value(
                    format!("spec.healthCheck.{name}"),
                    format!("{v} is out of range; must be between 1 and 100"),
                );
            }
        }
        for (i, s) in hc.expected_statuses.iter().enumerate() {
            if !(100..=599).contains(s) {
                r.value(
                    format!("spec.healthCheck.expectedStatuses[{i}]"),
                    format!("{s} is not an HTTP status"),
                );
            }
        }
    }
    if let Some(cb) = &spec.circuit_breaker {
        for (name, v) in [
            ("maxConnections", cb.max_connections),
            ("maxPendingRequests", cb.max_pending_requests),
            ("maxRequests", cb.max_requests),
            ("maxRetries", cb.max_retries),
        ] {
            if v == Some(0) {
                r.value(
                    format!("spec.circuitBreaker.{name}"),
                    "must be at least 1 (0 would refuse every request)",
                );
            }
        }
    }
    if let Some(od) = &spec.outlier_detection {
        if let Some(n) = od.consecutive_5xx.filter(|n| !(1..=1000).contains(n)) {
            r.value(
                "spec.outlierDetection.consecutive5xx",
                format!("{n} is out of range; must be between 1 and 1000"),
            );
        }
        if let Some(t) = &od.interval {
            r.check(
                "spec.outlierDetection.interval",
                rules::check_duration(t, false),
            );
        }
        if let Some(t) = &od.base_ejection_time {
            r.check(
                "spec.outlierDetection.baseEjectionTime",
                rules::check_duration(t, false),
            );
        }
        if let Some(p) = od.max_ejection_percent.filter(|p| *p > 100) {
            r.value(
                "spec.outlierDetection.maxEjectionPercent",
                format!("{p} is not a percentage"),
            );
        }
    }
    if let Some(tls) = &spec.tls {
        if let Some(sni) = &tls.sni {
            r.check("spec.tls.sni", rules::check_hostname(sni, false));
        }
        let refs: [(&str, &Option<SecretRef>); 2] = [
            ("caCertificateRef", &tls.ca_certificate_ref),
            ("clientCertificateRef", &tls.client_certificate_ref),
        ];
        for (name, reference) in refs {
            if let Some(s) = reference {
                r.check(format!("spec.tls.{name}.name"), rules::check_name(&s.name));
            }
        }
        if tls.insecure_skip_verify && tls.ca_certificate_ref.is_some() {
            r.value(
                "spec.tls.insecureSkipVerify",
                "cannot be combined with caCertificateRef",
            );
        }
    }
}
