//! A raw xDS client for tests and benchmarks: sends exactly the requests a
//! test writes and hands back every response, so protocol rules can be
//! checked one by one.

use std::collections::BTreeMap;
use std::time::Duration;

use portico_proto::envoy::config::core::v3::Node;
use portico_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use portico_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use portico_proto::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

pub use portico_proto::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// A node with the given id and group.
pub fn node(id: &str, group: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: group.to_string(),
        user_agent_name: "portico-test".to_string(),
        ..Default::default()
    }
}

/// Connects a channel to `addr` (`127.0.0.1:PORT`).
pub async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the xDS server")
}

/// How long a test waits for a response that must come.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A SotW ADS stream.
pub struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    /// The node sent on the first request.
    pub node: Node,
    first: bool,
}

impl Sotw {
    /// Opens an ADS stream on `channel`.
    pub async fn open(channel: Channel, node: Node) -> Sotw {
        let (tx, rx) = mpsc::channel(64);
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open ADS stream")
            .into_inner();
        Sotw {
            tx,
            rx,
            node,
            first: true,
        }
    }

    /// Sends a request; the node goes on the first one only.
    pub async fn request(
        &mut self,
        type_url: &str,
        names: &[&str],
        version: &str,
        nonce: &str,
        error: Option<&str>,
    ) {
        let req = DiscoveryRequest {
            node: if self.first {
                Some(self.node.clone())
            } else {
                None
            },
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(|m| RpcStatus {
                code: 3,
                message: m.to_string(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.first = false;
        self.tx.send(req).await.expect("send request");
    }

    /// Sends a raw request as given.
    pub async fn raw(&mut self, req: DiscoveryRequest) {
        self.first = false;
        self.tx.send(req).await.expect("send request");
    }

    /// ACKs a response.
    pub async fn ack(&mut self, resp: &DiscoveryResponse, names: &[&str]) {
        let (t, v, n) = (
            resp.type_url.clone(),
            resp.version_info.clone(),
            resp.nonce.clone(),
        );
        self.request(&t, names, &v, &n, None).await;
    }

    /// The next response; panics after [`PATIENCE`].
    pub async fn recv(&mut self) -> DiscoveryResponse {
        match tokio::time::timeout(PATIENCE, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(status)) => panic!("stream failed: {status}"),
            Err(_) => panic!("no response within {PATIENCE:?}"),
        }
    }

    /// The stream's ending status (for streams the server must refuse).
    pub async fn error(&mut self) -> tonic::Status {
        match tokio::time::timeout(PATIENCE, self.rx.message()).await {
            Ok(Err(status)) => status,
            Ok(Ok(other)) => panic!("expected an error status, got {other:?}"),
            Err(_) => panic!("no status within {PATIENCE:?}"),
        }
    }

    /// Asserts nothing arrives for `quiet` (the server must stay silent).
    pub async fn silent(&mut self, quiet: Duration) {
        if let Ok(r) = tokio::time::timeout(quiet, self.rx.message()).await {
            panic!("expected silence, got {r:?}");
        }
    }
}

/// A Delta ADS stream.
pub struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    /// The node sent on the first request.
    pub node: Node,
    first: bool,
}

impl Delta {
    /// Opens a Delta ADS stream on `channel`.
    pub async fn open(channel: Channel, node: Node) -> Delta {
        let (tx, rx) = mpsc::channel(64);
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open delta stream")
            .into_inner();
        Delta {
            tx,
            rx,
            node,
            first: true,
        }
    }

    /// Sends a request; the node goes on the first one only.
    pub async fn request(
        &mut self,
        type_url: &str,
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
        initial: &[(&str, &str)],
    ) {
        let req = DeltaDiscoveryRequest {
            node: if self.first {
                Some(self.node.clone())
            } else {
                None
            },
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: initial
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        };
        self.first = false;
        self.tx.send(req).await.expect("send request");
    }

    /// ACKs a response.
    pub async fn ack(&mut self, resp: &DeltaDiscoveryResponse) {
        let (t, n) = (resp.type_url.clone(), resp.nonce.clone());
        self.request(&t, &[], &[], &n, &[]).await;
    }

    /// NACKs a response.
    pub async fn nack(&mut self, resp: &DeltaDiscoveryResponse, message: &str) {
        let req = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: message.to_string(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("send request");
    }

    /// The next response; panics after [`PATIENCE`].
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(PATIENCE, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(status)) => panic!("stream failed: {status}"),
            Err(_) => panic!("no response within {PATIENCE:?}"),
        }
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn silent(&mut self, quiet: Duration) {
        if let Ok(r) = tokio::time::timeout(quiet, self.rx.message()).await {
            panic!("expected silence, got {r:?}");
        }
    }
}

/// Names in a SotW response, decoded from the `Any`s by type.
pub fn names(resp: &DiscoveryResponse) -> Vec<String> {
    use prost::Message;
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(
                any.type_url, resp.type_url,
                "every Any has the response's type_url"
            );
            match any.type_url.as_str() {
                LISTENER => {
                    portico_proto::envoy::config::listener::v3::Listener::decode(&*any.value)
                        .unwrap()
                        .name
                }
                ROUTE => {
                    portico_proto::envoy::config::route::v3::RouteConfiguration::decode(&*any.value)
                        .unwrap()
                        .name
                }
                CLUSTER => {
                    portico_proto::envoy::config::cluster::v3::Cluster::decode(&*any.value)
                        .unwrap()
                        .name
                }
                ENDPOINT => {
                    portico_proto::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                        &*any.value,
                    )
                    .unwrap()
                    .cluster_name
                }
                other => panic!("unexpected type {other}"),
            }
        })
        .collect()
}

/// Name → version of a Delta response's resources.
pub fn delta_versions(resp: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    resp.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}
