//! Request and response bodies of the admin API (`/api/v1`). The CLI
//! uses these same types, so the two cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::problem::Problem;
use crate::store::{Change, Revision, RevisionInfo};

/// `POST /api/v1/apply`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplyRequest {
    /// Documents to create or replace.
    #[schema(value_type = Vec<crate::model::DocumentSchema>)]
    pub documents: Vec<Value>,
    /// Where each document came from (`file.yaml#2`), for error messages;
    /// same length as `documents` when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// Message recorded with the revision.
    #[serde(default)]
    pub message: String,
    /// Fail with 409 unless the head is this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_revision: Option<Revision>,
    /// Validate and diff only.
    #[serde(default)]
    pub dry_run: bool,
}

/// The result of an apply, delete or rollback.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WriteResponse {
    /// The head after the write.
    pub revision: Revision,
    /// Whether a new revision was committed.
    pub committed: bool,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// What changed (or would change). Documents before and after are
    /// included only in dry runs; for a committed revision, read them from
    /// `GET /api/v1/revisions/{number}`.
    pub changes: Vec<Change>,
}

/// `POST /api/v1/validate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValidateRequest {
    /// Documents to check against the current state.
    #[schema(value_type = Vec<crate::model::DocumentSchema>)]
    pub documents: Vec<Value>,
    /// Where each document came from, as for apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
}

/// The verdict of a validation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidateResponse {
    /// True when there are no problems.
    pub valid: bool,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

/// `POST /api/v1/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackRequest {
    /// The revision whose state to restore.
    pub revision: Revision,
    /// Message recorded with the new revision.
    #[serde(default)]
    pub message: String,
    /// Fail with 409 unless the head is this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_revision: Option<Revision>,
}

/// Query of `DELETE /api/v1/resources/{kind}/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Fail with 409 unless the head is this revision.
    pub expect_revision: Option<u64>,
    /// Message recorded with the revision.
    pub message: Option<String>,
}

/// Documents of one kind (or all), as of one revision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceList {
    /// The revision listed.
    pub revision: Revision,
    /// The documents, ordered by kind and name.
    #[schema(value_type = Vec<crate::model::DocumentSchema>)]
    pub items: Vec<Value>,
}

/// One document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceResponse {
    /// The revision read.
    pub revision: Revision,
    /// The document.
    #[schema(value_type = crate::model::DocumentSchema)]
    pub item: Value,
}

/// Query of `GET /api/v1/revisions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct RevisionsQuery {
    /// At most this many (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Only revisions older than this.
    pub before: Option<u64>,
}

/// A page of history, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionList {
    /// The current head.
    pub head: Revision,
    /// The revisions.
    pub items: Vec<RevisionInfo>,
}

/// One revision and what it changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionDetail {
    /// The revision's record.
    pub revision: RevisionInfo,
    /// Its changes, with each document before and after.
    pub changes: Vec<Change>,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// The control plane's release.
    pub version: String,
    /// The current head.
    pub revision: Revision,
    /// The revision the xDS server is serving (equal to `revision` once
    /// the latest apply has been rendered).
    pub xds_revision: Revision,
    /// Documents per kind.
    pub resources: BTreeMap<String, usize>,
    /// Where the state is stored.
    pub store: String,
    /// Seconds since the control plane started.
    pub uptime_seconds: u64,
    /// Connected xDS nodes.
    pub nodes: Vec<crate::xds::registry::NodeStatus>,
}

/// `GET /api/v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeList {
    /// Every connected xDS stream, by node id.
    pub items: Vec<crate::xds::registry::NodeStatus>,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code: `unauthorized`, `not_found`,
    /// `bad_request`, `validation_failed`, `semantic_error`,
    /// `revision_conflict`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
    /// Every problem, for validation errors.
    #[serde(default)]
    pub details: Vec<Problem>,
}
