//! `kind: Gateway` — the listeners a group of data-plane nodes serves.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A Gateway's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The node group this Gateway configures; matched against a data-plane
    /// node's `node.cluster`.
    pub node_group: String,
    /// Ports the nodes listen on.
    pub listeners: Vec<Listener>,
}

/// One listening port of a Gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Unique within the Gateway.
    pub name: String,
    /// TCP port, 1-65535.
    pub port: u16,
    /// `HTTP` or `HTTPS`.
    pub protocol: ListenerProtocol,
    /// Host names accepted on this listener; empty means any. A leading
    /// `*.` matches any subdomain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// TLS settings; required for `HTTPS`, forbidden for `HTTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// The application protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ListenerProtocol {
    /// Plain HTTP/1.1 and h2c.
    #[serde(rename = "HTTP")]
    Http,
    /// TLS-terminated HTTP/1.1 and HTTP/2.
    #[serde(rename = "HTTPS")]
    Https,
}

/// TLS termination settings of a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// Certificates to serve, chosen by SNI.
    pub certificate_refs: Vec<SecretRef>,
}

/// A reference to a certificate or CA bundle by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The name of the referenced secret.
    pub name: String,
}
