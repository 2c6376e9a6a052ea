//! A small JSON client for the admin API, with errors that tell the
//! operator what to check.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use portico_cp::admin::types::ErrorResponse;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the address.
    #[error("cannot reach the Portico control plane at {server}: {reason}\n  is portico-cp running there? set --server or PORTICO_SERVER")]
    Unreachable {
        /// The server URL.
        server: String,
        /// Why.
        reason: String,
    },
    /// The token was missing or rejected.
    #[error("the control plane at {server} rejected the request (401): {message}\n  pass a valid token with --token, --token-file or PORTICO_TOKEN (the admin token is in <data-dir>/admin.token)")]
    Unauthorized {
        /// The server URL.
        server: String,
        /// The server's explanation.
        message: String,
    },
    /// The server answered with an error.
    #[error("{}", .body.error.message)]
    Api {
        /// The status code.
        status: StatusCode,
        /// The error body.
        body: ErrorResponse,
    },
    /// The server's answer made no sense.
    #[error("unexpected answer from {server}: {message}")]
    Protocol {
        /// The server URL.
        server: String,
        /// What was wrong.
        message: String,
    },
}

/// A client bound to one control plane and token.
pub struct Client {
    server: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

const TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// A client for `server` (`http://host:port`).
    pub fn new(server: String, token: Option<String>) -> Result<Self, ClientError> {
        if server.starts_with("https://") {
            return Err(ClientError::Protocol {
                server,
                message: "https is not supported by this release of the CLI; use http:// on a trusted network".into(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = HyperClient::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            server,
            token,
            http,
        })
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.server.trim_end_matches('/'), path);
        let protocol = |message: String| ClientError::Protocol {
            server: self.server.clone(),
            message,
        };
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(b).map_err(|e| protocol(e.to_string()))?
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| protocol(format!("bad URL {url}: {e}")))?;
        let response = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| ClientError::Unreachable {
                server: self.server.clone(),
                reason: format!("no answer within {}s", TIMEOUT.as_secs()),
            })?
            .map_err(|e| ClientError::Unreachable {
                server: self.server.clone(),
                reason: describe_connect_error(&e),
            })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(format!("reading the response: {e}")))?
            .to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| protocol(format!("bad JSON in the response: {e}")));
        }
        let body: ErrorResponse = serde_json::from_slice(&bytes).map_err(|_| {
            protocol(format!(
                "status {status} with a body that is not a Portico error: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))
        })?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized {
                server: self.server.clone(),
                message: body.error.message,
            });
        }
        Err(ClientError::Api { status, body })
    }
}

/// The innermost cause of a connection error is the useful part
/// ("Connection refused"), not hyper's wrapper text.
fn describe_connect_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}
