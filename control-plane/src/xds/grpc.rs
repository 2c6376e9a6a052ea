//! A lean gRPC transport for the xDS streams, on hyper's HTTP/2 server.
//!
//! Why not tonic's server for these: tonic keeps, per stream, an 8 KiB
//! decode buffer and an encode buffer as large as the largest response
//! ever sent, for the life of the stream. An xDS server holds one mostly
//! idle stream per node, so that is most of its memory per node. Here each
//! response is encoded into a buffer of its own that is freed once written,
//! and requests are decoded from a buffer that shrinks back when idle.
//! Everything else (CSDS, the REST-style fetches) is handed to tonic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::unfold;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Code, Status};

use super::resources::TypeUrl;
use super::stream::{Scope, Shared};
use super::{delta, sotw};

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Largest request accepted, as gRPC's default.
const MAX_MESSAGE: usize = 4 << 20;

/// Which stream protocol a path asks for.
fn route(path: &str) -> Option<(Scope, bool)> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let scope = match service {
        "envoy.service.discovery.v3.AggregatedDiscoveryService" => {
            return match method {
                "StreamAggregatedResources" => Some((Scope::Ads, false)),
                "DeltaAggregatedResources" => Some((Scope::Ads, true)),
                _ => None,
            }
        }
        "envoy.service.listener.v3.ListenerDiscoveryService" => TypeUrl::Listener,
        "envoy.service.route.v3.RouteDiscoveryService" => TypeUrl::Route,
        "envoy.service.cluster.v3.ClusterDiscoveryService" => TypeUrl::Cluster,
        "envoy.service.endpoint.v3.EndpointDiscoveryService" => TypeUrl::Endpoint,
        "envoy.service.secret.v3.SecretDiscoveryService" => TypeUrl::Secret,
        _ => return None,
    };
    if method.starts_with("Stream") {
        Some((Scope::Only(scope), false))
    } else if method.starts_with("Delta") {
        Some((Scope::Only(scope), true))
    } else {
        None
    }
}

/// Serves xDS on `listener` until `stop` turns true. Paths this module
/// does not stream go to `fallback` (tonic's router for CSDS and fetches).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    fallback: tonic::service::Routes,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: not fatal; back off a moment.
                tracing::warn!(error = %e, "xDS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let fallback = fallback.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            let fallback = fallback.clone();
            async move { Ok::<_, Infallible>(handle(req, peer, shared, fallback).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Find dead peers without waiting for TCP to give up.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "xDS connection ended");
            }
        });
    }
    // Streams never end by themselves; give them a moment, then go.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut fallback: tonic::service::Routes,
) -> Response<Body> {
    let Some((scope, is_delta)) = route(req.uri().path()) else {
        use tower_service::Service;
        let req = req.map(tonic::body::Body::new);
        // Boxed: hyper keeps this future in every stream's task, and the
        // router's future is large; the xDS streams need none of it.
        return match Box::pin(fallback.call(req)).await {
            Ok(resp) => resp.map(|b| {
                b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed_unsync()
            }),
            Err(never) => match never {},
        };
    };
    let body = req.into_body();
    if is_delta {
        grpc_response(delta::spawn(
            shared,
            scope,
            Some(peer),
            Box::pin(decode_stream(body)),
        ))
    } else {
        grpc_response(sotw::spawn(
            shared,
            scope,
            Some(peer),
            Box::pin(decode_stream(body)),
        ))
    }
}

/// gRPC messages from a request body: 1 byte compressed flag, 4 bytes
/// big-endian length, then the message.
fn decode_stream<T: Message + Default + Send + 'static>(
    body: Incoming,
) -> impl Stream<Item = Result<Box<T>, Status>> + Send {
    let state = (body, BytesMut::new(), false);
    unfold(state, |(mut body, mut buf, done)| async move {
        if done {
            return None;
        }
        loop {
            if buf.len() >= 5 {
                let compressed = buf[0];
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if compressed != 0 {
                    let err = Status::unimplemented("compressed gRPC messages are not accepted");
                    return Some((Err(err), (body, buf, true)));
                }
                if len > MAX_MESSAGE {
                    let err = Status::resource_exhausted(format!(
                        "a request of {len} bytes is over the {MAX_MESSAGE}-byte limit"
                    ));
                    return Some((Err(err), (body, buf, true)));
                }
                if buf.len() >= 5 + len {
                    buf.advance(5);
                    let msg = buf.split_to(len);
                    let item = T::decode(msg.freeze())
                        .map(Box::new)
                        .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")));
                    // Give the buffer back once it is drained: an idle
                    // stream then holds none.
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                    return Some((item, (body, buf, false)));
                }
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.put(data);
                    }
                }
                Some(Err(e)) => {
                    let err = Status::unavailable(format!("reading the request stream: {e}"));
                    return Some((Err(err), (body, buf, true)));
                }
                None => return None,
            }
        }
    })
}

/// The response: headers now, one DATA frame per message, trailers with
/// the final status when the stream task ends.
fn grpc_response<T: Message + Send + 'static>(
    rx: mpsc::Receiver<Box<Result<T, Status>>>,
) -> Response<Body> {
    let frames = unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(item) => match *item {
                Ok(msg) => {
                    let len = msg.encoded_len();
                    let mut buf = BytesMut::with_capacity(5 + len);
                    buf.put_u8(0);
                    buf.put_u32(len as u32);
                    // Encoding into a buffer of exactly the right size cannot fail.
                    let _ = msg.encode(&mut buf);
                    Some((Ok::<_, Infallible>(Frame::data(buf.freeze())), (rx, false)))
                }
                Err(status) => Some((Ok(Frame::trailers(trailers(&status))), (rx, true))),
            },
            None => Some((
                Ok(Frame::trailers(trailers(&Status::new(Code::Ok, "")))),
                (rx, true),
            )),
        }
    });
    let body = StreamBody::new(frames)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    resp
}

fn trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", (status.code() as i32).into());
    if !status.message().is_empty() {
        // gRPC percent-encodes everything outside printable ASCII, and '%'.
        let encoded: String = status
            .message()
            .bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        if let Ok(v) = hyper::header::HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_streams() {
        assert!(matches!(
            route(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            ),
            Some((Scope::Ads, true))
        ));
        assert!(matches!(
            route("/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes"),
            Some((Scope::Only(TypeUrl::Route), false))
        ));
        assert!(route("/envoy.service.route.v3.RouteDiscoveryService/FetchRoutes").is_none());
        assert!(
            route("/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus")
                .is_none()
        );
    }
}
