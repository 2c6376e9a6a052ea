//! Traffic shadowing (Envoy's `request_mirror_policies`): a copy of a
//! request goes to another cluster, fire and forget. The copy's host gets
//! `-shadow` appended (before any port) unless the policy says not to;
//! its answer is read and dropped, and nothing about it reaches the
//! client. It counts in the mirror cluster's stats and circuit breakers.
//!
//! A copy needs the request's body at hand: requests without one, and
//! bodies of known length up to the retry buffer's limit (buffered for
//! that), are mirrored; longer streamed bodies are not (Envoy streams them
//! to both).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Version};
use http_body_util::{BodyExt, Either, Full};

use super::body::Upstream;
use crate::config::route::Mirror;
use crate::snapshot::Snapshot;

/// What a copy is made of: the request as the primary cluster gets it.
pub(super) struct Copy<'a> {
    /// Its method.
    pub(super) method: &'a Method,
    /// Its path and query, after rewrites.
    pub(super) path_and_query: &'a str,
    /// Its headers, after edits (no `host`).
    pub(super) headers: &'a HeaderMap,
    /// The host the primary request carries.
    pub(super) host: Option<&'a HeaderValue>,
    /// Its whole body.
    pub(super) body: &'a Bytes,
    /// The route's timeout, which bounds the copy too.
    pub(super) timeout: Option<Duration>,
}

/// Sends the copies `mirrors` call for (each policy draws its share).
pub(super) fn send(snap: &Snapshot, mirrors: &[Mirror], copy: &Copy<'_>) {
    for m in mirrors {
        if m.fraction.is_some_and(|(n, d)| fastrand::u64(..d) >= n) {
            continue;
        }
        let Some(cluster) = snap.clusters.get(&m.cluster) else {
            continue;
        };
        if cluster.active.load(Relaxed) >= cluster.config.limits.max_requests {
            cluster
                .stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            continue;
        }
        let Some(ep) = cluster.pick(None, None) else {
            continue;
        };
        let host = match (&m.host, copy.host) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(h)) if m.keep_host => Some(h.clone()),
            (None, h) => h.map(shadow_host),
        };
        let uri = if cluster.config.http2 {
            super::handler::h2_uri(host.as_ref(), copy.path_and_query)
        } else {
            copy.path_and_query.parse::<http::Uri>()
        };
        let Ok(uri) = uri else {
            continue;
        };
        let mut req = Request::new(Either::Right(Full::new(copy.body.clone())));
        *req.method_mut() = copy.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = copy.headers.clone();
        if cluster.config.http2 {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else if let Some(h) = host {
            req.headers_mut().insert(header::HOST, h);
        }
        cluster.active.fetch_add(1, Relaxed);
        ep.active.fetch_add(1, Relaxed);
        cluster.stats.upstream_rq_total.fetch_add(1, Relaxed);
        let hold = Upstream {
            cluster: cluster.clone(),
            endpoint: ep.clone(),
            slot: None,
        };
        let timeout = copy.timeout;
        tokio::spawn(async move {
            let exchange = async {
                let (resp, slot) = ep.pool.send(req).await?;
                hold.cluster.stats.count_status(resp.status().as_u16());
                // Read to its end, so that the connection can be reused.
                let _ = resp.into_body().collect().await;
                drop(slot);
                Ok::<_, crate::upstream::pool::SendError>(())
            };
            let done = match timeout {
                Some(t) => tokio::time::timeout(t, exchange).await,
                None => Ok(exchange.await),
            };
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(cluster = %hold.cluster.config.name, error = %e, "mirrored request failed");
                }
                Err(_) => {
                    hold.cluster.stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                }
            }
            drop(hold);
        });
    }
}

/// `host` with `-shadow` after the name (`api:8080` → `api-shadow:8080`).
fn shadow_host(host: &HeaderValue) -> HeaderValue {
    let h = host.to_str().unwrap_or_default();
    // A port follows the last colon, unless that is inside an IPv6 literal.
    let (name, port) = match h.rfind(':') {
        Some(i) if !h[i..].contains(']') => h.split_at(i),
        _ => (h, ""),
    };
    HeaderValue::from_str(&format!("{name}-shadow{port}")).unwrap_or_else(|_| host.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_hosts() {
        let s = |h: &str| shadow_host(&HeaderValue::from_str(h).expect("value"));
        assert_eq!(s("api"), "api-shadow");
        assert_eq!(s("api.example:8080"), "api.example-shadow:8080");
        assert_eq!(s("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(s("[::1]"), "[::1]-shadow");
    }
}
