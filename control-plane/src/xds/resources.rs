//! xDS resources as the server hands them out: encoded once, versioned by
//! content, shared by every stream that sends them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock};

use portico_proto::google::protobuf::Any;
use portico_proto::type_url;
use prost::{Message, Name};
use sha2::{Digest, Sha256};

/// The resource types Portico serves, in make-before-break order:
/// clusters, then their endpoints, then listeners, then routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeUrl {
    /// `Cluster` (CDS).
    Cluster,
    /// `ClusterLoadAssignment` (EDS).
    Endpoint,
    /// `Listener` (LDS).
    Listener,
    /// `RouteConfiguration` (RDS).
    Route,
    /// `Secret` (SDS).
    Secret,
}

impl TypeUrl {
    /// Every type, in push order.
    pub const ALL: [TypeUrl; 5] = [
        TypeUrl::Cluster,
        TypeUrl::Endpoint,
        TypeUrl::Listener,
        TypeUrl::Route,
        TypeUrl::Secret,
    ];

    /// The full type URL.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeUrl::Cluster => type_url::CLUSTER,
            TypeUrl::Endpoint => type_url::ENDPOINT,
            TypeUrl::Listener => type_url::LISTENER,
            TypeUrl::Route => type_url::ROUTE,
            TypeUrl::Secret => type_url::SECRET,
        }
    }

    /// Parses a type URL; `None` for types Portico does not serve.
    pub fn parse(s: &str) -> Option<TypeUrl> {
        TypeUrl::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// A short name for metrics and status: `cds`, `eds`, `lds`, `rds`, `sds`.
    pub fn short(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "cds",
            TypeUrl::Endpoint => "eds",
            TypeUrl::Listener => "lds",
            TypeUrl::Route => "rds",
            TypeUrl::Secret => "sds",
        }
    }

    /// LDS and CDS: SotW responses carry the whole subscribed set, and a
    /// first request without names means "everything" (legacy wildcard).
    pub fn is_full_state(self) -> bool {
        matches!(self, TypeUrl::Listener | TypeUrl::Cluster)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One value per resource type, stored inline: a stream or node touches
/// four or five types, and a map would allocate room for eleven.
#[derive(Debug, Clone)]
pub struct PerType<T>([Option<T>; 5]);

impl<T> Default for PerType<T> {
    fn default() -> Self {
        PerType([None, None, None, None, None])
    }
}

impl<T> PerType<T> {
    /// The value for `t`, if set.
    pub fn get(&self, t: &TypeUrl) -> Option<&T> {
        self.0[t.index()].as_ref()
    }

    /// The value for `t`, if set, mutably.
    pub fn get_mut(&mut self, t: &TypeUrl) -> Option<&mut T> {
        self.0[t.index()].as_mut()
    }

    /// The value for `t`, set to its default first if missing.
    pub fn slot(&mut self, t: TypeUrl) -> &mut T
    where
        T: Default,
    {
        self.0[t.index()].get_or_insert_with(T::default)
    }

    /// Every set value with its type, in push order.
    pub fn iter(&self) -> impl Iterator<Item = (TypeUrl, &T)> {
        TypeUrl::ALL
            .into_iter()
            .filter_map(|t| Some((t, self.get(&t)?)))
    }
}

impl fmt::Display for TypeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One encoded resource.
#[derive(Debug, PartialEq, Eq)]
pub struct XdsResource {
    /// The resource's name.
    pub name: Arc<str>,
    /// Content hash of the encoded resource: equal content, equal version.
    pub version: Arc<str>,
    /// The resource, packed.
    pub body: Any,
}

impl XdsResource {
    /// Encodes `msg` and versions it by content.
    pub fn new<M: Message + Name>(name: &str, msg: &M) -> Arc<XdsResource> {
        Self::from_encoded(name, M::type_url(), msg.encode_to_vec())
    }

    /// A resource already encoded (its type's `type_url` and bytes),
    /// versioned by content.
    pub fn from_encoded(name: &str, type_url: String, value: Vec<u8>) -> Arc<XdsResource> {
        let digest = Sha256::digest(&value);
        let version: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Arc::new(XdsResource {
            name: name.into(),
            version: version.into(),
            body: Any { type_url, value },
        })
    }
}

/// A resource in a view, and whether a wildcard subscription covers it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The resource.
    pub resource: Arc<XdsResource>,
    /// False for resources only served when named (the `api_listener`s of
    /// proxyless gRPC clients, which an Envoy must not receive).
    pub in_wildcard: bool,
}

/// Name → version of the resources a client has (or was sent).
pub type Versions = Arc<BTreeMap<Arc<str>, Arc<str>>>;

/// Name → resource of what a client was sent.
pub type Sent = Arc<BTreeMap<Arc<str>, Arc<XdsResource>>>;

/// Resource names a client subscribed to.
pub type Names = Arc<BTreeSet<Arc<str>>>;

/// Everything one group of nodes may receive, by type and name.
///
/// A view also lends streams its wildcard sets as ready-made maps: every
/// node of a group usually holds exactly those, so a stream (and the
/// registry) that would keep an equal map keeps a pointer to the view's
/// instead — per idle node, no per-type maps at all.
#[derive(Debug, Default)]
pub struct View {
    types: [BTreeMap<Arc<str>, Entry>; 5],
    versions: [OnceLock<Versions>; 5],
    sent: [OnceLock<Sent>; 5],
    names: [OnceLock<Names>; 5],
}

impl View {
    /// Adds a resource.
    pub fn insert(&mut self, t: TypeUrl, resource: Arc<XdsResource>, in_wildcard: bool) {
        self.versions[t.index()] = OnceLock::new();
        self.sent[t.index()] = OnceLock::new();
        self.names[t.index()] = OnceLock::new();
        self.types[t.index()].insert(
            resource.name.clone(),
            Entry {
                resource,
                in_wildcard,
            },
        );
    }

    /// The resources of one type.
    pub fn of(&self, t: TypeUrl) -> &BTreeMap<Arc<str>, Entry> {
        &self.types[t.index()]
    }

    /// One resource.
    pub fn get(&self, t: TypeUrl, name: &str) -> Option<&Entry> {
        self.types[t.index()].get(name)
    }

    fn wildcard(&self, t: TypeUrl) -> impl Iterator<Item = &Arc<XdsResource>> {
        self.types[t.index()]
            .values()
            .filter(|e| e.in_wildcard)
            .map(|e| &e.resource)
    }

    fn versions(&self, t: TypeUrl) -> &Versions {
        self.versions[t.index()].get_or_init(|| {
            Arc::new(
                self.wildcard(t)
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect(),
            )
        })
    }

    fn sent(&self, t: TypeUrl) -> &Sent {
        self.sent[t.index()].get_or_init(|| {
            Arc::new(
                self.wildcard(t)
                    .map(|r| (r.name.clone(), r.clone()))
                    .collect(),
            )
        })
    }

    /// The view's own map if `mine` lists the same names and versions as
    /// the wildcard set of `t`.
    pub fn share_versions(&self, t: TypeUrl, mine: &Versions) -> Option<Versions> {
        let theirs = self.versions(t);
        (Arc::ptr_eq(theirs, mine) || theirs == mine).then(|| theirs.clone())
    }

    /// The view's own map if `mine` holds the same resources as the
    /// wildcard set of `t`.
    pub fn share_sent(&self, t: TypeUrl, mine: &Sent) -> Option<Sent> {
        let theirs = self.sent(t);
        let same = Arc::ptr_eq(theirs, mine)
            || (theirs.len() == mine.len()
                && theirs.iter().zip(mine.iter()).all(|((n1, a), (n2, b))| {
                    n1 == n2 && (Arc::ptr_eq(a, b) || a.version == b.version)
                }));
        same.then(|| theirs.clone())
    }

    /// The view's own set if `mine` names exactly the wildcard set of `t`
    /// (as Envoy does for EDS and RDS: every cluster, every route table).
    pub fn share_names(&self, t: TypeUrl, mine: &Names) -> Option<Names> {
        let theirs = self.names[t.index()]
            .get_or_init(|| Arc::new(self.wildcard(t).map(|r| r.name.clone()).collect()));
        (Arc::ptr_eq(theirs, mine) || theirs == mine).then(|| theirs.clone())
    }

    /// Name → version of `sent`: the view's map when `sent` is the view's.
    pub fn versions_of(&self, t: TypeUrl, sent: &Sent) -> Versions {
        if Arc::ptr_eq(self.sent(t), sent) {
            return self.versions(t).clone();
        }
        Arc::new(
            sent.values()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
        )
    }
}

/// The xDS rendering of one desired-state revision: a view per node group.
#[derive(Debug, Default)]
pub struct XdsSnapshot {
    /// The desired-state revision this was built from.
    pub revision: u64,
    /// Views by node group (`node.cluster`).
    pub groups: HashMap<String, Arc<View>>,
    /// The view of nodes whose group has no Gateway: only what is served
    /// to everyone (proxyless gRPC services).
    pub default_view: Arc<View>,
}

impl XdsSnapshot {
    /// The view for a node group.
    pub fn view(&self, group: &str) -> Arc<View> {
        self.groups
            .get(group)
            .cloned()
            .unwrap_or_else(|| self.default_view.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::cluster::v3::Cluster;

    fn cluster(name: &str, timeout: i64) -> Arc<XdsResource> {
        XdsResource::new(
            name,
            &Cluster {
                name: name.into(),
                connect_timeout: Some(portico_proto::google::protobuf::Duration {
                    seconds: timeout,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )
    }

    #[test]
    fn streams_share_the_views_maps_only_when_equal() {
        let mut view = View::default();
        view.insert(TypeUrl::Cluster, cluster("a", 1), true);
        view.insert(TypeUrl::Cluster, cluster("b", 1), true);
        view.insert(TypeUrl::Cluster, cluster("hidden", 1), false);
        let t = TypeUrl::Cluster;

        // Equal content (not the same pointer): the view's map comes back.
        let mine: Versions = Arc::new(
            [("a", 1), ("b", 1)]
                .into_iter()
                .map(|(n, v)| (Arc::from(n), cluster(n, v).version.clone()))
                .collect(),
        );
        let shared = view.share_versions(t, &mine).expect("equal");
        assert!(Arc::ptr_eq(
            &shared,
            &view.share_versions(t, &shared).expect("same")
        ));
        // Another version, or another name set: not shared.
        let mut other = shared.clone();
        Arc::make_mut(&mut other).insert("b".into(), cluster("b", 2).version.clone());
        assert!(view.share_versions(t, &other).is_none());
        // Changing a stream's copy leaves the view's map alone.
        assert_eq!(view.share_versions(t, &mine).expect("still").len(), 2);

        let sent: Sent = Arc::new(
            ["a", "b"]
                .into_iter()
                .map(|n| (Arc::from(n), cluster(n, 1)))
                .collect(),
        );
        let shared_sent = view.share_sent(t, &sent).expect("equal");
        assert!(Arc::ptr_eq(&view.versions_of(t, &shared_sent), &shared));
        assert_eq!(view.versions_of(t, &sent).len(), 2);

        let names: Names = Arc::new(["a", "b"].into_iter().map(Arc::from).collect());
        assert!(view.share_names(t, &names).is_some());
        let names: Names = Arc::new(["a"].into_iter().map(Arc::from).collect());
        assert!(view.share_names(t, &names).is_none());
    }
}
