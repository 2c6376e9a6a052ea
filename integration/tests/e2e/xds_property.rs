//! Property: after any sequence of applies, deletions and subscription
//! changes, every node converges to exactly what its group selects — the
//! same names and versions a fresh client of that group is sent.

use std::collections::{BTreeMap, BTreeSet};

use portico_integration::rng::Rng;
use portico_integration::xds_client::{
    channel, names, node, Delta, Sotw, CLUSTER, ENDPOINT, LISTENER, ROUTE,
};
use portico_integration::ControlPlane;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::xds_sotw::{apply, delete};

type State = BTreeMap<&'static str, BTreeMap<String, String>>;

const TYPES: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// A random valid desired state over two node groups.
fn random_state(rng: &mut Rng) -> Vec<Value> {
    let mut docs = Vec::new();
    let gateways: Vec<(String, &str)> = (0..1 + rng.below(4))
        .map(|i| {
            (
                format!("gw{i}"),
                if rng.below(2) == 0 { "g1" } else { "g2" },
            )
        })
        .collect();
    for (i, (name, group)) in gateways.iter().enumerate() {
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": name},
            "spec": {"nodeGroup": group, "listeners": [{"name": "http", "port": 8000 + i, "protocol": "HTTP"}]}}));
    }
    let services = 1 + rng.below(4);
    for s in 0..services {
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": format!("svc{s}")},
            "spec": {"endpoints": [{"address": "127.0.0.1", "port": 9000 + s + rng.below(3) * 100}]}}));
    }
    for a in 0..rng.below(5) {
        let gw = &gateways[rng.below(gateways.len() as u64) as usize].0;
        docs.push(json!({"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": format!("api{a}")},
            "spec": {"version": "v1", "gateways": [gw], "basePath": format!("/a{a}"), "lifecycle": {"state": "published"},
                     "routes": [{"match": {"path": "/"}, "action": {"service": format!("svc{}", rng.below(services)),
                                 "timeout": format!("{}s", 1 + rng.below(3))}}]}}));
    }
    docs
}

/// Replaces the whole state: apply the new documents, delete the rest.
fn replace_state(cp: &ControlPlane, docs: &[Value]) {
    apply(cp, docs);
    let keep: BTreeSet<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let all = cp.api("GET", "/api/v1/resources", None).json();
    let mut gone: Vec<(String, String)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .filter(|k| !keep.contains(k))
        .collect();
    // Apis first: they refer to the others.
    gone.sort_by_key(|(kind, _)| if kind == "api" { 0 } else { 1 });
    for (kind, name) in gone {
        delete(cp, &kind, &name);
    }
}

/// A node that behaves like Envoy: wildcard LDS/CDS, RDS for its
/// listeners, EDS for its clusters, plus random extra RDS names.
enum Client {
    Sotw(Sotw, BTreeMap<&'static str, (String, String)>),
    Delta(Delta),
}

struct Node {
    client: Client,
    state: State,
    extra_routes: BTreeSet<String>,
    group: &'static str,
}

impl Node {
    fn rds_names(&self) -> BTreeSet<String> {
        let mut n: BTreeSet<String> = self
            .state
            .get(LISTENER)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        n.extend(self.extra_routes.iter().cloned());
        n
    }

    fn eds_names(&self) -> BTreeSet<String> {
        self.state
            .get(CLUSTER)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn start(ch: Channel, id: &str, group: &'static str, delta: bool) -> Node {
        let mut node = Node {
            client: if delta {
                Client::Delta(Delta::open(ch, node(id, group)).await)
            } else {
                Client::Sotw(Sotw::open(ch, node(id, group)).await, BTreeMap::new())
            },
            state: TYPES.iter().map(|t| (*t, BTreeMap::new())).collect(),
            extra_routes: BTreeSet::new(),
            group,
        };
        for t in [CLUSTER, LISTENER] {
            match &mut node.client {
                Client::Sotw(s, _) => s.request(t, &[], "", "", None).await,
                Client::Delta(d) => d.request(t, &[], &[], "", &[]).await,
            }
        }
        node
    }

    /// Tells the server the RDS/EDS names this node wants now.
    async fn resubscribe(&mut self) {
        let rds: Vec<String> = self.rds_names().into_iter().collect();
        let eds: Vec<String> = self.eds_names().into_iter().collect();
        match &mut self.client {
            Client::Sotw(s, last) => {
                for (t, names) in [(ROUTE, &rds), (ENDPOINT, &eds)] {
                    let (v, n) = last.get(t).cloned().unwrap_or_default();
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    s.request(t, &refs, &v, &n, None).await;
                }
            }
            Client::Delta(d) => {
                for (t, names) in [(ROUTE, &rds), (ENDPOINT, &eds)] {
                    let have: BTreeSet<String> = self.state[t].keys().cloned().collect();
                    let want: BTreeSet<String> = names.iter().cloned().collect();
                    let sub: Vec<&str> = want.iter().map(String::as_str).collect();
                    let unsub: Vec<&str> = have.difference(&want).map(String::as_str).collect();
                    d.request(t, &sub, &unsub, "", &[]).await;
                    for n in &unsub {
                        self.state.get_mut(t).unwrap().remove(*n);
                    }
                }
            }
        }
    }

    /// Handles one response: update the local state, ACK, follow references.
    async fn step(&mut self) {
        let before = (self.rds_names(), self.eds_names());
        match &mut self.client {
            Client::Sotw(s, last) => {
                let r = s.recv().await;
                let t: &'static str = TYPES.into_iter().find(|t| *t == r.type_url).unwrap();
                let mut got: BTreeMap<String, String> = BTreeMap::new();
                for (name, any) in names(&r).into_iter().zip(&r.resources) {
                    got.insert(name, format!("{:x}", fingerprint(&any.value)));
                }
                let entry = self.state.get_mut(t).unwrap();
                if t == LISTENER || t == CLUSTER {
                    *entry = got;
                } else {
                    entry.extend(got);
                }
                last.insert(t, (r.version_info.clone(), r.nonce.clone()));
                let names_now: Vec<String> = if t == ROUTE {
                    self.rds_names().into_iter().collect()
                } else if t == ENDPOINT {
                    self.eds_names().into_iter().collect()
                } else {
                    Vec::new()
                };
                let refs: Vec<&str> = names_now.iter().map(String::as_str).collect();
                if let Client::Sotw(s, _) = &mut self.client {
                    s.ack(&r, &refs).await;
                }
            }
            Client::Delta(d) => {
                let r = d.recv().await;
                let t: &'static str = TYPES.into_iter().find(|t| *t == r.type_url).unwrap();
                let entry = self.state.get_mut(t).unwrap();
                for res in &r.resources {
                    entry.insert(
                        res.name.clone(),
                        format!("{:x}", fingerprint(&res.resource.as_ref().unwrap().value)),
                    );
                }
                for name in &r.removed_resources {
                    entry.remove(name);
                }
                d.ack(&r).await;
            }
        }
        // Keep RDS/EDS subscriptions in line with listeners and clusters.
        let after = (self.rds_names(), self.eds_names());
        if after != before {
            if let Client::Sotw(..) = self.client {
                // Drop what is no longer referenced, as Envoy does.
                let (rds, eds) = after.clone();
                self.state
                    .get_mut(ROUTE)
                    .unwrap()
                    .retain(|n, _| rds.contains(n));
                self.state
                    .get_mut(ENDPOINT)
                    .unwrap()
                    .retain(|n, _| eds.contains(n));
            }
            self.resubscribe().await;
        }
    }

    /// Whether the node's state matches what a fresh client is given.
    fn matches(&self, fresh: &State) -> bool {
        TYPES.iter().all(|t| {
            let mine = &self.state[t];
            let theirs = &fresh[t];
            match (&self.client, *t) {
                // SotW cannot say that a still-subscribed RDS/EDS name was
                // deleted; such a stale entry is allowed (rule 7).
                (Client::Sotw(..), ROUTE | ENDPOINT) => {
                    theirs.iter().all(|(n, v)| mine.get(n) == Some(v))
                }
                _ => mine == theirs,
            }
        })
    }
}

/// Content fingerprint of an encoded resource.
fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// What a brand-new client of `group` with these RDS/EDS names receives.
async fn fresh(
    ch: Channel,
    group: &str,
    rds: &BTreeSet<String>,
    eds_for: Option<&BTreeSet<String>>,
) -> State {
    let mut s = Sotw::open(ch, node("fresh", group)).await;
    let mut out: State = TYPES.iter().map(|t| (*t, BTreeMap::new())).collect();
    for t in [CLUSTER, LISTENER] {
        s.request(t, &[], "", "", None).await;
        let r = s.recv().await;
        for (n, any) in names(&r).into_iter().zip(&r.resources) {
            out.get_mut(t)
                .unwrap()
                .insert(n, format!("{:x}", fingerprint(&any.value)));
        }
    }
    let eds: BTreeSet<String> = eds_for
        .cloned()
        .unwrap_or_else(|| out[CLUSTER].keys().cloned().collect());
    for (t, want) in [(ROUTE, rds.clone()), (ENDPOINT, eds)] {
        let refs: Vec<&str> = want.iter().map(String::as_str).collect();
        s.request(t, &refs, "", "", None).await;
        // Nothing is sent when none of the names exist.
        let exists = match t {
            ROUTE => want.iter().any(|n| out[LISTENER].contains_key(n)),
            _ => want.iter().any(|n| out[CLUSTER].contains_key(n)),
        };
        if exists {
            let r = s.recv().await;
            for (n, any) in names(&r).into_iter().zip(&r.resources) {
                out.get_mut(t)
                    .unwrap()
                    .insert(n, format!("{:x}", fingerprint(&any.value)));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_converge_to_what_their_group_selects() {
    for seed in [
        0x9E37_79B9_7F4A_7C15u64,
        0xD1B5_4A32_D192_ED03,
        0x8CB9_2BA7_2F3D_8DD7,
    ] {
        let (_dir, cp) = super::fresh();
        let mut rng = Rng(seed);
        let ch = channel(&cp.xds_addr).await;
        let mut nodes = [
            Node::start(ch.clone(), "s1", "g1", false).await,
            Node::start(ch.clone(), "d1", "g1", true).await,
            Node::start(ch.clone(), "s2", "g2", false).await,
            Node::start(ch.clone(), "d2", "g2", true).await,
        ];
        for step in 0..10 {
            replace_state(&cp, &random_state(&mut rng));
            for n in nodes.iter_mut() {
                if rng.below(3) == 0 {
                    let extra = format!("gw{}/http", rng.below(5));
                    if !n.extra_routes.remove(&extra) {
                        n.extra_routes.insert(extra);
                    }
                    n.resubscribe().await;
                }
            }
            for n in nodes.iter_mut() {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    let want =
                        fresh(ch.clone(), n.group, &n.rds_names(), Some(&n.eds_names())).await;
                    if n.matches(&want) {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "seed {seed:#x} step {step}: node {} did not converge\nhas:  {:?}\nwant: {want:?}",
                        n.group,
                        n.state
                    );
                    n.step().await;
                }
            }
        }
    }
}
