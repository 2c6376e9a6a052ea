//! A minimal SotW ADS server that serves whatever resources a test hands
//! it: a control plane that is not Portico's, so data-plane tests can use
//! Envoy features Portico's renderer does not emit (regex rewrites, hash
//! policies, endpoint health status, ...).
//!
//! Per stream and type it answers every request whose version differs from
//! the current one (a first request, or a NACK of an older one) and pushes
//! every change; ACKs of the current version get no answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use portico_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use portico_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use portico_proto::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Resources by type URL, with one version for the whole set.
#[derive(Default, Clone)]
struct Resources {
    version: u64,
    by_type: HashMap<String, Vec<(String, Any)>>,
}

/// A running server.
pub struct StaticXds {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<watch::Sender<Resources>>,
    /// Error details of NACKs received, newest last.
    pub nacks: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

/// Packs a named resource.
pub fn resource<M: Message + Name>(name: &str, msg: &M) -> (String, Any) {
    (
        name.to_string(),
        Any {
            type_url: M::type_url(),
            value: msg.encode_to_vec(),
        },
    )
}

impl StaticXds {
    /// Starts one on an ephemeral loopback port, serving nothing yet.
    pub fn start() -> StaticXds {
        let (rt, listener, addr) = crate::loopback_server();
        let (tx, _) = watch::channel(Resources::default());
        let state = Arc::new(tx);
        let nacks = Arc::new(Mutex::new(Vec::new()));
        let svc = Ads {
            state: state.clone(),
            nacks: nacks.clone(),
        };
        rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        StaticXds {
            addr,
            state,
            nacks,
            _rt: rt,
        }
    }

    /// Replaces the resources of one type (all of them) and pushes.
    pub fn set(&self, type_url: &str, resources: Vec<(String, Any)>) {
        self.state.send_modify(|r| {
            r.version += 1;
            r.by_type.insert(type_url.to_string(), resources);
        });
    }
}

#[derive(Clone)]
struct Ads {
    state: Arc<watch::Sender<Resources>>,
    nacks: Arc<Mutex<Vec<String>>>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn response(r: &Resources, type_url: &str, names: &[String], nonce: u64) -> DiscoveryResponse {
    let all = r.by_type.get(type_url).cloned().unwrap_or_default();
    DiscoveryResponse {
        version_info: r.version.to_string(),
        // LDS and CDS: everything; RDS and EDS: what was asked for.
        resources: all
            .into_iter()
            .filter(|(n, _)| names.is_empty() || names.contains(n))
            .map(|(_, a)| a)
            .collect(),
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let mut state = self.state.subscribe();
        let nacks = self.nacks.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // Per type: the names asked for and the version last sent.
            let mut subs: HashMap<String, (Vec<String>, u64)> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    req = inbound.next() => {
                        let Some(Ok(req)) = req else { return };
                        if let Some(e) = &req.error_detail {
                            nacks.lock().expect("nacks").push(e.message.clone());
                        }
                        let current = state.borrow().clone();
                        let sent = subs.get(&req.type_url).map(|s| s.1);
                        let changed_names = subs
                            .get(&req.type_url)
                            .is_none_or(|s| s.0 != req.resource_names);
                        let answer = sent.is_none()
                            || changed_names
                            || req.error_detail.is_some() && sent != Some(current.version);
                        // The version counts as sent only when it is: a
                        // change not yet pushed must still be pushed.
                        let recorded = if answer { current.version } else { sent.unwrap_or(0) };
                        subs.insert(req.type_url.clone(), (req.resource_names.clone(), recorded));
                        if answer {
                            nonce += 1;
                            let resp = response(&current, &req.type_url, &req.resource_names, nonce);
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                    changed = state.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let current = state.borrow_and_update().clone();
                        for (type_url, (names, sent)) in subs.iter_mut() {
                            if *sent == current.version {
                                continue;
                            }
                            *sent = current.version;
                            nonce += 1;
                            let resp = response(&current, type_url, names, nonce);
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("this test server speaks SotW only"))
    }
}
