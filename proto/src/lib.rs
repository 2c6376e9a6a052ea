//! Wire types shared by Portico's control plane and data plane.
//!
//! The contract between them is Envoy's xDS v3 API, so this crate re-exports
//! the generated Envoy types from the `envoy-types` crate rather than
//! generating a second copy. Portico's own messages (for jobs Envoy has no
//! filter for) are added here as `.proto` files compiled with a pure-Rust
//! protobuf compiler, so building never needs a system `protoc`.

pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google;
pub use envoy_types::pb::xds;

/// Type URLs of the xDS resource types Portico serves.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener`.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration`.
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster`.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// `envoy.extensions.transport_sockets.tls.v3.Secret`.
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
}

/// A serialized `google.protobuf.FileDescriptorSet` of the Envoy messages a
/// data plane runs (listeners, routes, clusters, endpoints, the HTTP
/// connection manager, TLS, and the HTTP filters Portico uses), compiled at
/// build time from the `.proto` files `envoy-types` ships. The generated
/// types carry no reflection; this lets admin pages print resources as
/// Envoy's JSON.
pub const ENVOY_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Name;

    #[test]
    fn type_urls_match_the_generated_messages() {
        use envoy::config::{cluster::v3::Cluster, listener::v3::Listener};
        assert_eq!(Listener::type_url(), type_url::LISTENER);
        assert_eq!(Cluster::type_url(), type_url::CLUSTER);
    }
}
