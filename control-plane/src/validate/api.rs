//! Rules for `kind: Api`.

use std::collections::HashSet;

use super::{exists, rules, Report};
use crate::model::api::{ApiSpec, HeaderEdits, LifecycleState, PathType, Route, RouteAction};
use crate::model::gateway::GatewaySpec;
use crate::model::{DesiredState, Kind, ResourceKey, Spec};

const RETRY_CONDITIONS: [&str; 5] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-status-codes",
];

pub(super) fn check(spec: &ApiSpec, state: &DesiredState, r: &mut Report<'_>) {
    check_version(&spec.version, r);
    if spec.gateways.is_empty() {
        r.value(
            "spec.gateways",
            "name at least one Gateway that serves this Api",
        );
    }
    let mut seen = HashSet::new();
    for (i, g) in spec.gateways.iter().enumerate() {
        let at = format!("spec.gateways[{i}]");
        if !seen.insert(g) {
            r.value(&at, format!("duplicate gateway {g:?}"));
        } else if !exists(state, Kind::Gateway, g) {
            r.reference(&at, format!("gateway {g:?} does not exist"));
        }
    }
    let mut hosts = HashSet::new();
    for (i, h) in spec.hostnames.iter().enumerate() {
        let at = format!("spec.hostnames[{i}]");
        if r.check(&at, rules::check_hostname(h, true)).is_none() {
            continue;
        }
        if !hosts.insert(h) {
            r.value(&at, format!("duplicate host name {h:?}"));
            continue;
        }
        for g in &spec.gateways {
            let key = ResourceKey::new(Kind::Gateway, g.clone());
            if let Some(Spec::Gateway(gw)) = state.get(&key).map(|res| &res.spec) {
                if !gateway_accepts(gw, h) {
                    r.reference(
                        &at,
                        format!("host {h:?} is not accepted by any listener of gateway {g:?}"),
                    );
                }
            }
        }
    }
    if let Some(base) = &spec.base_path {
        if let Some(()) = r.check("spec.basePath", rules::check_path(base)) {
            if base.len() > 1 && base.ends_with('/') {
                r.value("spec.basePath", "must not end with '/'");
            }
        }
    }
    check_lifecycle(spec, r);
    check_policies(&spec.policies, "spec.policies", r);
    if spec.routes.is_empty() {
        r.value("spec.routes", "an Api needs at least one route");
    }
    let mut route_names = HashSet::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if let Some(name) = &route.name {
            r.check(format!("{at}.name"), rules::check_name(name));
            if !route_names.insert(name) {
                r.value(
                    format!("{at}.name"),
                    format!("duplicate route name {name:?}"),
                );
            }
        }
        check_route(route, &at, state, r);
    }
}

fn check_version(version: &str, r: &mut Report<'_>) {
    // v1, v2, v2beta1, v3alpha: what API versioning schemes use in paths.
    let ok = version
        .strip_prefix('v')
        .map(|rest| {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let tail = &rest[digits..];
            digits > 0
                && !rest.starts_with('0')
                && tail
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && tail.bytes().next().is_none_or(|b| b.is_ascii_lowercase())
        })
        .unwrap_or(false);
    if !ok {
        r.value(
            "spec.version",
            format!("{version:?} is not a version; write v1, v2, v2beta1, ..."),
        );
    }
}

fn check_lifecycle(spec: &ApiSpec, r: &mut Report<'_>) {
    let l = &spec.lifecycle;
    let deprecated = l
        .deprecated_at
        .as_deref()
        .and_then(|t| r.check("spec.lifecycle.deprecatedAt", rules::check_timestamp(t)));
    let sunset = l
        .sunset_at
        .as_deref()
        .and_then(|t| r.check("spec.lifecycle.sunsetAt", rules::check_timestamp(t)));
    if l.state == LifecycleState::Deprecated && l.deprecated_at.is_none() {
        r.value(
            "spec.lifecycle.deprecatedAt",
            "a deprecated Api needs deprecatedAt (RFC 3339)",
        );
    }
    if l.state == LifecycleState::Draft && l.deprecated_at.is_some() {
        r.value(
            "spec.lifecycle.deprecatedAt",
            "a draft cannot be deprecated; set state to deprecated",
        );
    }
    if let (Some(d), Some(s)) = (deprecated, sunset) {
        if s <= d {
            r.value("spec.lifecycle.sunsetAt", "must be after deprecatedAt");
        }
    }
}

fn check_policies(policies: &[crate::model::api::PolicyRef], at: &str, r: &mut Report<'_>) {
    for (i, p) in policies.iter().enumerate() {
        r.value(
            format!("{at}[{i}].type"),
            format!(
                "unknown policy type {:?}; this release supports no policies yet",
                p.policy_type
            ),
        );
    }
}

fn check_route(route: &Route, at: &str, state: &DesiredState, r: &mut Report<'_>) {
    let m = &route.matcher;
    let path_at = format!("{at}.match.path");
    match m.path_type {
        PathType::Exact | PathType::Prefix => {
            r.check(path_at, rules::check_path(&m.path));
        }
        PathType::Regex => {
            r.check(path_at, rules::check_regex(&m.path));
        }
    }
    let mut methods = HashSet::new();
    for (i, method) in m.methods.iter().enumerate() {
        let method_at = format!("{at}.match.methods[{i}]");
        if !rules::METHODS.contains(&method.as_str()) {
            r.value(
                &method_at,
                format!(
                    "{method:?} is not an HTTP method; use one of {}",
                    rules::METHODS.join(", ")
                ),
            );
        } else if !methods.insert(method) {
            r.value(&method_at, format!("duplicate method {method}"));
        }
    }
    for (i, h) in m.headers.iter().enumerate() {
        let h_at = format!("{at}.match.headers[{i}]");
        r.check(format!("{h_at}.name"), rules::check_header_name(&h.name));
        let set = [
            h.exact.is_some(),
            h.prefix.is_some(),
            h.regex.is_some(),
            h.present.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            r.value(&h_at, "set exactly one of exact, prefix, regex, present");
        }
        if let Some(re) = &h.regex {
            r.check(format!("{h_at}.regex"), rules::check_regex(re));
        }
    }
    for (i, q) in m.query.iter().enumerate() {
        let q_at = format!("{at}.match.query[{i}]");
        if q.name.is_empty() {
            r.value(format!("{q_at}.name"), "must not be empty");
        }
        let set = [q.exact.is_some(), q.regex.is_some(), q.present.is_some()];
        if set.iter().filter(|s| **s).count() != 1 {
            r.value(&q_at, "set exactly one of exact, regex, present");
        }
        if let Some(re) = &q.regex {
            r.check(format!("{q_at}.regex"), rules::check_regex(re));
        }
    }
    check_action(
        &route.action,
        m.path_type,
        &format!("{at}.action"),
        state,
        r,
    );
    check_policies(&route.policies, &format!("{at}.policies"), r);
}

fn check_action(
    a: &RouteAction,
    path_type: PathType,
    at: &str,
    state: &DesiredState,
    r: &mut Report<'_>,
) {
    let kinds = [
        a.service.is_some(),
        !a.services.is_empty(),
        a.redirect.is_some(),
        a.direct_response.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        r.value(
            at,
            "set exactly one of service, services, redirect, directResponse",
        );
    }
    let forwards = a.service.is_some() || !a.services.is_empty();
    if let Some(s) = &a.service {
        if !exists(state, Kind::Service, s) {
            r.reference(
                format!("{at}.service"),
                format!("service {s:?} does not exist"),
            );
        }
    }
    let mut names = HashSet::new();
    for (i, w) in a.services.iter().enumerate() {
        let w_at = format!("{at}.services[{i}]");
        if !(1..=10_000).contains(&w.weight) {
            r.value(format!("{w_at}.weight"), "must be between 1 and 10000");
        }
        if !names.insert(&w.name) {
            r.value(
                format!("{w_at}.name"),
                format!("duplicate service {:?}", w.name),
            );
        } else if !exists(state, Kind::Service, &w.name) {
            r.reference(
                format!("{w_at}.name"),
                format!("service {:?} does not exist", w.name),
            );
        }
    }
    // Settings that only mean something when the request is forwarded.
    let forwarding_only = [
        ("prefixRewrite", a.prefix_rewrite.is_some()),
        ("timeout", a.timeout.is_some()),
        ("retries", a.retries.is_some()),
        ("requestHeaders", a.request_headers.is_some()),
    ];
    for (name, set) in forwarding_only {
        if set && !forwards {
            r.value(
                format!("{at}.{name}"),
                "only applies to routes that forward to a service",
            );
        }
    }
    if let Some(p) = &a.prefix_rewrite {
        if path_type == PathType::Regex {
            r.value(
                format!("{at}.prefixRewrite"),
                "cannot be used with a regex path",
            );
        } else {
            r.check(format!("{at}.prefixRewrite"), rules::check_path(p));
        }
    }
    if let Some(t) = &a.timeout {
        r.check(format!("{at}.timeout"), rules::check_duration(t, true));
    }
    if let Some(retries) = &a.retries {
        let r_at = format!("{at}.retries");
        if !(1..=10).contains(&retries.attempts) {
            r.value(format!("{r_at}.attempts"), "must be between 1 and 10");
        }
        if let Some(t) = &retries.per_try_timeout {
            r.check(
                format!("{r_at}.perTryTimeout"),
                rules::check_duration(t, false),
            );
        }
        if let Some(t) = &retries.backoff {
            r.check(format!("{r_at}.backoff"), rules::check_duration(t, false));
        }
        for (i, c) in retries.on.iter().enumerate() {
            if !RETRY_CONDITIONS.contains(&c.as_str()) {
                r.value(
                    format!("{r_at}.on[{i}]"),
                    format!(
                        "unknown retry condition {c:?}; use {}",
                        RETRY_CONDITIONS.join(", ")
                    ),
                );
            }
        }
        let wants_codes = retries.on.iter().any(|c| c == "retriable-status-codes");
        if wants_codes && retries.retriable_status_codes.is_empty() {
            r.value(
                format!("{r_at}.retriableStatusCodes"),
                "needed when retrying on retriable-status-codes",
            );
        }
        for (i, s) in retries.retriable_status_codes.iter().enumerate() {
            if !(100..=599).contains(s) {
                r.value(
                    format!("{r_at}.retriableStatusCodes[{i}]"),
                    format!("{s} is not an HTTP status"),
                );
            }
        }
    }
    if let Some(h) = &a.request_headers {
        check_header_edits(h, &format!("{at}.requestHeaders"), r);
    }
    if let Some(h) = &a.response_headers {
        check_header_edits(h, &format!("{at}.responseHeaders"), r);
    }
    if let Some(rd) = &a.redirect {
        let rd_at = format!("{at}.redirect");
        if let Some(s) = rd
            .scheme
            .as_deref()
            .filter(|s| !matches!(*s, "http" | "https"))
        {
            r.value(
                format!("{rd_at}.scheme"),
                format!("{s:?}: use http or https"),
            );
        }
        if let Some(h) = &rd.host {
            r.check(format!("{rd_at}.host"), rules::check_hostname(h, false));
        }
        if rd.port == Some(0) {
            r.value(format!("{rd_at}.port"), "must be between 1 and 65535");
        }
        if let Some(p) = &rd.path {
            r.check(format!("{rd_at}.path"), rules::check_path(p));
        }
        if let Some(c) = rd.code.filter(|c| ![301, 302, 303, 307, 308].contains(c)) {
            r.value(
                format!("{rd_at}.code"),
                format!("{c}: use 301, 302, 303, 307 or 308"),
            );
        }
    }
    if let Some(d) = &a.direct_response {
        let d_at = format!("{at}.directResponse");
        if !(200..=599).contains(&d.status) {
            r.value(format!("{d_at}.status"), "must be between 200 and 599");
        }
        if d.body.as_ref().is_some_and(|b| b.len() > 4096) {
            r.value(format!("{d_at}.body"), "must be at most 4096 bytes");
        }
    }
}

fn check_header_edits(h: &HeaderEdits, at: &str, r: &mut Report<'_>) {
    let names = h
        .set
        .keys()
        .map(|n| ("set", n))
        .chain(h.add.keys().map(|n| ("add", n)))
        .chain(h.remove.iter().map(|n| ("remove", n)));
    for (list, name) in names {
        r.check(
            format!("{at}.{list}.{name}"),
            rules::check_header_name(name),
        );
        if name.eq_ignore_ascii_case("host") {
            r.value(
                format!("{at}.{list}.{name}"),
                "the host header cannot be edited here",
            );
        }
    }
}

/// Whether a listener of the Gateway accepts `host`.
fn gateway_accepts(gw: &GatewaySpec, host: &str) -> bool {
    gw.listeners.iter().any(|l| {
        l.hostnames.is_empty()
            || l.hostnames
                .iter()
                .any(|pattern| crate::model::api::host_matches(pattern, host))
    })
}

#[cfg(test)]
mod tests {
    use crate::model::api::host_matches;

    #[test]
    fn wildcard_hosts() {
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "*.eu.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("api.example.com", "web.example.com"));
    }
}
