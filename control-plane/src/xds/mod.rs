//! The xDS server: the desired state rendered as Envoy v3 resources and
//! streamed to data-plane nodes, Envoys and proxyless gRPC clients.
//!
//! - [`resources`]: encoded, content-versioned resources and per-group views.
//! - [`translate`]: desired state → views.

pub mod resources;
pub mod translate;
