//! Client Status Discovery (`envoy.service.status.v3`): what every
//! connected node was sent, ACKed and NACKed, per resource.

use std::sync::Arc;

use portico_proto::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use portico_proto::envoy::config::core::v3::Node;
use portico_proto::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, NodeMatcher};
use portico_proto::envoy::service::status::v3::client_config::GenericXdsConfig;
use portico_proto::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use portico_proto::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::registry::NodeStatus;
use super::resources::TypeUrl;
use super::stream::Shared;

/// The CSDS service.
pub fn server(shared: Arc<Shared>) -> ClientStatusDiscoveryServiceServer<Csds> {
    ClientStatusDiscoveryServiceServer::new(Csds { shared })
}

/// Answers CSDS from the node registry.
pub struct Csds {
    shared: Arc<Shared>,
}

impl Csds {
    fn answer(&self, req: &ClientStatusRequest) -> ClientStatusResponse {
        let config = self
            .shared
            .registry
            .list()
            .into_iter()
            .filter(|n| {
                req.node_matchers.is_empty() || req.node_matchers.iter().any(|m| matches(m, &n.id))
            })
            .map(client_config)
            .collect();
        ClientStatusResponse { config }
    }
}

fn matches(m: &NodeMatcher, id: &str) -> bool {
    match m.node_id.as_ref().and_then(|s| s.match_pattern.as_ref()) {
        Some(MatchPattern::Exact(e)) => e == id,
        Some(MatchPattern::Prefix(p)) => id.starts_with(p.as_str()),
        Some(MatchPattern::Suffix(s)) => id.ends_with(s.as_str()),
        Some(MatchPattern::Contains(c)) => id.contains(c.as_str()),
        _ => true,
    }
}

fn client_config(n: NodeStatus) -> ClientConfig {
    let mut generic = Vec::new();
    for t in TypeUrl::ALL {
        let Some(st) = n.types.get(t.short()) else {
            continue;
        };
        let synced = st.acked_version.is_some() && st.acked_version == st.sent_version;
        for (name, version) in st.resources.iter() {
            let (client_status, error_state) = match &st.nack {
                Some(details) if !synced => (
                    ClientResourceStatus::Nacked,
                    Some(UpdateFailureState {
                        details: details.clone(),
                        version_info: st.sent_version.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                ),
                _ if synced => (ClientResourceStatus::Acked, None),
                _ => (ClientResourceStatus::Requested, None),
            };
            generic.push(GenericXdsConfig {
                type_url: t.as_str().to_string(),
                name: name.to_string(),
                version_info: version.to_string(),
                config_status: if synced {
                    ConfigStatus::Synced
                } else {
                    ConfigStatus::NotSent
                } as i32,
                client_status: client_status as i32,
                error_state,
                ..Default::default()
            });
        }
    }
    ClientConfig {
        node: Some(Node {
            id: n.id,
            cluster: n.group,
            ..Default::default()
        }),
        generic_xds_configs: generic,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = ReceiverStream<Result<ClientStatusResponse, Status>>;

    async fn stream_client_status(
        &self,
        req: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let me = Csds {
            shared: self.shared.clone(),
        };
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                if tx.send(Ok(me.answer(&req))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_client_status(
        &self,
        req: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        Ok(Response::new(self.answer(req.get_ref())))
    }
}
