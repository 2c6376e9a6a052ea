//! The subset of Envoy's bootstrap file an operator already has: `node`,
//! `dynamic_resources.ads_config` pointing at a static cluster, and
//! `admin`. Anything else is an error that names every unknown field.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// What the proxy needs from a bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster` (the node group).
    pub node_cluster: String,
    /// `host:port` of the xDS server.
    pub xds_server: String,
    /// Delta ADS (`api_type: DELTA_GRPC`) or SotW (`GRPC`).
    pub delta: bool,
    /// `admin.address`.
    pub admin: Option<SocketAddr>,
}

/// Why a bootstrap file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Unreadable file.
    #[error("cannot read bootstrap {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid YAML or wrong types.
    #[error("bootstrap {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// Fields this proxy does not support.
    #[error("bootstrap {path}: unsupported field(s): {}", fields.join(", "))]
    Unknown {
        /// The file.
        path: String,
        /// Dotted paths of the fields.
        fields: Vec<String>,
    },
    /// Present but inconsistent.
    #[error("bootstrap {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct File {
    node: Option<NodeY>,
    dynamic_resources: Option<Dynamic>,
    static_resources: Option<Static>,
    admin: Option<Admin>,
    layered_runtime: Option<serde_yaml_ng::Value>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct NodeY {
    id: String,
    cluster: String,
    metadata: Option<serde_yaml_ng::Value>,
    locality: Option<serde_yaml_ng::Value>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Dynamic {
    ads_config: Option<Ads>,
    cds_config: Option<serde_yaml_ng::Value>,
    lds_config: Option<serde_yaml_ng::Value>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Ads {
    api_type: String,
    transport_api_version: Option<String>,
    #[serde(default)]
    grpc_services: Vec<GrpcService>,
    set_node_on_first_message_only: Option<bool>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct GrpcService {
    envoy_grpc: EnvoyGrpc,
    timeout: Option<String>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct EnvoyGrpc {
    cluster_name: String,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Static {
    #[serde(default)]
    clusters: Vec<StaticCluster>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct StaticCluster {
    name: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    connect_timeout: Option<String>,
    typed_extension_protocol_options: Option<serde_yaml_ng::Value>,
    http2_protocol_options: Option<serde_yaml_ng::Value>,
    load_assignment: LoadAssignment,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct LoadAssignment {
    cluster_name: Option<String>,
    endpoints: Vec<Locality>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Locality {
    lb_endpoints: Vec<LbEndpoint>,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct LbEndpoint {
    endpoint: EndpointY,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct EndpointY {
    address: AddressY,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct AddressY {
    socket_address: SocketAddressY,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct SocketAddressY {
    address: String,
    port_value: u16,
}

// Fields an Envoy bootstrap carries that this proxy accepts but does not
// use are kept so that such files load unchanged.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Admin {
    address: AddressY,
    access_log_path: Option<String>,
    access_log: Option<serde_yaml_ng::Value>,
}

impl Bootstrap {
    /// Reads and checks a bootstrap file.
    pub fn load(path: &Path) -> Result<Self, BootstrapError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Parses bootstrap YAML (or JSON); `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, BootstrapError> {
        let mut unknown = Vec::new();
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let f: File =
            serde_ignored::deserialize(de, |p| unknown.push(p.to_string().replace(".?", "")))
                .map_err(|e| BootstrapError::Syntax {
                    path: path.into(),
                    message: e.to_string(),
                })?;
        if !unknown.is_empty() {
            return Err(BootstrapError::Unknown {
                path: path.into(),
                fields: unknown,
            });
        }
        let invalid = |m: String| BootstrapError::Invalid {
            path: path.into(),
            message: m,
        };
        let node = f
            .node
            .ok_or_else(|| invalid("node is required (node.id and node.cluster)".into()))?;
        if node.id.is_empty() || node.cluster.is_empty() {
            return Err(invalid("node.id and node.cluster must not be empty".into()));
        }
        let ads = f
            .dynamic_resources
            .and_then(|d| d.ads_config)
            .ok_or_else(|| invalid("dynamic_resources.ads_config is required".into()))?;
        let delta = match ads.api_type.as_str() {
            "DELTA_GRPC" => true,
            "GRPC" => false,
            other => {
                return Err(invalid(format!(
                    "dynamic_resources.ads_config.api_type {other:?}: expected GRPC or DELTA_GRPC"
                )))
            }
        };
        if let Some(v) = ads.transport_api_version.as_deref() {
            if v != "V3" {
                return Err(invalid(format!("dynamic_resources.ads_config.transport_api_version {v:?}: only V3 is supported")));
            }
        }
        let [svc] = ads.grpc_services.as_slice() else {
            return Err(invalid("dynamic_resources.ads_config.grpc_services must name exactly one envoy_grpc cluster".into()));
        };
        let cluster_name = &svc.envoy_grpc.cluster_name;
        let clusters = f.static_resources.map(|s| s.clusters).unwrap_or_default();
        let c = clusters
            .iter()
            .find(|c| c.name == *cluster_name)
            .ok_or_else(|| invalid(format!("ads_config names cluster {cluster_name:?}, which static_resources.clusters does not define")))?;
        let sa = c
            .load_assignment
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| &e.endpoint.address.socket_address)
            .next()
            .ok_or_else(|| invalid(format!("static cluster {cluster_name:?} has no endpoint")))?;
        let admin = match f.admin {
            None => None,
            Some(a) => {
                let s = &a.address.socket_address;
                let ip: std::net::IpAddr = s.address.parse().map_err(|_| {
                    invalid(format!(
                        "admin.address {:?} is not an IP address",
                        s.address
                    ))
                })?;
                Some(SocketAddr::new(ip, s.port_value))
            }
        };
        let host = if sa.address.contains(':') {
            format!("[{}]", sa.address)
        } else {
            sa.address.clone()
        };
        Ok(Bootstrap {
            node_id: node.id,
            node_cluster: node.cluster,
            xds_server: format!("{host}:{}", sa.port_value),
            delta,
            admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: {id: edge-1, cluster: edge}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
    - name: xds
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {http2_protocol_options: {}}
      load_assignment:
        cluster_name: xds
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18000}}}}]}]
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
"#;

    #[test]
    fn an_envoy_bootstrap_is_understood() {
        let b = Bootstrap::parse(GOOD, "b.yaml").expect("parses");
        assert_eq!(b.node_id, "edge-1");
        assert_eq!(b.node_cluster, "edge");
        assert_eq!(b.xds_server, "127.0.0.1:18000");
        assert!(b.delta);
        assert_eq!(b.admin, Some("127.0.0.1:9901".parse().expect("addr")));
    }

    #[test]
    fn unknown_fields_are_all_named() {
        let text = GOOD.replace(
            "admin:\n",
            "overload_manager: {}\nadmin:\n  profile_path: /tmp/x\n",
        );
        let e = Bootstrap::parse(&text, "b.yaml").expect_err("unknown fields");
        let msg = e.to_string();
        assert!(
            msg.contains("overload_manager") && msg.contains("admin.profile_path"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_ads_cluster_is_named() {
        let text = GOOD.replace("cluster_name: xds}}", "cluster_name: nope}}");
        let msg = Bootstrap::parse(&text, "b.yaml")
            .expect_err("bad ref")
            .to_string();
        assert!(msg.contains("\"nope\""), "{msg}");
    }
}
