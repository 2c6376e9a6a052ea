//! What `/config_dump` shows: every accepted resource with its version and
//! when it was accepted, in the shape of Envoy's admin `ConfigDump`.

use std::sync::Arc;
use std::time::SystemTime;

use portico_proto::google::protobuf::Any;
use portico_proto::ENVOY_DESCRIPTORS;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, SerializeOptions};
use prost_reflect::{ReflectMessage as _, Value as PValue};
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

    /// Envoy's JSON layout (`envoy.admin.v3.ConfigDump`): one config per
    /// type with its dynamic resources, each resource in Envoy's JSON
    /// (proto3 JSON with the proto field names, as Envoy prints it).
    pub fn to_json(&self) -> Value {
        // Decoded per dump, not kept: the pool is a few MB the proxy does
        // not need between dumps.
        let pool = DescriptorPool::decode(ENVOY_DESCRIPTORS).ok();
        let of = |t: Ty| -> Vec<Value> {
            self.items
                .iter()
                .filter(|i| i.0 == t)
                .map(|(_, name, version, any, updated)| {
                    let updated = humantime::format_rfc3339_millis(*updated).to_string();
                    let body = envoy_json(pool.as_ref(), any);
                    match t {
                        Ty::Listener => json!({
                            "name": name.as_ref(),
                            "active_state": {"version_info": version, "listener": body, "last_updated": updated},
                        }),
                        Ty::Route => {
                            json!({"version_info": version, "route_config": body, "last_updated": updated})
                        }
                        Ty::Cluster => {
                            json!({"version_info": version, "cluster": body, "last_updated": updated})
                        }
                        Ty::Endpoint => {
                            json!({"version_info": version, "endpoint_config": body, "last_updated": updated})
                        }
                    }
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

/// A resource as Envoy's JSON, `@type` first; a resource that cannot be
/// rendered (a message or an embedded `Any` of a type this build has no
/// descriptor for) says so instead of failing the whole dump.
fn envoy_json(pool: Option<&DescriptorPool>, any: &Any) -> Value {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let rendered = pool
        .ok_or_else(|| "descriptors unavailable".to_string())
        .and_then(|p| {
            p.get_message_by_name(name)
                .ok_or_else(|| format!("no descriptor for {name}"))
        })
        .and_then(|desc| {
            DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| e.to_string())
        })
        .map(|mut msg| {
            if let Some(sensitive) =
                pool.and_then(|p| p.get_extension_by_name("udpa.annotations.sensitive"))
            {
                redact(&mut msg, &sensitive, false);
            }
            msg
        })
        .and_then(|msg| {
            let opts = SerializeOptions::new().use_proto_field_name(true);
            msg.serialize_with_options(serde_json::value::Serializer, &opts)
                .map_err(|e| e.to_string())
        });
    match rendered {
        Ok(Value::Object(mut fields)) => {
            fields.insert("@type".into(), Value::String(any.type_url.clone()));
            Value::Object(fields)
        }
        Ok(other) => json!({"@type": any.type_url, "value": other}),
        Err(e) => json!({"@type": any.type_url, "error": format!("cannot render: {e}")}),
    }
}

/// What a redacted string or bytes field shows (Envoy's word).
const REDACTED: &str = "[redacted]";

/// Replaces what fields marked `udpa.annotations.sensitive` hold (private
/// keys, passwords, tokens) with `[redacted]`, as Envoy's own config dump
/// does: strings and bytes anywhere under such a field, including inside
/// embedded `Any`s, which are decoded, redacted and encoded again.
fn redact(msg: &mut DynamicMessage, sensitive: &ExtensionDescriptor, all: bool) {
    let desc = msg.descriptor();
    if desc.full_name() == "google.protobuf.Any" {
        let url = msg.get_field_by_name("type_url");
        let inner = url.as_deref().and_then(|u| u.as_str()).and_then(|u| {
            desc.parent_pool()
                .get_message_by_name(u.rsplit('/').next()?)
        });
        let bytes = msg
            .get_field_by_name("value")
            .and_then(|v| v.as_bytes().cloned());
        if let (Some(inner), Some(bytes)) = (inner, bytes) {
            match DynamicMessage::decode(inner, bytes) {
                Ok(mut m) => {
                    redact(&mut m, sensitive, all);
                    msg.set_field_by_name("value", PValue::Bytes(m.encode_to_vec().into()));
                }
                // Undecodable: show nothing of it rather than risk a secret.
                Err(_) => msg.set_field_by_name("value", PValue::Bytes(Default::default())),
            }
        }
        return;
    }
    for (field, value) in msg.fields_mut() {
        let hidden = all || field.options().get_extension(sensitive).as_bool() == Some(true);
        redact_value(value, sensitive, hidden);
    }
}

fn redact_value(v: &mut PValue, sensitive: &ExtensionDescriptor, hidden: bool) {
    match v {
        PValue::String(s) if hidden => *s = REDACTED.into(),
        PValue::Bytes(b) if hidden => *b = REDACTED.as_bytes().to_vec().into(),
        PValue::Message(m) => redact(m, sensitive, hidden),
        PValue::List(items) => items
            .iter_mut()
            .for_each(|i| redact_value(i, sensitive, hidden)),
        PValue::Map(entries) => entries
            .values_mut()
            .for_each(|i| redact_value(i, sensitive, hidden)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::cluster::v3::Cluster;
    use prost::Message;

    #[test]
    fn resources_render_as_envoy_json_and_unknown_types_say_so() {
        let pool = DescriptorPool::decode(ENVOY_DESCRIPTORS).expect("descriptors");
        let cluster = Cluster {
            name: "c1".into(),
            connect_timeout: Some(portico_proto::google::protobuf::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        };
        let any = Any {
            type_url: portico_proto::type_url::CLUSTER.into(),
            value: cluster.encode_to_vec(),
        };
        let v = envoy_json(Some(&pool), &any);
        assert_eq!(v["@type"], portico_proto::type_url::CLUSTER);
        assert_eq!(v["name"], "c1");
        assert_eq!(v["connect_timeout"], "2s", "{v}");
        // Secrets never show, also inside an embedded Any.
        use portico_proto::envoy::config::core::v3::{data_source, DataSource, TransportSocket};
        use portico_proto::envoy::extensions::transport_sockets::tls::v3::{
            CommonTlsContext, TlsCertificate, UpstreamTlsContext,
        };
        let tls = UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: vec![TlsCertificate {
                    private_key: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineString(
                            "-----BEGIN PRIVATE KEY----- SECRET".into(),
                        )),
                        ..Default::default()
                    }),
                    certificate_chain: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineString("CERT".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let with_tls = Cluster {
            name: "c2".into(),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(
                    portico_proto::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                        Any {
                            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext".into(),
                            value: tls.encode_to_vec(),
                        },
                    ),
                ),
            }),
            ..Default::default()
        };
        let any = Any {
            type_url: portico_proto::type_url::CLUSTER.into(),
            value: with_tls.encode_to_vec(),
        };
        let text = envoy_json(Some(&pool), &any).to_string();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert!(text.contains("CERT"), "only sensitive fields go: {text}");
        let odd = Any {
            type_url: "type.googleapis.com/example.Unknown".into(),
            value: vec![1, 2, 3],
        };
        let v = envoy_json(Some(&pool), &odd);
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("example.Unknown")),
            "{v}"
        );
    }
}
