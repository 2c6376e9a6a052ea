//! Every admin API error becomes `{"error": {code, message, details}}`
//! with the status code that says whose fault it was.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::{ErrorBody, ErrorResponse};
use crate::problem::{Problem, ProblemClass};
use crate::state::WriteError;

/// An error answer of the admin API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<Problem>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: no valid token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500: our fault, never the caller's input.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 400 when any problem is with a document itself, 422 when every
    /// problem is about how valid documents fit together.
    pub fn invalid(problems: Vec<Problem>) -> Self {
        let semantic_only = problems.iter().all(|p| p.class == ProblemClass::Reference);
        let (status, code, what) = if semantic_only {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "semantic_error",
                "is inconsistent",
            )
        } else {
            (StatusCode::BAD_REQUEST, "validation_failed", "is invalid")
        };
        let message = format!(
            "the desired state {what}: {} problem{}; nothing was applied",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        ApiError {
            details: problems,
            ..Self::new(status, code, message)
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Invalid(problems) => ApiError::invalid(problems),
            e @ WriteError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "revision_conflict", e.to_string())
            }
            e @ (WriteError::NotFound(_) | WriteError::NoSuchRevision(_)) => {
                ApiError::not_found(e.to_string())
            }
            WriteError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                ApiError::internal(format!("the store failed: {e}"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
                details: self.details,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
