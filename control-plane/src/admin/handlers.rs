//! Handlers of the admin API. Each documents itself for the OpenAPI
//! description with `#[utoipa::path]`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::types::*;
use super::{AdminState, ApiError, Author, JsonBody};
use crate::model::decode::SourceDocument;
use crate::model::{Kind, ResourceKey};
use crate::state::{WriteError, WriteOptions, WriteOutcome};
use crate::store::{Operation, Revision, StoreError};

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse_kind(kind: &str) -> Result<Kind, ApiError> {
    Kind::parse_loose(kind).ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown kind {kind:?}; expected one of gateway, service, api"
        ))
    })
}

fn source_documents(
    documents: Vec<serde_json::Value>,
    origins: Vec<String>,
) -> Result<Vec<SourceDocument>, ApiError> {
    if !origins.is_empty() && origins.len() != documents.len() {
        return Err(ApiError::bad_request(format!(
            "origins has {} entries for {} documents",
            origins.len(),
            documents.len()
        )));
    }
    Ok(documents
        .into_iter()
        .enumerate()
        .map(|(i, value)| SourceDocument {
            origin: origins
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("documents[{i}]")),
            value,
        })
        .collect())
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NoSuchRevision(r) => {
            ApiError::not_found(format!("revision {r} does not exist"))
        }
        other => ApiError::from(WriteError::Store(other)),
    }
}

/// Records a write's outcome in the metrics and shapes the response.
fn finish(
    shared: &AdminState,
    operation: Operation,
    started: Instant,
    dry_run: bool,
    result: Result<WriteOutcome, WriteError>,
) -> ApiResult<WriteResponse> {
    shared
        .metrics
        .write_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok(o) if o.committed.is_some() => "committed",
        Ok(_) if dry_run => "dry_run",
        Ok(_) => "unchanged",
        Err(_) => "rejected",
    };
    shared
        .metrics
        .writes
        .get_or_create(&crate::metrics::WriteLabels {
            operation: format!("{operation:?}").to_lowercase(),
            result: label.into(),
        })
        .inc();
    let mut outcome = result?;
    if outcome.committed.is_some() {
        update_gauges(shared);
    }
    if !dry_run {
        // A committed write answers with what changed, not the documents:
        // they can be large, and `GET /api/v1/revisions/{n}` has them.
        for c in &mut outcome.changes {
            c.before = None;
            c.after = None;
        }
    }
    Ok(Json(WriteResponse {
        revision: outcome.revision,
        committed: outcome.committed.is_some(),
        dry_run,
        changes: outcome.changes,
    }))
}

/// Sets the revision and document gauges from the current snapshot.
pub fn update_gauges(shared: &AdminState) {
    let snap = shared.state.snapshot();
    shared.metrics.revision.set(snap.revision.0 as i64);
    for kind in Kind::ALL {
        let n = snap.state.keys().filter(|k| k.kind == kind).count();
        shared
            .metrics
            .resources
            .get_or_create(&crate::metrics::KindLabels {
                kind: kind.slug().into(),
            })
            .set(n as i64);
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the desired state is loaded and the store answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, description = "store unavailable")))]
pub async fn readyz(State(shared): State<Arc<AdminState>>) -> impl IntoResponse {
    let store = shared.state.store().clone();
    match tokio::task::spawn_blocking(move || store.head()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}\n"),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store check failed: {e}\n"),
        ),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(shared): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI document")), security(("bearer" = [])))]
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
}

/// Any other path under `/api/v1`.
pub async fn api_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// The control plane's state at a glance.
#[utoipa::path(get, path = "/api/v1/status", tag = "meta",
    responses((status = 200, body = StatusResponse), (status = 401, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn status(State(shared): State<Arc<AdminState>>) -> ApiResult<StatusResponse> {
    let snap = shared.state.snapshot();
    let mut resources = BTreeMap::new();
    for kind in Kind::ALL {
        resources.insert(
            kind.slug().to_string(),
            snap.state.keys().filter(|k| k.kind == kind).count(),
        );
    }
    Ok(Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        revision: snap.revision,
        xds_revision: Revision(shared.xds.borrow().revision),
        resources,
        store: shared.state.store().describe(),
        uptime_seconds: shared.started.elapsed().as_secs(),
        nodes: shared.registry.list(),
    }))
}

/// Connected xDS nodes: per type what was sent, ACKed and NACKed.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "meta",
    responses((status = 200, body = NodeList), (status = 401, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn nodes(State(shared): State<Arc<AdminState>>) -> ApiResult<NodeList> {
    Ok(Json(NodeList {
        items: shared.registry.list(),
    }))
}

/// Every document.
#[utoipa::path(get, path = "/api/v1/resources", tag = "resources",
    responses((status = 200, body = ResourceList), (status = 401, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn list_all(State(shared): State<Arc<AdminState>>) -> ApiResult<ResourceList> {
    let snap = shared.state.snapshot();
    Ok(Json(ResourceList {
        revision: snap.revision,
        items: snap.state.values().map(|r| r.to_json()).collect(),
    }))
}

/// Every document of one kind.
#[utoipa::path(get, path = "/api/v1/resources/{kind}", tag = "resources",
    params(("kind" = String, Path, description = "gateway, service or api")),
    responses((status = 200, body = ResourceList), (status = 404, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn list_kind(
    State(shared): State<Arc<AdminState>>,
    Path(kind): Path<String>,
) -> ApiResult<ResourceList> {
    let kind = parse_kind(&kind)?;
    let snap = shared.state.snapshot();
    Ok(Json(ResourceList {
        revision: snap.revision,
        items: snap
            .state
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(_, r)| r.to_json())
            .collect(),
    }))
}

/// One document.
#[utoipa::path(get, path = "/api/v1/resources/{kind}/{name}", tag = "resources",
    params(("kind" = String, Path, description = "gateway, service or api"), ("name" = String, Path)),
    responses((status = 200, body = ResourceResponse), (status = 404, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn get_one(
    State(shared): State<Arc<AdminState>>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<ResourceResponse> {
    let key = ResourceKey::new(parse_kind(&kind)?, name);
    let snap = shared.state.snapshot();
    let res = snap
        .state
        .get(&key)
        .ok_or_else(|| ApiError::not_found(format!("{key} does not exist")))?;
    Ok(Json(ResourceResponse {
        revision: snap.revision,
        item: res.to_json(),
    }))
}

/// Deletes one document, as a new revision. Refused (422) while other
/// documents refer to it.
#[utoipa::path(delete, path = "/api/v1/resources/{kind}/{name}", tag = "resources",
    params(("kind" = String, Path), ("name" = String, Path), DeleteQuery),
    responses((status = 200, body = WriteResponse), (status = 404, body = ErrorResponse),
        (status = 409, body = ErrorResponse), (status = 422, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn delete_one(
    State(shared): State<Arc<AdminState>>,
    Extension(author): Extension<Author>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<WriteResponse> {
    let key = ResourceKey::new(parse_kind(&kind)?, name);
    let started = Instant::now();
    let opts = WriteOptions {
        author: author.0,
        message: q.message.unwrap_or_else(|| format!("delete {key}")),
        expect_revision: q.expect_revision.map(Revision),
        dry_run: false,
    };
    let result = shared.state.delete(key, opts).await;
    finish(&shared, Operation::Delete, started, false, result)
}

/// Creates or replaces documents atomically: all of them or none.
#[utoipa::path(post, path = "/api/v1/apply", tag = "state", request_body = ApplyRequest,
    responses((status = 200, body = WriteResponse), (status = 400, body = ErrorResponse),
        (status = 409, body = ErrorResponse), (status = 422, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn apply(
    State(shared): State<Arc<AdminState>>,
    Extension(author): Extension<Author>,
    JsonBody(req): JsonBody<ApplyRequest>,
) -> ApiResult<WriteResponse> {
    let started = Instant::now();
    let docs = source_documents(req.documents, req.origins)?;
    let opts = WriteOptions {
        author: author.0,
        message: req.message,
        expect_revision: req.expect_revision,
        dry_run: req.dry_run,
    };
    let result = shared.state.apply(docs, opts).await;
    finish(&shared, Operation::Apply, started, req.dry_run, result)
}

/// Checks documents against the current state without applying them.
#[utoipa::path(post, path = "/api/v1/validate", tag = "state", request_body = ValidateRequest,
    responses((status = 200, body = ValidateResponse), (status = 400, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn validate(
    State(shared): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<ValidateRequest>,
) -> ApiResult<ValidateResponse> {
    let docs = source_documents(req.documents, req.origins)?;
    let problems = shared.state.check(&docs);
    Ok(Json(ValidateResponse {
        valid: problems.is_empty(),
        problems,
    }))
}

/// Restores the state of an earlier revision, as a new revision.
#[utoipa::path(post, path = "/api/v1/rollback", tag = "state", request_body = RollbackRequest,
    responses((status = 200, body = WriteResponse), (status = 404, body = ErrorResponse),
        (status = 409, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn rollback(
    State(shared): State<Arc<AdminState>>,
    Extension(author): Extension<Author>,
    JsonBody(req): JsonBody<RollbackRequest>,
) -> ApiResult<WriteResponse> {
    let started = Instant::now();
    let message = if req.message.is_empty() {
        format!("rollback to revision {}", req.revision)
    } else {
        req.message
    };
    let opts = WriteOptions {
        author: author.0,
        message,
        expect_revision: req.expect_revision,
        dry_run: false,
    };
    let result = shared.state.rollback(req.revision, opts).await;
    finish(&shared, Operation::Rollback, started, false, result)
}

/// History, newest first.
#[utoipa::path(get, path = "/api/v1/revisions", tag = "state", params(RevisionsQuery),
    responses((status = 200, body = RevisionList)), security(("bearer" = [])))]
pub async fn revisions(
    State(shared): State<Arc<AdminState>>,
    Query(q): Query<RevisionsQuery>,
) -> ApiResult<RevisionList> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let before = q.before.map(Revision);
    let store = shared.state.store().clone();
    let head = shared.state.snapshot().revision;
    let items = tokio::task::spawn_blocking(move || store.revisions(limit, before))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_error)?;
    Ok(Json(RevisionList { head, items }))
}

/// One revision and the documents it changed, before and after.
#[utoipa::path(get, path = "/api/v1/revisions/{number}", tag = "state",
    params(("number" = u64, Path)),
    responses((status = 200, body = RevisionDetail), (status = 404, body = ErrorResponse)), security(("bearer" = [])))]
pub async fn revision(
    State(shared): State<Arc<AdminState>>,
    Path(number): Path<String>,
) -> ApiResult<RevisionDetail> {
    let number = number
        .parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("{number:?} is not a revision number")))?;
    let store = shared.state.store().clone();
    let (revision, changes) = tokio::task::spawn_blocking(move || store.revision(Revision(number)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_error)?;
    Ok(Json(RevisionDetail { revision, changes }))
}
