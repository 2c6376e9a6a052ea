//! `portico-dp`: Portico's data plane, a reverse proxy that takes all of its
//! configuration from an xDS control plane (Portico's or any other that
//! speaks Envoy's v3 API) and runs it with Envoy's semantics.
//!
//! - [`xds`] follows the ADS stream and applies updates atomically;
//! - [`config`] converts Envoy resources into immutable types once;
//! - [`snapshot`] holds the running configuration, swapped whole;
//! - [`proxy`] runs listeners and the request path;
//! - [`upstream`] holds clusters, endpoints, pools and load balancing;
//! - [`http1`] has the HTTP/1.1 wire pieces both sides share, and
//!   [`spare`] the header maps they reuse;
//! - [`admin`], [`stats`] and [`access_log`] are for the operator;
//! - [`shutdown`] drains every listener before the process exits.

pub mod access_log;
pub mod admin;
pub mod affinity;
pub mod bootstrap;
pub mod config;
pub(crate) mod h2;
pub mod header_names;
pub mod http1;
pub mod proxy;
pub mod shutdown;
pub mod snapshot;
pub mod spare;
pub mod stats;
pub mod upstream;
pub mod xds;
