//! `kind: Api` — a versioned API product: where it is served and its routes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An Api's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// The version this document describes: `v1`, `v2`, `v2beta1`.
    pub version: String,
    /// Names of the Gateways that serve this Api.
    pub gateways: Vec<String>,
    /// Host names the Api answers on; empty means every host the
    /// Gateways' listeners accept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Prefix of every route's path, e.g. `/pets/v1`; `/` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_path: Option<String>,
    /// Where the Api is in its life.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// The Api's routes; the first that matches a request wins.
    pub routes: Vec<Route>,
    /// Policies applied to every route (filled by later releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRef>,
}

/// The lifecycle of an Api version.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// `draft` (not served), `published`, `deprecated` (served, with
    /// `Deprecation`/`Sunset` headers), `retired` (not served).
    #[serde(default)]
    pub state: LifecycleState,
    /// RFC 3339 time the version was deprecated; required when `deprecated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at: Option<String>,
    /// RFC 3339 time after which the version stops being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset_at: Option<String>,
}

/// Lifecycle states of an Api version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleState {
    /// Being designed; not served.
    #[default]
    Draft,
    /// Served.
    Published,
    /// Served, announced for removal.
    Deprecated,
    /// No longer served.
    Retired,
}

impl LifecycleState {
    /// Whether gateways serve traffic for an Api in this state.
    pub fn is_served(self) -> bool {
        matches!(self, LifecycleState::Published | LifecycleState::Deprecated)
    }
}

/// One route: what it matches and what it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Optional name, unique within the Api; shown in logs and metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What requests this route takes.
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// What happens to them.
    pub action: RouteAction,
    /// Policies for this route only (filled by later releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRef>,
}

/// The request properties a route matches; all must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path below the Api's `basePath`; starts with `/` unless a regex.
    pub path: String,
    /// How `path` is compared; `prefix` unless set.
    #[serde(default)]
    pub path_type: PathType,
    /// HTTP methods; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query-parameter conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<QueryMatch>,
}

/// How a route's path is compared with the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PathType {
    /// The whole path, exactly.
    Exact,
    /// A path prefix, on `/` boundaries.
    #[default]
    Prefix,
    /// An RE2 regular expression over the whole path.
    Regex,
}

/// A condition on one request header. Exactly one of `exact`, `prefix`,
/// `regex`, `present` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value matches this RE2 regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The header is (`true`) or is not (`false`) present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Invert the condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// A condition on one query parameter. Exactly one of `exact`, `regex`,
/// `present` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueryMatch {
    /// Parameter name (case-sensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value matches this RE2 regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The parameter is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// What a route does. Exactly one of `service`, `services`, `redirect`,
/// `directResponse` is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteAction {
    /// Forward to this Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Forward to these Services, split by weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<WeightedService>,
    /// Replace the matched prefix (base path included) with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Time allowed for the whole request, e.g. `5s`; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Edits to the request before it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    /// Edits to the response before it is returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEdits>,
    /// Answer with a redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answer directly, without an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
}

/// One backend of a weighted split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightedService {
    /// The Service's name.
    pub name: String,
    /// Relative share, 1-10000.
    pub weight: u32,
}

/// Retry policy of a route (Envoy's `retry_policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try, 1-10.
    pub attempts: u32,
    /// Time allowed for each try, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Conditions: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-status-codes`; `connect-failure` unless set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Statuses retried under `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Base interval of the exponential back-off, e.g. `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// Header edits; applied as remove, then set, then add.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    /// Headers to replace (or create).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Headers to append.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Headers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A redirect answer. Unset parts keep the request's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Whole new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308; 301 unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

/// A response sent by the gateway itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    /// HTTP status, 200-599.
    pub status: u16,
    /// Body, at most 4 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// A policy attached to an Api or route. The policy types (API keys, JWT,
/// rate limits, ...) arrive in later releases; this release accepts none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// The policy type.
    #[serde(rename = "type")]
    pub policy_type: String,
    /// Type-specific settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub config: Option<serde_json::Value>,
}

/// The request path a route matches once the Api's base path is added:
/// `/pets` + `/` is `/pets`, `/pets` + `/{id}` is `/pets/{id}`.
pub fn full_path(base: &str, path: &str) -> String {
    match (base, path) {
        ("/", p) => p.to_string(),
        (b, "/") => b.to_string(),
        (b, p) => format!("{b}{p}"),
    }
}

/// Whether a listener host `pattern` (a host name or `*.suffix`) accepts
/// `host`; a wildcard host matches only an equal or narrower wildcard.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == host {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            bare.len() > suffix.len() + 1
                && bare.ends_with(suffix)
                && bare.as_bytes()[bare.len() - suffix.len() - 1] == b'.'
        }
        None => false,
    }
}
