//! Apis served on a listener → one `RouteConfiguration`: a virtual host per
//! host name, routes ordered most specific first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::encoding::WireType;
use prost::{Message, Name};

use portico_proto::envoy::config::core::v3::{
    data_source, header_value_option::HeaderAppendAction, DataSource, HeaderValue,
    HeaderValueOption,
};
use portico_proto::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, retry_policy::RetryBackOff, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, weighted_cluster::ClusterWeight, DirectResponseAction,
    HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use portico_proto::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};

use super::{duration, u32v, Shared};
use crate::model::api::{
    full_path, host_matches, ApiSpec, HeaderEdits, LifecycleState, PathType, Route as ApiRoute,
};
use crate::model::gateway::Listener;
use crate::model::{DesiredState, Kind, Resource, ResourceKey, Spec};
use crate::xds::resources::XdsResource;

/// One route ready to be placed, with what orders it.
struct Placed<'a> {
    rank: (u8, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>),
    api: &'a ResourceKey,
    index: usize,
    route: Route,
}

/// An Api served on the listener being built.
struct Served<'a> {
    key: &'a ResourceKey,
    res: &'a Arc<Resource>,
    api: &'a ApiSpec,
}

/// Encoded virtual hosts of the previous rendering, reused while what they
/// are built from is unchanged. Unchanged documents keep their `Arc` from
/// one revision to the next (the state service shares them), so "unchanged"
/// is a pointer comparison and a one-route edit re-renders one virtual host,
/// not the thousands beside it.
#[derive(Default)]
pub(crate) struct RouteCache {
    vhosts: HashMap<(String, String), Cached>,
}

struct Cached {
    inputs: Inputs,
    encoded: Arc<[u8]>,
}

/// Everything a virtual host's encoding depends on.
struct Inputs {
    domains: Vec<String>,
    /// The Apis whose routes it holds, in order.
    apis: Vec<Arc<Resource>>,
    /// The Services those routes name (for their default timeouts), in
    /// order; `None` where the name resolves to nothing.
    services: Vec<Option<Arc<Resource>>>,
}

impl Inputs {
    fn same(&self, other: &Inputs) -> bool {
        let same_arc = |a: &Arc<Resource>, b: &Arc<Resource>| Arc::ptr_eq(a, b);
        self.domains == other.domains
            && self.apis.len() == other.apis.len()
            && self
                .apis
                .iter()
                .zip(&other.apis)
                .all(|(a, b)| same_arc(a, b))
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) => same_arc(a, b),
                    (None, None) => true,
                    _ => false,
                })
    }
}

/// Builds the listener's route table; returns it and the Services it uses.
/// Virtual hosts whose inputs are unchanged since the last rendering come
/// from `previous` already encoded; every one used is kept in `next`.
pub(crate) fn build<'a>(
    name: &str,
    gateway: &str,
    listener: &Listener,
    state: &'a DesiredState,
    previous: &RouteCache,
    next: &mut RouteCache,
) -> (Shared, Vec<&'a str>) {
    let mut served: Vec<Served<'a>> = Vec::new();
    let mut by_host: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut any_host: Vec<usize> = Vec::new();
    let mut services = Vec::new();
    for (key, res) in state {
        let Spec::Api(api) = &res.spec else { continue };
        if !api.lifecycle.state.is_served() || !api.gateways.iter().any(|g| g == gateway) {
            continue;
        }
        let hosts: Vec<&String> = api
            .hostnames
            .iter()
            .filter(|h| {
                listener.hostnames.is_empty()
                    || listener.hostnames.iter().any(|p| host_matches(p, h))
            })
            .collect();
        if !api.hostnames.is_empty() && hosts.is_empty() {
            continue; // served by another listener of this gateway
        }
        for r in &api.routes {
            services.extend(r.action.service.as_deref());
            services.extend(r.action.services.iter().map(|w| w.name.as_str()));
        }
        let i = served.len();
        served.push(Served { key, res, api });
        if api.hostnames.is_empty() {
            any_host.push(i);
        } else {
            for h in hosts {
                by_host.entry(h.clone()).or_default().push(i);
            }
        }
    }
    // Envoy rejects a domain that appears in two virtual hosts, so the
    // catch-all host leaves out the names that have their own.
    let default_domains: Vec<String> = if listener.hostnames.is_empty() {
        vec!["*".into()]
    } else {
        listener
            .hostnames
            .iter()
            .filter(|h| !by_host.contains_key(*h))
            .cloned()
            .collect()
    };
    // Routes of Apis with no host names are served on every host of the
    // listener, so they join every virtual host.
    let mut plan: Vec<(String, Vec<String>, Vec<usize>)> = by_host
        .into_iter()
        .map(|(host, mut apis)| {
            apis.extend(&any_host);
            (host.clone(), vec![host], apis)
        })
        .collect();
    if !any_host.is_empty() && !default_domains.is_empty() {
        // "*" cannot be a host name, so this name never clashes with one.
        plan.push(("*".into(), default_domains, any_host));
    }
    let mut encoded = RouteConfiguration {
        name: name.to_string(),
        // Virtual hosts match the host name whatever port the client put
        // in its Host header; the header itself goes upstream as it came.
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
    .encode_to_vec();
    for (vh_name, domains, apis) in plan {
        let inputs = Inputs {
            domains,
            apis: apis.iter().map(|&i| served[i].res.clone()).collect(),
            services: apis
                .iter()
                .flat_map(|&i| served[i].api.routes.iter())
                .filter_map(|r| r.action.service.as_ref())
                .map(|s| {
                    state
                        .get(&ResourceKey::new(Kind::Service, s.clone()))
                        .cloned()
                })
                .collect(),
        };
        let cache_key = (name.to_string(), vh_name);
        let bytes = match previous.vhosts.get(&cache_key) {
            Some(c) if c.inputs.same(&inputs) => c.encoded.clone(),
            _ => {
                let routes = apis
                    .iter()
                    .flat_map(|&i| {
                        let s = &served[i];
                        s.api
                            .routes
                            .iter()
                            .enumerate()
                            .map(move |(index, r)| Placed {
                                rank: rank(s.api, r),
                                api: s.key,
                                index,
                                route: route(s.key, s.api, index, r, state),
                            })
                    })
                    .collect();
                let vh = vhost(&cache_key.1, inputs.domains.clone(), routes);
                Arc::from(vh.encode_to_vec())
            }
        };
        // `virtual_hosts` is field 2 of RouteConfiguration and every later
        // field is empty, so appending gives exactly prost's encoding.
        prost::encoding::encode_key(2, WireType::LengthDelimited, &mut encoded);
        prost::encoding::encode_varint(bytes.len() as u64, &mut encoded);
        encoded.extend_from_slice(&bytes);
        next.vhosts.insert(
            cache_key,
            Cached {
                inputs,
                encoded: bytes,
            },
        );
    }
    services.sort_unstable();
    services.dedup();
    (
        XdsResource::from_encoded(name, RouteConfiguration::type_url(), encoded),
        services,
    )
}

fn vhost(name: &str, domains: Vec<String>, mut routes: Vec<Placed<'_>>) -> VirtualHost {
    routes.sort_by(|a, b| (a.rank, a.api, a.index).cmp(&(b.rank, b.api, b.index)));
    VirtualHost {
        name: name.to_string(),
        domains,
        routes: routes.into_iter().map(|p| p.route).collect(),
        ..Default::default()
    }
}

/// Most specific first: exact paths, then regexes, then prefixes longest
/// first; among equals, more conditions first.
fn rank(api: &ApiSpec, r: &ApiRoute) -> (u8, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
    let m = &r.matcher;
    let kind = match m.path_type {
        PathType::Exact => 0,
        PathType::Regex => 1,
        PathType::Prefix => 2,
    };
    let len = full_path(api.base_path.as_deref().unwrap_or("/"), &m.path).len();
    let conditions = m.headers.len() + m.query.len() + usize::from(!m.methods.is_empty());
    (kind, std::cmp::Reverse(len), std::cmp::Reverse(conditions))
}

fn string_exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(v.to_string())),
        ..Default::default()
    }
}

fn regex(v: &str) -> RegexMatcher {
    RegexMatcher {
        regex: v.to_string(),
        ..Default::default()
    }
}

fn route(
    key: &ResourceKey,
    api: &ApiSpec,
    index: usize,
    r: &ApiRoute,
    state: &DesiredState,
) -> Route {
    let base = api.base_path.as_deref().unwrap_or("/");
    let m = &r.matcher;
    let path = match m.path_type {
        PathType::Exact => PathSpecifier::Path(full_path(base, &m.path)),
        PathType::Prefix => match full_path(base, &m.path) {
            // Prefixes match on segment boundaries: `/pets` must not take
            // `/petsitters`.
            p if p == "/" => PathSpecifier::Prefix(p),
            p => PathSpecifier::PathSeparatedPrefix(p.trim_end_matches('/').to_string()),
        },
        PathType::Regex => {
            let prefix = if base == "/" {
                String::new()
            } else {
                regex_escape(base)
            };
            PathSpecifier::SafeRegex(regex(&format!("{prefix}{}", m.path)))
        }
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    if !m.methods.is_empty() {
        let spec = if m.methods.len() == 1 {
            string_exact(&m.methods[0])
        } else {
            StringMatcher {
                match_pattern: Some(MatchPattern::SafeRegex(regex(&m.methods.join("|")))),
                ..Default::default()
            }
        };
        headers.push(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(spec)),
            ..Default::default()
        });
    }
    for h in &m.headers {
        let spec = if let Some(v) = &h.exact {
            HeaderMatchSpecifier::StringMatch(string_exact(v))
        } else if let Some(v) = &h.prefix {
            HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Prefix(v.clone())),
                ..Default::default()
            })
        } else if let Some(v) = &h.regex {
            HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::SafeRegex(regex(v))),
                ..Default::default()
            })
        } else {
            HeaderMatchSpecifier::PresentMatch(h.present.unwrap_or(true))
        };
        // `present: false` is "absent": a present match, inverted.
        let invert = h.invert ^ (h.present == Some(false));
        let spec = match spec {
            HeaderMatchSpecifier::PresentMatch(_) => HeaderMatchSpecifier::PresentMatch(true),
            other => other,
        };
        headers.push(HeaderMatcher {
            name: h.name.to_ascii_lowercase(),
            header_match_specifier: Some(spec),
            invert_match: invert,
            ..Default::default()
        });
    }
    let query_parameters = m
        .query
        .iter()
        .map(|q| QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(if let Some(v) = &q.exact {
                QueryParameterMatchSpecifier::StringMatch(string_exact(v))
            } else if let Some(v) = &q.regex {
                QueryParameterMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(MatchPattern::SafeRegex(regex(v))),
                    ..Default::default()
                })
            } else {
                QueryParameterMatchSpecifier::PresentMatch(true)
            }),
        })
        .collect();
    let a = &r.action;
    let action =
        if let Some(rd) = &a.redirect {
            Action::Redirect(RedirectAction {
                scheme_rewrite_specifier: rd
                    .scheme
                    .clone()
                    .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
                host_redirect: rd.host.clone().unwrap_or_default(),
                port_redirect: rd.port.map(u32::from).unwrap_or(0),
                path_rewrite_specifier: rd
                    .path
                    .clone()
                    .map(redirect_action::PathRewriteSpecifier::PathRedirect),
                response_code: match rd.code.unwrap_or(301) {
                    302 => redirect_action::RedirectResponseCode::Found,
                    303 => redirect_action::RedirectResponseCode::SeeOther,
                    307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
                    308 => redirect_action::RedirectResponseCode::PermanentRedirect,
                    _ => redirect_action::RedirectResponseCode::MovedPermanently,
                } as i32,
                ..Default::default()
            })
        } else if let Some(d) = &a.direct_response {
            Action::DirectResponse(DirectResponseAction {
                status: d.status as u32,
                body: d.body.clone().map(|b| DataSource {
                    specifier: Some(data_source::Specifier::InlineString(b)),
                    ..Default::default()
                }),
                ..Default::default()
            })
        } else {
            let cluster = match &a.service {
                Some(s) => ClusterSpecifier::Cluster(s.clone()),
                None => ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: a
                        .services
                        .iter()
                        .map(|w| ClusterWeight {
                            name: w.name.clone(),
                            weight: u32v(w.weight),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
            };
            // The route's timeout, else the Service's request timeout.
            let service_timeout = a.service.as_ref().and_then(|s| {
                match state
                    .get(&ResourceKey::new(Kind::Service, s.clone()))
                    .map(|r| &r.spec)
                {
                    Some(Spec::Service(svc)) => svc.request_timeout.clone(),
                    _ => None,
                }
            });
            Action::Route(RouteAction {
                cluster_specifier: Some(cluster),
                prefix_rewrite: a.prefix_rewrite.clone().unwrap_or_default(),
                timeout: a
                    .timeout
                    .clone()
                    .or(service_timeout)
                    .as_deref()
                    .and_then(duration),
                retry_policy: a.retries.as_ref().map(|rt| RetryPolicy {
                    retry_on: if rt.on.is_empty() {
                        "connect-failure".into()
                    } else {
                        rt.on.join(",")
                    },
                    num_retries: u32v(rt.attempts),
                    per_try_timeout: rt.per_try_timeout.as_deref().and_then(duration),
                    retriable_status_codes: rt
                        .retriable_status_codes
                        .iter()
                        .map(|c| *c as u32)
                        .collect(),
                    retry_back_off: rt.backoff.as_deref().and_then(duration).map(|b| {
                        RetryBackOff {
                            base_interval: Some(b),
                            ..Default::default()
                        }
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
    let mut out = Route {
        name: format!(
            "{}/{}",
            key.name,
            r.name.clone().unwrap_or_else(|| index.to_string())
        ),
        r#match: Some(RouteMatch {
            path_specifier: Some(path),
            headers,
            query_parameters,
            ..Default::default()
        }),
        action: Some(action),
        ..Default::default()
    };
    if let Some(h) = &a.request_headers {
        let (add, remove) = edits(h);
        out.request_headers_to_add = add;
        out.request_headers_to_remove = remove;
    }
    if let Some(h) = &a.response_headers {
        let (add, remove) = edits(h);
        out.response_headers_to_add = add;
        out.response_headers_to_remove = remove;
    }
    if api.lifecycle.state == LifecycleState::Deprecated {
        out.response_headers_to_add.extend(lifecycle_headers(api));
    }
    out
}

/// A header to add with `value` as it is: Envoy reads `%` in a header
/// value as the start of a command operator, so it is escaped, and an
/// empty value is kept (Envoy drops it unless told).
fn header(key: &str, value: String, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        keep_empty_value: value.is_empty(),
        header: Some(HeaderValue {
            key: key.to_ascii_lowercase(),
            value: value.replace('%', "%%"),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn edits(h: &HeaderEdits) -> (Vec<HeaderValueOption>, Vec<String>) {
    let mut add: Vec<HeaderValueOption> = h
        .set
        .iter()
        .map(|(k, v)| header(k, v.clone(), HeaderAppendAction::OverwriteIfExistsOrAdd))
        .collect();
    add.extend(
        h.add
            .iter()
            .map(|(k, v)| header(k, v.clone(), HeaderAppendAction::AppendIfExistsOrAdd)),
    );
    (
        add,
        h.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
    )
}

/// `Deprecation` (RFC 9745) and `Sunset` (RFC 8594) on every answer of a
/// deprecated Api.
fn lifecycle_headers(api: &ApiSpec) -> Vec<HeaderValueOption> {
    let mut out = Vec::new();
    let at = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    };
    if let Some(d) = at(&api.lifecycle.deprecated_at) {
        let secs = d
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        out.push(header(
            "deprecation",
            format!("@{secs}"),
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ));
    }
    if let Some(s) = at(&api.lifecycle.sunset_at) {
        out.push(header(
            "sunset",
            httpdate::fmt_http_date(s),
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ));
    }
    out
}

fn regex_escape(s: &str) -> String {
    regex::escape(s)
}
