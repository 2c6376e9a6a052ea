//! The desired state operators edit: Kubernetes-shaped documents
//! (`apiVersion: portico.dev/v1`, `kind`, `metadata`, `spec`).
//!
//! These types are the schema. Decoding ([`decode`]) turns raw YAML/JSON
//! into them, reporting every unknown field; validation (`crate::validate`)
//! checks values and cross-document rules. Nothing else in the control plane
//! reads raw documents.

pub mod api;
pub mod decode;
pub mod gateway;
pub mod service;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use api::ApiSpec;
pub use gateway::GatewaySpec;
pub use service::ServiceSpec;

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "portico.dev/v1";

/// The kinds of document in the desired state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Kind {
    /// Listeners served by a group of data-plane nodes.
    Gateway,
    /// An upstream: endpoints and how to reach them.
    Service,
    /// A versioned API product: hostnames, base path and routes.
    Api,
}

impl Kind {
    /// Every kind, in the order documents of each kind are listed.
    pub const ALL: [Kind; 3] = [Kind::Gateway, Kind::Service, Kind::Api];

    /// The canonical name, as written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "Gateway",
            Kind::Service => "Service",
            Kind::Api => "Api",
        }
    }

    /// The lower-case name used in URLs and resource keys (`api/pets`).
    pub fn slug(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Service => "service",
            Kind::Api => "api",
        }
    }

    /// Parses a kind as an operator types it: `Api`, `api`, `apis`, `svc`, ...
    pub fn parse_loose(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "gateway" | "gateways" | "gw" => Some(Kind::Gateway),
            "service" | "services" | "svc" => Some(Kind::Service),
            "api" | "apis" => Some(Kind::Api),
            _ => None,
        }
    }

    /// Parses the exact `kind:` value of a document.
    pub fn parse_exact(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one document: its kind and `metadata.name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct ResourceKey {
    /// The document's kind.
    pub kind: Kind,
    /// The document's `metadata.name`.
    pub name: String,
}

impl ResourceKey {
    /// A key from its parts.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ResourceKey {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceKey {
    /// `api/pets`: how problems and changes name a document.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.slug(), self.name)
    }
}

/// `metadata`: the name and free-form labels and annotations.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// Unique within the kind; lower-case letters, digits, `-` and `.`.
    pub name: String,
    /// Labels for selection and display.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations for tools and people; never interpreted by Portico.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A decoded document's `spec`, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Spec {
    /// `kind: Gateway`.
    Gateway(GatewaySpec),
    /// `kind: Service` (boxed: the largest spec by far).
    Service(Box<ServiceSpec>),
    /// `kind: Api`.
    Api(ApiSpec),
}

impl Spec {
    /// The kind this spec belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Gateway(_) => Kind::Gateway,
            Spec::Service(_) => Kind::Service,
            Spec::Api(_) => Kind::Api,
        }
    }
}

/// One decoded, schema-checked document of the desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `metadata`.
    pub metadata: Metadata,
    /// `spec`, typed by kind.
    pub spec: Spec,
}

impl Resource {
    /// The document's kind.
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// The document's key (`kind` + `metadata.name`).
    pub fn key(&self) -> ResourceKey {
        ResourceKey::new(self.kind(), self.metadata.name.clone())
    }

    /// The document as JSON, in canonical form (what the store keeps).
    pub fn to_json(&self) -> serde_json::Value {
        // Serializing plain data structs into a Value cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Document", 4)?;
        st.serialize_field("apiVersion", API_VERSION)?;
        st.serialize_field("kind", &self.kind())?;
        st.serialize_field("metadata", &self.metadata)?;
        st.serialize_field("spec", &self.spec)?;
        st.end()
    }
}

/// The JSON shape of a document, for the OpenAPI description; the code
/// works with [`Resource`].
#[derive(Serialize, ToSchema)]
#[schema(as = Document)]
#[allow(dead_code)]
#[serde(rename_all = "camelCase")]
pub struct DocumentSchema {
    /// Always `portico.dev/v1`.
    #[schema(example = "portico.dev/v1")]
    api_version: String,
    /// The kind; decides the shape of `spec`.
    kind: Kind,
    /// Name, labels, annotations.
    metadata: Metadata,
    /// The kind's settings.
    spec: Spec,
}

/// The whole desired state: every document, keyed and ordered. Documents
/// are shared, so the next state of a write is a cheap copy of the map.
pub type DesiredState = BTreeMap<ResourceKey, std::sync::Arc<Resource>>;
