//! What `/config_dump` shows: every accepted resource with its version and
//! when it was accepted, in the shape of Envoy's admin `ConfigDump`.

use std::sync::Arc;
use std::time::SystemTime;

use portico_proto::google::protobuf::Any;
use serde_json::{json, Value};

use super::state::{State, Ty};

/// Type, name, version, body, accepted at.
type DumpItem = (Ty, Arc<str>, String, Arc<Any>, SystemTime);

/// A frozen copy of the accepted resources.
#[derive(Debug, Default)]
pub struct ConfigDump {
    items: Vec<DumpItem>,
    /// The last NACK sent, if any: (type URL, message).
    pub last_rejection: Option<(String, String)>,
}

impl ConfigDump {
    /// Captures the state.
    pub fn capture(s: &State, last_rejection: Option<(String, String)>) -> Self {
        let items = Ty::ALL
            .into_iter()
            .flat_map(|t| {
                s.raw(t)
                    .into_iter()
                    .map(move |(n, v, a, u)| (t, n, v, a, u))
            })
            .collect();
        ConfigDump {
            items,
            last_rejection,
        }
    }

    /// Envoy's JSON layout: one config per type with its dynamic resources.
    pub fn to_json(&self) -> Value {
        let of = |t: Ty| -> Vec<Value> {
            self.items
                .iter()
                .filter(|i| i.0 == t)
                .map(|(_, name, version, any, updated)| {
                    json!({
                        "name": name.as_ref(),
                        "version_info": version,
                        "last_updated": humantime::format_rfc3339_millis(*updated).to_string(),
                        "resource": {"@type": any.type_url, "bytes": any.value.len()},
                    })
                })
                .collect()
        };
        json!({
            "configs": [
                {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": of(Ty::Cluster)},
                {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": of(Ty::Endpoint)},
                {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": of(Ty::Listener)},
                {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": of(Ty::Route)},
            ],
            "last_rejection": self.last_rejection.as_ref().map(|(t, m)| json!({"type_url": t, "error": m})),
        })
    }
}
