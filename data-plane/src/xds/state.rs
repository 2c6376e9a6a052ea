//! The resources the proxy accepted, raw and converted, by type.
//!
//! An update is staged against a copy, converted and cross-checked there,
//! and only then committed; a rejected update leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use portico_proto::envoy::config::cluster::v3::Cluster;
use portico_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use portico_proto::envoy::config::listener::v3::Listener;
use portico_proto::google::protobuf::Any;
use portico_proto::type_url;
use prost::Message;

use crate::config::cluster::{assignment, Assignment, ClusterConfig, Discovery};
use crate::config::listener::{ListenerConfig, Routes};
use crate::config::route::RouteTable;
use crate::config::ConfigError;

/// The four resource types the proxy consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    /// CDS.
    Cluster,
    /// EDS.
    Endpoint,
    /// LDS.
    Listener,
    /// RDS.
    Route,
}

impl Ty {
    /// All types, in the order they are requested.
    pub const ALL: [Ty; 4] = [Ty::Cluster, Ty::Endpoint, Ty::Listener, Ty::Route];

    /// Its type URL.
    pub fn url(self) -> &'static str {
        match self {
            Ty::Cluster => type_url::CLUSTER,
            Ty::Endpoint => type_url::ENDPOINT,
            Ty::Listener => type_url::LISTENER,
            Ty::Route => type_url::ROUTE,
        }
    }

    /// The type for a URL.
    pub fn from_url(u: &str) -> Option<Ty> {
        Ty::ALL.into_iter().find(|t| t.url() == u)
    }

    /// Whether the type is subscribed as a wildcard (LDS, CDS).
    pub fn wildcard(self) -> bool {
        matches!(self, Ty::Cluster | Ty::Listener)
    }
}

/// One accepted resource.
#[derive(Debug)]
pub struct Item<T> {
    /// The version the server gave it.
    pub version: String,
    /// The resource as received.
    pub raw: Arc<Any>,
    /// Converted.
    pub value: Arc<T>,
    /// When it was accepted.
    pub updated: SystemTime,
}

impl<T> Clone for Item<T> {
    fn clone(&self) -> Self {
        Item {
            version: self.version.clone(),
            raw: self.raw.clone(),
            value: self.value.clone(),
            updated: self.updated,
        }
    }
}

/// Accepted resources of one type by name.
pub type Items<T> = BTreeMap<Arc<str>, Item<T>>;

/// Everything accepted.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Listeners.
    pub listeners: Items<ListenerConfig>,
    /// Route configurations.
    pub routes: Items<RouteTable>,
    /// Clusters.
    pub clusters: Items<ClusterConfig>,
    /// Load assignments.
    pub endpoints: Items<Assignment>,
    /// Last accepted SotW version per type.
    pub sotw_versions: HashMap<Ty, String>,
}

/// An incoming update for one type.
pub struct Update {
    /// The type.
    pub ty: Ty,
    /// Resources added or changed: name, version, resource.
    pub resources: Vec<(String, String, Any)>,
    /// Names removed (Delta).
    pub removed: Vec<String>,
    /// Whether the update is the complete set (SotW LDS/CDS).
    pub complete: bool,
}

fn stage<T>(
    items: &Items<T>,
    u: &Update,
    convert: impl Fn(&Any, &str) -> Result<T, ConfigError>,
) -> Result<Items<T>, ConfigError> {
    let mut next = if u.complete {
        BTreeMap::new()
    } else {
        Items::clone(items)
    };
    let now = SystemTime::now();
    let mut seen = BTreeSet::new();
    for (name, version, any) in &u.resources {
        if any.type_url != u.ty.url() {
            return Err(ConfigError::new(
                &format!("resource {name:?}"),
                format!("has type {} in a {} response", any.type_url, u.ty.url()),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(ConfigError::new(
                &format!("resource {name:?}"),
                "appears twice in one response",
            ));
        }
        let key: Arc<str> = name.as_str().into();
        // Unchanged resources keep their converted form.
        if let Some(old) = items.get(&key) {
            if old.raw.value == any.value {
                let mut kept = old.clone();
                kept.version = version.clone();
                next.insert(key, kept);
                continue;
            }
        }
        let value = convert(any, name)?;
        next.insert(
            key,
            Item {
                version: version.clone(),
                raw: Arc::new(any.clone()),
                value: Arc::new(value),
                updated: now,
            },
        );
    }
    for n in &u.removed {
        next.remove(n.as_str());
    }
    Ok(next)
}

fn decode<M: Message + Default>(any: &Any, what: &str, name: &str) -> Result<M, ConfigError> {
    M::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(&format!("{what} {name:?}"), format!("cannot decode: {e}")))
}

fn named(want: &str, got: &str, what: &str) -> Result<(), ConfigError> {
    if want != got {
        return Err(ConfigError::new(
            &format!("{what} {want:?}"),
            format!("resource is named {got:?} inside"),
        ));
    }
    Ok(())
}

impl State {
    /// A copy of the state with `u` applied, converted and cross-checked.
    pub fn staged(&self, u: &Update) -> Result<State, ConfigError> {
        let mut next = self.clone();
        match u.ty {
            Ty::Listener => {
                next.listeners = stage(&self.listeners, u, |a, n| {
                    let l: Listener = decode(a, "Listener", n)?;
                    named(n, &l.name, "Listener")?;
                    ListenerConfig::convert(&l)
                })?;
                let mut addrs = HashMap::new();
                for (n, l) in &next.listeners {
                    if let Some(other) = addrs.insert(l.value.address, n) {
                        return Err(ConfigError::new(
                            &format!("Listener {n:?}"),
                            format!(
                                "address {} is also used by listener {other:?}",
                                l.value.address
                            ),
                        ));
                    }
                }
                for (n, l) in &next.listeners {
                    if let Routes::Inline(t) = &l.value.routes {
                        next.check_clusters(&format!("Listener {n:?}"), t)?;
                    }
                }
            }
            Ty::Route => {
                next.routes = stage(&self.routes, u, |a, n| {
                    let previous = self
                        .routes
                        .get(n)
                        .map(|old| (&*old.value, old.raw.value.as_slice()));
                    let t = RouteTable::decode(n, &a.value, previous)?;
                    named(n, &t.name, "RouteConfiguration")?;
                    Ok(t)
                })?;
                for (name, _, _) in &u.resources {
                    if let Some(t) = next.routes.get(name.as_str()) {
                        next.check_clusters(&format!("RouteConfiguration {name:?}"), &t.value)?;
                    }
                }
            }
            Ty::Cluster => {
                next.clusters = stage(&self.clusters, u, |a, n| {
                    let c: Cluster = decode(a, "Cluster", n)?;
                    named(n, &c.name, "Cluster")?;
                    ClusterConfig::convert(&c)
                })?;
            }
            Ty::Endpoint => {
                next.endpoints = stage(&self.endpoints, u, |a, n| {
                    let cla: ClusterLoadAssignment = decode(a, "ClusterLoadAssignment", n)?;
                    named(n, &cla.cluster_name, "ClusterLoadAssignment")?;
                    assignment(&cla, &format!("ClusterLoadAssignment {n:?}"))
                })?;
            }
        }
        Ok(next)
    }

    /// A route naming a cluster the proxy does not have is rejected
    /// (unless the table says not to validate its clusters).
    fn check_clusters(&self, at: &str, t: &RouteTable) -> Result<(), ConfigError> {
        if !t.validate_clusters {
            return Ok(());
        }
        let missing: Vec<&str> = t
            .clusters
            .iter()
            .filter(|c| !self.clusters.contains_key(&***c))
            .map(|c| &**c)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(
                at,
                format!("routes to unknown cluster(s): {}", missing.join(", ")),
            ))
        }
    }

    /// Names the proxy needs of a non-wildcard type: route configurations
    /// its listeners use, load assignments its EDS clusters use.
    pub fn wanted(&self, ty: Ty) -> BTreeSet<String> {
        match ty {
            Ty::Route => self
                .listeners
                .values()
                .filter_map(|l| match &l.value.routes {
                    Routes::Rds(n) => Some(n.to_string()),
                    Routes::Inline(_) => None,
                })
                .collect(),
            Ty::Endpoint => self
                .clusters
                .values()
                .filter_map(|c| match &c.value.discovery {
                    Discovery::Eds(s) => Some(s.to_string()),
                    _ => None,
                })
                .collect(),
            Ty::Listener | Ty::Cluster => BTreeSet::new(),
        }
    }

    /// Drops route configurations and assignments nothing uses any more.
    pub fn collect_garbage(&mut self) {
        let routes = self.wanted(Ty::Route);
        self.routes.retain(|n, _| routes.contains(&**n));
        let eps = self.wanted(Ty::Endpoint);
        self.endpoints.retain(|n, _| eps.contains(&**n));
    }

    /// Versions of what is held of a type, for Delta's
    /// `initial_resource_versions`.
    pub fn versions(&self, ty: Ty) -> HashMap<String, String> {
        fn v<T>(i: &Items<T>) -> HashMap<String, String> {
            i.iter()
                .map(|(n, it)| (n.to_string(), it.version.clone()))
                .collect()
        }
        match ty {
            Ty::Listener => v(&self.listeners),
            Ty::Route => v(&self.routes),
            Ty::Cluster => v(&self.clusters),
            Ty::Endpoint => v(&self.endpoints),
        }
    }

    /// Raw resources of a type (for the cache and `/config_dump`).
    pub fn raw(&self, ty: Ty) -> Vec<(Arc<str>, String, Arc<Any>, SystemTime)> {
        fn r<T>(i: &Items<T>) -> Vec<(Arc<str>, String, Arc<Any>, SystemTime)> {
            i.iter()
                .map(|(n, it)| (n.clone(), it.version.clone(), it.raw.clone(), it.updated))
                .collect()
        }
        match ty {
            Ty::Listener => r(&self.listeners),
            Ty::Route => r(&self.routes),
            Ty::Cluster => r(&self.clusters),
            Ty::Endpoint => r(&self.endpoints),
        }
    }

    /// Whether every listener's routes have arrived.
    pub fn complete(&self) -> bool {
        self.wanted(Ty::Route)
            .iter()
            .all(|n| self.routes.contains_key(n.as_str()))
    }
}
