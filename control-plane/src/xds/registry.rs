//! Connected nodes and what each has ACKed or NACKed: the source of
//! `portico status` and of Client Status Discovery (CSDS).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::resources::{PerType, TypeUrl, Versions};

/// What kind of client a node is, from `node.user_agent_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// An Envoy proxy.
    Envoy,
    /// A proxyless gRPC client.
    Grpc,
    /// Portico's own data plane.
    Portico,
    /// Anything else.
    Other,
}

impl ClientKind {
    /// Classifies a user agent name.
    pub fn from_user_agent(ua: &str) -> ClientKind {
        let ua = ua.to_ascii_lowercase();
        if ua.contains("envoy") {
            ClientKind::Envoy
        } else if ua.starts_with("grpc") {
            ClientKind::Grpc
        } else if ua.contains("portico") {
            ClientKind::Portico
        } else {
            ClientKind::Other
        }
    }
}

/// One resource type's state on one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Version of the last response sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_version: Option<String>,
    /// Version the node last ACKed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_version: Option<String>,
    /// The node's error for the last NACKed response, until it ACKs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nack: Option<String>,
    /// Resources the node has been sent: name → version. The strings are
    /// shared with the resources themselves, so a node costs no copies.
    #[schema(value_type = BTreeMap<String, String>)]
    pub resources: Versions,
}

/// A connected xDS stream and its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`: the node group.
    pub group: String,
    /// The peer's address.
    pub address: String,
    /// Envoy, gRPC, Portico or other.
    pub client: ClientKind,
    /// `node.user_agent_name` and version.
    pub user_agent: String,
    /// `ads-sotw`, `ads-delta`, or a per-type service such as `lds-sotw`.
    pub stream: String,
    /// When the stream opened, RFC 3339.
    pub connected_at: String,
    /// Per type short name (`cds`, `eds`, `lds`, `rds`, `sds`).
    pub types: BTreeMap<String, TypeStatus>,
}

/// A connected stream as the registry keeps it: the node's status with its
/// per-type part held compactly (a [`NodeStatus`]'s map is built when
/// listed; thousands of idle nodes need not each carry one).
#[derive(Debug)]
struct Record {
    /// Without `address`, `connected_at` and `types`, filled in by `list`.
    node: NodeStatus,
    address: Option<SocketAddr>,
    connected_at: SystemTime,
    types: PerType<TypeStatus>,
}

/// Every connected stream, by stream id.
#[derive(Debug, Default)]
pub struct Registry {
    // Boxed: a map's spare slots then cost a pointer, not a record.
    nodes: Mutex<HashMap<u64, Box<Record>>>,
}

impl Registry {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<u64, Box<Record>>) -> T) -> T {
        f(&mut self.nodes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records a new stream.
    pub fn connect(
        &self,
        stream: u64,
        node: &portico_proto::envoy::config::core::v3::Node,
        address: Option<SocketAddr>,
        kind: &str,
    ) {
        let version = match &node.user_agent_version_type {
            Some(portico_proto::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
            _ => String::new(),
        };
        let status = NodeStatus {
            id: node.id.clone(),
            group: node.cluster.clone(),
            address: String::new(),
            client: ClientKind::from_user_agent(&node.user_agent_name),
            user_agent: format!("{} {version}", node.user_agent_name)
                .trim()
                .to_string(),
            stream: kind.to_string(),
            connected_at: String::new(),
            types: BTreeMap::new(),
        };
        self.with(|n| {
            n.insert(
                stream,
                Box::new(Record {
                    node: status,
                    address,
                    connected_at: SystemTime::now(),
                    types: PerType::default(),
                }),
            )
        });
    }

    /// Forgets a closed stream.
    pub fn disconnect(&self, stream: u64) {
        self.with(|n| n.remove(&stream));
    }

    /// Updates one type's status of a stream.
    pub fn update(&self, stream: u64, t: TypeUrl, f: impl FnOnce(&mut TypeStatus)) {
        self.with(|n| {
            if let Some(record) = n.get_mut(&stream) {
                f(record.types.slot(t));
            }
        });
    }

    /// Every connected node, ordered by id.
    pub fn list(&self) -> Vec<NodeStatus> {
        let mut out: Vec<NodeStatus> = self.with(|n| {
            n.values()
                .map(|r| NodeStatus {
                    address: r.address.map(|a| a.to_string()).unwrap_or_default(),
                    connected_at: humantime::format_rfc3339_seconds(r.connected_at).to_string(),
                    types: r
                        .types
                        .iter()
                        .map(|(t, st)| (t.short().to_string(), st.clone()))
                        .collect(),
                    ..r.node.clone()
                })
                .collect()
        });
        out.sort_by(|a, b| (&a.id, &a.stream).cmp(&(&b.id, &b.stream)));
        out
    }

    /// How many streams are connected.
    pub fn len(&self) -> usize {
        self.with(|n| n.len())
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
