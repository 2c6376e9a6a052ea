//! Two served Apis may not claim the same requests on one gateway: same
//! host, same path match, same header/query conditions, and overlapping
//! methods. Within one Api, a later route that an earlier one fully
//! shadows is reported too.

use std::collections::HashMap;

use crate::model::api::{full_path, PathType, Route};
use crate::model::{DesiredState, ResourceKey, Spec};
use crate::problem::Problem;

/// What a route claims, minus its methods.
#[derive(PartialEq, Eq, Hash)]
struct Claim<'a> {
    gateway: &'a str,
    host: &'a str,
    path_type: u8,
    path: String,
    conditions: String,
}

struct Owner<'a> {
    document: &'a ResourceKey,
    route: usize,
    /// Empty means every method.
    methods: Vec<String>,
}

pub(super) fn check(state: &DesiredState, problems: &mut Vec<Problem>) {
    let mut claims: HashMap<Claim<'_>, Vec<Owner<'_>>> = HashMap::new();
    for (key, res) in state {
        let Spec::Api(api) = &res.spec else { continue };
        if !api.lifecycle.state.is_served() {
            continue;
        }
        let base = api.base_path.as_deref().unwrap_or("/");
        let hosts: Vec<&str> = if api.hostnames.is_empty() {
            vec!["*"]
        } else {
            api.hostnames.iter().map(String::as_str).collect()
        };
        for (i, route) in api.routes.iter().enumerate() {
            for gateway in &api.gateways {
                for host in &hosts {
                    let claim = claim_of(gateway, host, base, route);
                    let owner = Owner {
                        document: key,
                        route: i,
                        methods: route.matcher.methods.clone(),
                    };
                    let owners = claims.entry(claim).or_default();
                    let mut described = None;
                    for other in owners.iter() {
                        if !overlap(&other.methods, &owner.methods) {
                            continue;
                        }
                        let same_doc = other.document == owner.document;
                        if same_doc && other.route == owner.route {
                            continue;
                        }
                        let what =
                            describe(gateway, host, base, route, &other.methods, &owner.methods);
                        let message = if same_doc {
                            format!(
                                "matches the same requests as spec.routes[{}] ({what})",
                                other.route
                            )
                        } else {
                            format!(
                                "conflicts with {} spec.routes[{}]: both claim {what}",
                                other.document, other.route
                            )
                        };
                        described = Some((same_doc, message));
                        break;
                    }
                    if let Some((same_doc, message)) = described {
                        let path = format!("spec.routes[{i}].match");
                        problems.push(if same_doc {
                            Problem::document(owner.document.to_string(), path, message)
                        } else {
                            Problem::reference(owner.document.to_string(), path, message)
                        });
                    } else {
                        owners.push(owner);
                    }
                }
            }
        }
    }
}

fn claim_of<'a>(gateway: &'a str, host: &'a str, base: &str, route: &Route) -> Claim<'a> {
    let m = &route.matcher;
    let path = match m.path_type {
        PathType::Regex => format!("{base}~{}", m.path),
        _ => full_path(base, &m.path),
    };
    // Header and query conditions distinguish routes (e.g. a version
    // header); canonical JSON makes equal conditions compare equal.
    let conditions = if m.headers.is_empty() && m.query.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&(&m.headers, &m.query)).unwrap_or_default()
    };
    Claim {
        gateway,
        host,
        path_type: m.path_type as u8,
        path,
        conditions,
    }
}

fn overlap(a: &[String], b: &[String]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|m| b.contains(m))
}

fn describe(
    gateway: &str,
    host: &str,
    base: &str,
    route: &Route,
    a: &[String],
    b: &[String],
) -> String {
    let methods: Vec<&str> = match (a.is_empty(), b.is_empty()) {
        (true, true) => vec!["any method"],
        (true, false) => b.iter().map(String::as_str).collect(),
        (false, true) => a.iter().map(String::as_str).collect(),
        (false, false) => a
            .iter()
            .filter(|m| b.contains(m))
            .map(String::as_str)
            .collect(),
    };
    let m = &route.matcher;
    let path = match m.path_type {
        PathType::Regex => format!("regex {:?} under {base}", m.path),
        PathType::Exact => format!("exact {}", full_path(base, &m.path)),
        PathType::Prefix => format!("prefix {}", full_path(base, &m.path)),
    };
    format!(
        "{} {path} on host {host} of gateway {gateway:?}",
        methods.join(",")
    )
}
