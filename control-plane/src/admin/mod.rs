//! The admin API: REST + JSON under `/api/v1`, health, and metrics.
//!
//! Everything under `/api/v1` (the OpenAPI document included) needs a
//! bearer token. `/healthz`, `/readyz` and `/metrics` do not, so probes
//! and scrapers work as they do against Envoy's admin port; bind the admin
//! listener to loopback or a private network.

mod error;
mod handlers;
mod openapi;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use handlers::update_gauges as handlers_update_gauges;
pub use openapi::openapi_json;

use crate::auth::TokenTable;
use crate::metrics::{self, Metrics};
use crate::state::StateService;

/// Largest request body accepted: a whole desired state in one apply.
const MAX_BODY: usize = 64 << 20;

/// What the admin handlers share.
pub struct AdminState {
    /// The desired state.
    pub state: Arc<StateService>,
    /// Valid tokens.
    pub tokens: TokenTable,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Connected xDS nodes.
    pub registry: Arc<crate::xds::registry::Registry>,
    /// What the xDS server serves.
    pub xds: tokio::sync::watch::Receiver<Arc<crate::xds::resources::XdsSnapshot>>,
    /// When the control plane started.
    pub started: Instant,
}

/// The author of a request, set by the auth middleware.
#[derive(Debug, Clone)]
pub struct Author(pub String);

/// Builds the admin router.
pub fn router(shared: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/api/v1/openapi.json", get(handlers::openapi))
        .route("/api/v1/status", get(handlers::status))
        .route("/api/v1/nodes", get(handlers::nodes))
        .route("/api/v1/resources", get(handlers::list_all))
        .route("/api/v1/resources/{kind}", get(handlers::list_kind))
        .route(
            "/api/v1/resources/{kind}/{name}",
            get(handlers::get_one).delete(handlers::delete_one),
        )
        .route("/api/v1/apply", post(handlers::apply))
        .route("/api/v1/validate", post(handlers::validate))
        .route("/api/v1/rollback", post(handlers::rollback))
        .route("/api/v1/revisions", get(handlers::revisions))
        .route("/api/v1/revisions/{number}", get(handlers::revision))
        .fallback(handlers::api_not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .merge(api)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

async fn authenticate(
    State(shared): State<Arc<AdminState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = presented else {
        return ApiError::unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' \
             (the admin token is in <data-dir>/admin.token)",
        )
        .into_response();
    };
    let Some(name) = shared.tokens.authenticate(token) else {
        return ApiError::unauthorized("the bearer token is not valid").into_response();
    };
    req.extensions_mut().insert(Author(name.to_string()));
    next.run(req).await
}

async fn count_requests(
    State(shared): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let response = next.run(req).await;
    shared
        .metrics
        .requests
        .get_or_create(&metrics::RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// A JSON body whose rejection is an [`ApiError`] in our format, with the
/// serde error's line, column and field.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(JsonBody)
            .map_err(|e| {
                ApiError::bad_request(format!("request body: {}: {}", e.path(), e.inner()))
            })
    }
}
