//! The gRPC services: ADS (SotW and Delta), the per-type services, and
//! Client Status Discovery. Each stream runs in its own task.

use std::pin::Pin;
use std::sync::Arc;

use portico_proto::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use portico_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use portico_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use portico_proto::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use portico_proto::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use portico_proto::envoy::service::route::v3::route_discovery_service_server::{
    RouteDiscoveryService, RouteDiscoveryServiceServer,
};
use portico_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::resources::TypeUrl;
use super::stream::{Scope, Shared};
use super::{delta, sotw};

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// Responses travel boxed: tokio's channel allocates its slots in blocks
/// of 32 whatever the capacity, and a boxed slot is 8 bytes instead of a
/// whole response, per stream, idle or not.
fn unboxed<T: Send + 'static>(
    rx: mpsc::Receiver<Box<Result<T, Status>>>,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    Box::pin(ReceiverStream::new(rx).map(|b| *b))
}

/// Every xDS service, sharing one view of the state.
#[derive(Clone)]
pub struct XdsService {
    shared: Arc<Shared>,
}

impl XdsService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        XdsService { shared }
    }

    fn sotw(
        &self,
        scope: Scope,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Response<SotwStream> {
        let peer = req.remote_addr();
        Response::new(unboxed(sotw::spawn(
            self.shared.clone(),
            scope,
            peer,
            req.into_inner().map(|r| r.map(Box::new)),
        )))
    }

    fn delta(
        &self,
        scope: Scope,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Response<DeltaStream> {
        let peer = req.remote_addr();
        Response::new(unboxed(delta::spawn(
            self.shared.clone(),
            scope,
            peer,
            req.into_inner().map(|r| r.map(Box::new)),
        )))
    }

    /// Every xDS service as tonic routes. The streaming methods are served
    /// by [`super::grpc`] before a request gets here; these answer the
    /// rest (CSDS, REST-style fetches).
    pub fn routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(AggregatedDiscoveryServiceServer::new(self.clone()))
            .add_service(ListenerDiscoveryServiceServer::new(self.clone()))
            .add_service(RouteDiscoveryServiceServer::new(self.clone()))
            .add_service(ClusterDiscoveryServiceServer::new(self.clone()))
            .add_service(EndpointDiscoveryServiceServer::new(self.clone()))
            .add_service(SecretDiscoveryServiceServer::new(self.clone()))
            .add_service(super::csds::server(self.shared.clone()))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Ok(self.sotw(Scope::Ads, req))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(self.delta(Scope::Ads, req))
    }
}

/// The per-type services differ only in names and type.
macro_rules! per_type_service {
    ($trait:ident, $t:expr, $stream:ident, $StreamTy:ident, $delta:ident, $DeltaTy:ident, $fetch:ident) => {
        #[tonic::async_trait]
        impl $trait for XdsService {
            type $StreamTy = SotwStream;
            type $DeltaTy = DeltaStream;

            async fn $stream(
                &self,
                req: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<SotwStream>, Status> {
                Ok(self.sotw(Scope::Only($t), req))
            }

            async fn $delta(
                &self,
                req: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<DeltaStream>, Status> {
                Ok(self.delta(Scope::Only($t), req))
            }

            async fn $fetch(
                &self,
                _req: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                Err(Status::unimplemented(
                    "REST-style fetch is not served; use the streaming or ADS API",
                ))
            }
        }
    };
}

per_type_service!(
    ListenerDiscoveryService,
    TypeUrl::Listener,
    stream_listeners,
    StreamListenersStream,
    delta_listeners,
    DeltaListenersStream,
    fetch_listeners
);
per_type_service!(
    RouteDiscoveryService,
    TypeUrl::Route,
    stream_routes,
    StreamRoutesStream,
    delta_routes,
    DeltaRoutesStream,
    fetch_routes
);
per_type_service!(
    ClusterDiscoveryService,
    TypeUrl::Cluster,
    stream_clusters,
    StreamClustersStream,
    delta_clusters,
    DeltaClustersStream,
    fetch_clusters
);
per_type_service!(
    EndpointDiscoveryService,
    TypeUrl::Endpoint,
    stream_endpoints,
    StreamEndpointsStream,
    delta_endpoints,
    DeltaEndpointsStream,
    fetch_endpoints
);
per_type_service!(
    SecretDiscoveryService,
    TypeUrl::Secret,
    stream_secrets,
    StreamSecretsStream,
    delta_secrets,
    DeltaSecretsStream,
    fetch_secrets
);
