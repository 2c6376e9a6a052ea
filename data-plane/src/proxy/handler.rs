//! One request through the gateway: find the route, then answer locally or
//! forward to a cluster with retries and timeouts (Envoy's router filter).

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::body::{Guard, RequestBody, ResponseBody, Upstream};
use super::edge::{Origin, X_FORWARDED_FOR};
use super::edits::{edit_order, Formatting, RouteEdits};
use super::http1::{FramingConflict, OnUpgrade, Upgraded};
use super::max_duration;
use super::mirror;
use super::path;
use super::stream_idle::{HasRouteIdle, Progress, Tracked, Watch};
use super::ListenerRuntime;
use crate::access_log::{grpc_status_for_http, Record};
use crate::config::listener::{EscapedSlashes, ListenerConfig, Routes, ServerHeader, StripPort};
use crate::config::matcher::{cookie_value, RequestHead};
use crate::config::route::{
    expected_timeout_ms, BodyBufferLimit, ClusterChoice, Edits, Forward, HashKey, HostRewrite,
    Redirect, RequireTls, Route, RouteAction, RouteTable, VirtualHost, WeightDraw, WeightedTarget,
};
use crate::snapshot::{Shared, Snapshot};
use crate::stats::Stats;
use crate::upstream::lb::{hash64, hash_values};
use crate::upstream::pool::{ReqBody, RespBody, SendError, SendResult};
use crate::upstream::{is_hashing, Cluster};

/// What a connection's requests share.
pub struct Conn {
    /// Proxy-wide state.
    pub shared: Arc<Shared>,
    /// The listener, updated in place when its config changes.
    pub listener: Arc<ArcSwap<ListenerRuntime>>,
    /// The client.
    pub peer: SocketAddr,
    /// The address the client connected to, when the listener logs.
    pub local: Option<SocketAddr>,
    /// The client's address as a header value (for `x-forwarded-for`).
    pub peer_ip: HeaderValue,
}

/// A request's outcome before it becomes a response.
struct Local<'a> {
    status: StatusCode,
    body: &'static str,
    flags: &'static str,
    /// The route's response header edits, when the router made this
    /// answer (boxed: errors are rare, and every request's future carries
    /// a `Local`).
    edits: Option<Box<RouteEdits<'a>>>,
}

fn local(status: StatusCode, body: &'static str, flags: &'static str) -> Local<'static> {
    Local {
        status,
        body,
        flags,
        edits: None,
    }
}

/// Serves one request; never fails (errors become local replies).
pub async fn handle(
    conn: Arc<Conn>,
    req: Request<RequestBody>,
    idle: Option<Arc<dyn HasRouteIdle>>,
) -> Result<Response<ResponseBody>, Infallible> {
    let shared = &conn.shared;
    shared.stats.downstream_rq_total.fetch_add(1, Relaxed);
    let lr = conn.listener.load_full();
    let mut req = req;
    // Who the request is from decides what of its head is kept; then the
    // request id, before anything else can answer (a 404 carries it too).
    let origin = super::edge::mutate(
        req.headers_mut(),
        conn.peer,
        &conn.peer_ip,
        &lr.config.client,
    );
    if lr.config.generate_request_id {
        if origin.edge && !lr.config.preserve_external_request_id {
            // A client's own id is not trusted (Envoy's rule).
            req.headers_mut().insert(&X_REQUEST_ID, request_id());
        } else if let http::header::Entry::Vacant(v) = req.headers_mut().entry(&X_REQUEST_ID) {
            // One lookup, not a check and then an insert: hashing a
            // non-standard name is a good part of a header map's cost.
            v.insert(request_id());
        }
    }
    let request_id = if lr.config.request_id_in_response {
        req.headers().get(&X_REQUEST_ID).cloned()
    } else {
        None
    };
    let mut guard = Guard::new(shared.stats.clone());
    if !lr.sinks.is_empty() {
        let mut rec = record(&req, &conn, origin, &lr.log_headers);
        if lr.log_filter_headers {
            rec.filter_headers = Some(Box::new(req.headers().clone()));
        }
        rec.keep_trailers = lr.log_trailers;
        guard.log = Some(Box::new((lr.sinks.clone(), rec, Instant::now())));
    }
    let snap = shared.snapshot.load_full();
    let grpc = is_grpc(req.headers());
    // The request as local_reply_config's filters see it, when no access
    // log keeps a record of it anyway.
    // Boxed: a record is large, and this future is moved whole.
    let mut reply_rec: Option<Box<Record>> = match (&lr.config.local_replies, &guard.log) {
        (Some(_), None) => Some(Box::new(record(&req, &conn, origin, &lr.log_headers))),
        _ => None,
    };
    let routed = route_request(&conn, &origin, &lr, &snap, req, &mut guard, idle.as_deref());
    let mut resp = match routed.await {
        // Direct responses and redirects are the proxy's own answers too:
        // the listener's local_reply_config maps them, and a gRPC client
        // gets them as a gRPC status (Envoy sends all three the same way).
        Ok(resp) => match resp.body() {
            Either::Right(body) if grpc || lr.config.local_replies.is_some() => {
                let text = String::from_utf8_lossy(body).into_owned();
                let status = resp.status();
                let (parts, _) = resp.into_parts();
                let own = Own {
                    status,
                    text: &text,
                    flags: "",
                    grpc,
                };
                own_answer(&lr.config, &mut guard, &mut reply_rec, own, parts)
            }
            _ => resp,
        },
        Err(mut l) => {
            if let Some(b) = guard.log.as_mut() {
                b.1.response_flags = l.flags.into();
                b.1.response_code_details = code_details(l.flags, l.status);
            }
            // The route's edits first; then the mapper and the gRPC form
            // (Envoy's order), and the body's own headers last.
            let mut parts = Response::new(()).into_parts().0;
            // The router says why it shed the request (Envoy's headers).
            if lr.config.envoy_headers {
                let said = match l.flags {
                    "UO" => Some("x-envoy-overloaded"),
                    "DO" => Some("x-envoy-drop-overload"),
                    _ => None,
                };
                if let Some(name) = said {
                    parts.headers.insert(name, HeaderValue::from_static("true"));
                }
            }
            if let Some(e) = l.edits.as_deref_mut() {
                e.apply_response(&mut parts.headers, l.status, l.flags);
            }
            if grpc || lr.config.local_replies.is_some() {
                let own = Own {
                    status: l.status,
                    text: l.body,
                    flags: l.flags,
                    grpc,
                };
                own_answer(&lr.config, &mut guard, &mut reply_rec, own, parts)
            } else {
                local_reply(l.status, l.body, parts)
            }
        }
    };
    match &lr.config.server_header {
        ServerHeader::Overwrite(v) => {
            resp.headers_mut().insert(header::SERVER, v.clone());
        }
        ServerHeader::AppendIfAbsent(v) => {
            if let header::Entry::Vacant(e) = resp.headers_mut().entry(header::SERVER) {
                e.insert(v.clone());
            }
        }
        ServerHeader::PassThrough => {}
    }
    if let Some(id) = request_id {
        resp.headers_mut().insert(&X_REQUEST_ID, id);
    }
    if let Some(via) = &lr.config.via {
        append_via(resp.headers_mut(), via);
    }
    let status = resp.status().as_u16();
    shared.stats.count_status(status);
    if let Some(b) = guard.log.as_mut() {
        b.1.response_code = status;
        b.1.grpc_request = grpc;
        b.1.grpc_status = crate::access_log::grpc_status(resp.headers());
        if b.1.response_code_details.is_empty() {
            b.1.response_code_details = match resp.body() {
                Either::Left(_) => "via_upstream",
                Either::Right(_) => "direct_response",
            };
        }
        b.1.response_headers =
            crate::access_log::logged_headers(&lr.log_response_headers, resp.headers());
    }
    let (parts, body) = resp.into_parts();
    let body = match body {
        Either::Left(incoming) => ResponseBody::upstream(incoming, guard),
        Either::Right(bytes) => ResponseBody::local(bytes, guard),
    };
    Ok(Response::from_parts(parts, body))
}

type Out = Response<Either<RespBody, Bytes>>;

/// Envoy's response code details for a local reply, by its flags.
fn code_details(flags: &str, status: StatusCode) -> &'static str {
    match flags {
        "NR" => "route_not_found",
        "NC" => "cluster_not_found",
        "UH" => "no_healthy_upstream",
        "UT" => "upstream_response_timeout",
        "UF" => "upstream_reset_before_response_started{connection_failure}",
        "UC" => "upstream_reset_before_response_started{connection_termination}",
        "UO" => "upstream_reset_before_response_started{overflow}",
        "UPE" => "upstream_reset_before_response_started{protocol_error}",
        "DO" => "drop_overload",
        "DT" => "max_duration_timeout",
        "UMSDR" => "upstream_max_stream_duration_reached",
        "" if status == StatusCode::REQUEST_TIMEOUT => "request_overall_timeout",
        "" if status == StatusCode::FORBIDDEN => "upgrade_failed",
        _ if status == StatusCode::UPGRADE_REQUIRED => "low_version",
        "DC" => "downstream_remote_disconnect",
        _ if status == StatusCode::BAD_REQUEST => "protocol_error",
        _ => "local_reply",
    }
}

/// The record `local_reply_config`'s filters read: the access log's when
/// the listener logs, else the one kept for them.
fn reply_record<'a>(guard: &'a mut Guard, kept: &'a mut Option<Box<Record>>) -> &'a mut Record {
    match guard.log.as_mut() {
        Some(b) => &mut b.1,
        None => kept.get_or_insert_with(Default::default),
    }
}

/// An answer of the proxy's own, before the listener shapes it.
struct Own<'a> {
    status: StatusCode,
    text: &'a str,
    /// Its response flags (`""` for direct responses and redirects).
    flags: &'static str,
    /// The request is gRPC.
    grpc: bool,
}

/// The proxy's own answer as the listener gives it: mapped by
/// `local_reply_config`, and as a gRPC status to a gRPC request, on the
/// head it had (a redirect's `location`, a direct response's edits).
fn own_answer(
    c: &ListenerConfig,
    guard: &mut Guard,
    kept: &mut Option<Box<Record>>,
    own: Own<'_>,
    mut parts: http::response::Parts,
) -> Out {
    let Some(replies) = &c.local_replies else {
        debug_assert!(own.grpc, "only gRPC answers need shaping without replies");
        return grpc_reply(own.status, own.text, own.flags, parts);
    };
    let rec = reply_record(guard, kept);
    if !own.flags.is_empty() {
        rec.response_flags = own.flags.into();
    }
    let reply = replies.reply(rec, own.status, own.text);
    if !own.grpc {
        return configured_reply(reply, parts, rec);
    }
    if let Some(e) = reply.edits {
        e.apply_response(&mut parts.headers, Some(rec));
    }
    grpc_reply(
        reply.status,
        &String::from_utf8_lossy(&reply.body),
        own.flags,
        parts,
    )
}

/// A local reply as `local_reply_config` made it, on the head it had.
fn configured_reply(
    r: crate::config::local_reply::Reply<'_>,
    mut parts: http::response::Parts,
    rec: &Record,
) -> Out {
    parts.status = r.status;
    let h = &mut parts.headers;
    h.insert(header::CONTENT_TYPE, r.content_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.body.len()));
    if let Some(e) = r.edits {
        e.apply_response(h, Some(rec));
    }
    Response::from_parts(parts, Either::Right(r.body))
}

fn local_reply(status: StatusCode, body: &'static str, mut parts: http::response::Parts) -> Out {
    parts.status = status;
    let h = &mut parts.headers;
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, Either::Right(Bytes::from_static(body.as_bytes())))
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`
/// and the like; not gRPC-Web), as Envoy decides it.
fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// A local reply to a gRPC request, as Envoy sends it: a trailers-only
/// response (`200`, `grpc-status` by the HTTP status's gRPC mapping unless
/// the head has one, `grpc-message` the text), which gRPC clients read as
/// the call's status rather than as a broken HTTP exchange.
fn grpc_reply(
    status: StatusCode,
    text: &str,
    flags: &str,
    mut parts: http::response::Parts,
) -> Out {
    parts.status = StatusCode::OK;
    let h = &mut parts.headers;
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.remove(header::CONTENT_LENGTH);
    if let header::Entry::Vacant(v) = h.entry("grpc-status") {
        // The call's own deadline passed: Envoy's one explicit status.
        let code = if flags == "DT" {
            4 // DEADLINE_EXCEEDED
        } else {
            grpc_status_for_http(status.as_u16())
        };
        v.insert(HeaderValue::from(code));
    }
    let message = grpc_message(text.trim_end());
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&message) {
            h.insert("grpc-message", v);
        }
    }
    Response::from_parts(parts, Either::Right(Bytes::new()))
}

/// `grpc-message`'s encoding: bytes outside printable ASCII, and `%`,
/// percent-encoded.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn record(
    req: &Request<RequestBody>,
    conn: &Conn,
    origin: Origin,
    logged: &[HeaderName],
) -> Record {
    let h = req.headers();
    let s = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let now = std::time::SystemTime::now();
    Record {
        start_time: humantime::format_rfc3339_millis(now).to_string(),
        started: Some(now),
        downstream_local_address: conn.local,
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        protocol: if req.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        bytes_received: h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0),
        x_forwarded_for: s(&header::FORWARDED).or_else(|| {
            h.get(&X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }),
        user_agent: s(&header::USER_AGENT),
        request_id: h
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authority: authority(req).unwrap_or_default().to_owned(),
        downstream_remote_address: origin.client.to_string(),
        downstream_direct_remote_address: conn.peer.to_string(),
        headers: crate::access_log::logged_headers(logged, h),
        ..Default::default()
    }
}

fn authority(req: &Request<RequestBody>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

/// Takes the port (any, or the listener's) and a trailing dot off the
/// request's host, in the request itself, as Envoy's HCM does before
/// routing: the upstream gets the host without them.
fn normalize_host(req: &mut Request<RequestBody>, c: &ListenerConfig) {
    let Some(host) = authority(req) else {
        return;
    };
    let (name, port) = split_host_port(host);
    let strip_port = match (c.strip_port, port) {
        (StripPort::Any, Some(_)) => true,
        (StripPort::Matching(p), Some(q)) => q.parse() == Ok(p),
        _ => false,
    };
    let name = if c.strip_trailing_host_dot {
        name.strip_suffix('.').unwrap_or(name)
    } else {
        name
    };
    let new = match (strip_port, port) {
        (false, Some(p)) => format!("{name}:{p}"),
        _ => name.to_owned(),
    };
    if new == host {
        return;
    }
    if req.uri().authority().is_some() {
        // Changed only when the new authority makes a valid URI: the
        // request keeps its own otherwise.
        let mut parts = req.uri().clone().into_parts();
        if let Ok(a) = new.parse() {
            parts.authority = Some(a);
            if let Ok(u) = http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
    }
    if req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&new) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

/// `host:port` → (`host`, `Some(port)`), leaving IPv6 literals whole.
fn split_host_port(h: &str) -> (&str, Option<&str>) {
    let at = if h.starts_with('[') {
        h.find(']').map(|e| e + 1)
    } else {
        h.rfind(':')
    };
    match at.map(|i| h.split_at(i)) {
        Some((name, rest)) if rest.len() > 1 && rest.as_bytes()[0] == b':' => {
            (name, Some(&rest[1..]))
        }
        Some((name, "")) => (name, None),
        _ => (h, None),
    }
}

/// Rewrites the request's path as the listener asks ([`path`]), keeping
/// an absolute-form URI's scheme and authority. `Ok(Some(_))` is the
/// answer instead: a redirect to the path without escaped slashes.
fn normalize_path(
    req: &mut Request<RequestBody>,
    config: &ListenerConfig,
    stats: &Stats,
) -> Result<Option<Out>, Local<'static>> {
    let failed = || {
        stats
            .downstream_rq_failed_path_normalization
            .fetch_add(1, Relaxed);
        local(StatusCode::BAD_REQUEST, "invalid request path\n", "DPE")
    };
    let slashes = config.escaped_slashes;
    let how = path::Rewrites {
        normalize: config.normalize_path,
        merge_slashes: config.merge_slashes,
        unescape_slashes: matches!(slashes, EscapedSlashes::Redirect | EscapedSlashes::Forward),
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let done = path::normalize(pq, how).map_err(|_| failed())?;
    if done.escaped_slashes {
        match slashes {
            EscapedSlashes::Reject => return Err(failed()),
            // A gRPC client does not follow redirects (Envoy's rule).
            EscapedSlashes::Redirect if is_grpc(req.headers()) => return Err(failed()),
            EscapedSlashes::Redirect => {
                stats
                    .downstream_rq_redirected_with_normalized_path
                    .fetch_add(1, Relaxed);
                let to = done.path_and_query.as_deref().unwrap_or(pq);
                let location = HeaderValue::from_str(to).map_err(|_| failed())?;
                let mut r = Response::new(Either::Right(Bytes::new()));
                *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                r.headers_mut().insert(header::LOCATION, location);
                return Ok(Some(r));
            }
            EscapedSlashes::Keep | EscapedSlashes::Forward => {}
        }
    }
    let Some(new) = done.path_and_query else {
        return Ok(None);
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(new.parse().map_err(|_| failed())?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| failed())?;
    Ok(None)
}

async fn route_request<'a>(
    conn: &Conn,
    origin: &Origin,
    lr: &'a ListenerRuntime,
    snap: &'a Snapshot,
    mut req: Request<RequestBody>,
    guard: &mut Guard,
    idle: Option<&dyn HasRouteIdle>,
) -> Result<Out, Local<'a>> {
    let stats = &conn.shared.stats;
    if req.extensions().get::<FramingConflict>().is_some() {
        // The smuggling vector (RFC 9112 section 6.1); the connection
        // closes after this answer.
        return Err(local(
            StatusCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding\n",
            "DPE",
        ));
    }
    let c = &lr.config;
    if req.version() == Version::HTTP_10 {
        if !c.http10.accept {
            // Envoy's default: HTTP/1.0 is served only when asked for.
            return Err(local(StatusCode::UPGRADE_REQUIRED, "", "DPE"));
        }
        if let (Some(h), None) = (&c.http10.default_host, authority(&req)) {
            req.headers_mut().insert(header::HOST, h.clone());
        }
    }
    if c.normalize_path || c.merge_slashes || c.escaped_slashes != EscapedSlashes::Keep {
        if let Some(redirect) = normalize_path(&mut req, c, stats)? {
            return Ok(redirect);
        }
    }
    if c.strip_port != StripPort::Keep || c.strip_trailing_host_dot {
        normalize_host(&mut req, c);
    }
    let Some(host) = authority(&req) else {
        return Err(local(
            StatusCode::BAD_REQUEST,
            "missing host header\n",
            "DPE",
        ));
    };
    let table: &RouteTable = match &lr.config.routes {
        Routes::Inline(t) => t,
        Routes::Rds(name) => match snap.routes.get(name) {
            Some(t) => t,
            None => {
                stats.no_route.fetch_add(1, Relaxed);
                return Err(local(StatusCode::NOT_FOUND, "", "NR"));
            }
        },
    };
    let host = if !origin.internal && !table.internal_only_headers.is_empty() {
        // Before matching: a route may not be chosen by them either.
        for n in &table.internal_only_headers {
            req.headers_mut().remove(n);
        }
        authority(&req).unwrap_or_default()
    } else {
        host
    };
    // `vhost_header` picks the virtual host, when the request has it.
    let vh_host = match &table.vhost_header {
        Some(h) => req
            .headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(host),
        None => host,
    };
    let Some(vh) = table.virtual_host(vh_host, false) else {
        stats.no_route.fetch_add(1, Relaxed);
        return Err(local(StatusCode::NOT_FOUND, "", "NR"));
    };
    let to_tls = match vh.require_tls {
        RequireTls::No => false,
        RequireTls::ExternalOnly => !origin.internal,
        RequireTls::All => true,
    };
    if to_tls {
        // Every connection is plain until TLS comes (Envoy's 301).
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut r = Response::new(Either::Right(Bytes::new()));
        *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
        if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{pq}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(r);
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let head = RequestHead {
        method: req.method().as_str(),
        path,
        authority: host,
        scheme: "http",
        headers: req.headers(),
    };
    let Some(route) = vh.find(&head, table.ignore_path_parameters) else {
        stats.no_route.fetch_add(1, Relaxed);
        return Err(local(StatusCode::NOT_FOUND, "", "NR"));
    };
    if let Some(b) = guard.log.as_mut() {
        b.1.route_name = route.name.to_string();
    }
    // Most routes have no header edits at any level; then nothing below
    // costs more than this check.
    let edited = !(route.edits.is_empty() && vh.edits.is_empty() && table.edits.is_empty());
    let mut fmt = if edited {
        let levels = edit_order(None, &route.edits, &vh.edits, table);
        Formatting::new(&levels, route, |names| record(&req, conn, *origin, names))
    } else {
        None
    };
    // A weighted cluster's own edits, when one picked the cluster.
    let mut target_edits = None;
    let mut resp = match &route.action {
        RouteAction::Direct { status, body } => {
            let mut r = Response::new(Either::Right(body.clone()));
            *r.status_mut() = *status;
            if !body.is_empty() {
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            r
        }
        RouteAction::Redirect(rd) => redirect(rd, route, &req, host),
        RouteAction::Forward(fwd) => {
            if let (Some(slot), Some(t)) = (idle, fwd.idle_timeout) {
                slot.route_idle().set(t);
            }
            let picked = pick_cluster(snap, fwd, &req, origin.client);
            let target = picked.as_ref().and_then(|p| p.1);
            target_edits = target.and_then(|t| t.edits.as_deref());
            if target_edits.is_some_and(|e| e.formatted().contains(&true)) {
                // Built again with the weighted cluster's own values among
                // the rest, so that the record keeps what they read too.
                let levels = edit_order(target_edits, &route.edits, &vh.edits, table);
                fmt = Formatting::new(&levels, route, |names| record(&req, conn, *origin, names));
            }
            let edits = |l: Local<'static>, fmt: Option<Box<Formatting>>| Local {
                edits: Some(Box::new(RouteEdits {
                    target: target_edits,
                    route: &route.edits,
                    vh: &vh.edits,
                    table,
                    fmt,
                })),
                ..l
            };
            let Some((cluster, _)) = picked else {
                stats.no_cluster.fetch_add(1, Relaxed);
                let l = local(fwd.cluster_not_found, "cluster not found\n", "NC");
                return Err(edits(l, fmt));
            };
            let to = Target {
                cluster,
                host: target.and_then(|t| t.host.as_ref()),
                edits: target_edits,
            };
            let sent = forward(
                conn,
                origin,
                lr,
                snap,
                (table, vh, route, fwd),
                to,
                req,
                guard,
                fmt.as_deref_mut().map(|f| &mut f.rec),
            )
            .await;
            match sent {
                Ok(r) => r,
                Err(l) => return Err(edits(l, fmt)),
            }
        }
    };
    if edited || target_edits.is_some() {
        let status = resp.status();
        let order = edit_order(target_edits, &route.edits, &vh.edits, table);
        super::edits::apply_response(order, fmt.as_deref_mut(), resp.headers_mut(), status);
    }
    Ok(resp)
}

fn redirect(rd: &Redirect, route: &Route, req: &Request<RequestBody>, host: &str) -> Out {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
    let mut new_path = if let Some(p) = &rd.path {
        p.clone()
    } else if let Some(prefix) = &rd.prefix {
        let n = route.matched_prefix_len(path).min(path.len());
        format!("{prefix}{}", &path[n..])
    } else if let Some(re) = &rd.regex {
        re.apply(path)
    } else {
        path.to_owned()
    };
    if let (Some(q), false, false) = (query, rd.strip_query, new_path.contains('?')) {
        new_path = format!("{new_path}?{q}");
    }
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    };
    let h = rd.host.as_deref().unwrap_or(h);
    let port = rd.port.map(|p| p.to_string()).or(if rd.scheme.is_some() {
        None
    } else {
        port.map(str::to_owned)
    });
    let location = match port {
        Some(p) => format!("{scheme}://{h}:{p}{new_path}"),
        None => format!("{scheme}://{h}{new_path}"),
    };
    let mut r = Response::new(Either::Right(Bytes::new()));
    *r.status_mut() = rd.status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static X_ENVOY_IS_TIMEOUT_RETRY: HeaderName = HeaderName::from_static("x-envoy-is-timeout-retry");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never travel past the proxy; with
/// `drop_te`, `te` too (HTTP/1.1 upstreams: only HTTP/2 carries
/// `te: trailers` end to end).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, drop_te: bool) {
    strip_hop_by_hop_and(h, keep_upgrade, drop_te, false);
}

/// [`strip_hop_by_hop`], and with `drop_expect` a request's
/// `Expect: 100-continue` too (the proxy asks for the body itself, unless
/// the listener's `proxy_100_continue` leaves that to the upstream).
fn strip_hop_by_hop_and(h: &mut HeaderMap, keep_upgrade: bool, drop_te: bool, drop_expect: bool) {
    const CONNECTION: u8 = 1;
    const UPGRADE: u8 = 2;
    const TRANSFER_ENCODING: u8 = 4;
    const KEEP_ALIVE_: u8 = 8;
    const PROXY_CONNECTION_: u8 = 16;
    const TE: u8 = 32;
    const EXPECT: u8 = 64;
    // One pass over the names (a length check each, mostly) says which are
    // present, so only those cost a hash lookup; most messages have none,
    // and a `Connection: keep-alive` costs two lookups, not eight.
    let mut found = 0u8;
    for n in h.keys() {
        found |= match n.as_str() {
            "connection" => CONNECTION,
            "upgrade" => UPGRADE,
            "transfer-encoding" => TRANSFER_ENCODING,
            "keep-alive" => KEEP_ALIVE_,
            "proxy-connection" => PROXY_CONNECTION_,
            "te" if drop_te => TE,
            "expect" if drop_expect => EXPECT,
            _ => 0,
        };
    }
    if found == 0 {
        return;
    }
    if found & CONNECTION != 0 {
        // Every header the Connection header names is this hop's too
        // (usually none: `keep-alive`, `close` and `upgrade` are handled
        // here anyway, so nothing is collected for them).
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.is_empty() || crate::http1::is_own_hop_token(t) {
                    continue;
                }
                // `from_bytes` lowercases.
                if let Ok(n) = HeaderName::from_bytes(t) {
                    listed.push(n);
                }
            }
        }
        for n in listed {
            h.remove(n);
        }
    }
    if !keep_upgrade {
        if found & CONNECTION != 0 {
            h.remove(header::CONNECTION);
        }
        if found & UPGRADE != 0 {
            h.remove(header::UPGRADE);
        }
    }
    if found & TRANSFER_ENCODING != 0 {
        h.remove(header::TRANSFER_ENCODING);
    }
    if found & KEEP_ALIVE_ != 0 {
        h.remove(&KEEP_ALIVE);
    }
    if found & PROXY_CONNECTION_ != 0 {
        h.remove(&PROXY_CONNECTION);
    }
    if found & TE != 0 {
        h.remove(header::TE);
    }
    if found & EXPECT != 0
        && h.get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        h.remove(header::EXPECT);
    }
}

/// The cluster a request goes to, and the weighted cluster entry that
/// named it (`None` for a route's one cluster or a cluster header).
fn pick_cluster<'a, 'f>(
    snap: &'a Snapshot,
    fwd: &'f Forward,
    req: &Request<RequestBody>,
    client: SocketAddr,
) -> Option<(&'a Arc<Cluster>, Option<&'f WeightedTarget>)> {
    let (name, target): (&str, _) = match &fwd.clusters {
        ClusterChoice::One(c) => (c, None),
        ClusterChoice::Weighted(w) => {
            let draw = match &w.draw {
                WeightDraw::Random => None,
                WeightDraw::Header(h) => {
                    let mut all = req.headers().get_all(h).iter();
                    match (all.next(), all.next()) {
                        (Some(v), None) => v.to_str().ok().and_then(|v| v.parse::<u64>().ok()),
                        _ => None,
                    }
                }
                WeightDraw::HashPolicy => {
                    request_hash(fwd, (req.headers(), req.uri()), client, None).0
                }
            };
            let t = w.pick(draw.unwrap_or_else(|| fastrand::u64(..)));
            (&t.name, Some(t))
        }
        ClusterChoice::Header(h) => (req.headers().get(h)?.to_str().ok()?, None),
    };
    Some((snap.clusters.get(name)?, target))
}

/// Where [`forward`] sends a request: the cluster, and what the weighted
/// cluster entry that picked it adds.
#[derive(Clone, Copy)]
struct Target<'a> {
    cluster: &'a Arc<Cluster>,
    /// The entry's `host_rewrite_literal`.
    host: Option<&'a HeaderValue>,
    /// The entry's header edits.
    edits: Option<&'a Edits>,
}

/// A request's hash for ring-hash balancing: its policies' hashes
/// combined as Envoy combines them (the hash so far rotated one bit, then
/// xor the next), up to a terminal policy once there is a hash. With
/// `cookie_from` (the client's connection), a cookie policy with a ttl
/// makes the missing cookie, to be set on the answer (boxed: rare, and
/// every request's future would carry it).
fn request_hash(
    fwd: &Forward,
    (headers, uri): (&HeaderMap, &http::Uri),
    client: SocketAddr,
    cookie_from: Option<SocketAddr>,
) -> (Option<u64>, Option<Box<HeaderValue>>) {
    let mut hash: Option<u64> = None;
    let mut set_cookie = None;
    for p in &fwd.hash {
        let v = match &p.key {
            // One value, as is: no copies.
            HashKey::Header(h, None) if headers.get_all(h).iter().nth(1).is_none() => {
                headers.get(h).map(|v| hash64(v.as_bytes()))
            }
            HashKey::Header(h, rewrite) => {
                let values: Vec<Vec<u8>> = headers
                    .get_all(h)
                    .iter()
                    .map(|v| match rewrite {
                        None => v.as_bytes().to_vec(),
                        Some(re) => re
                            .apply(&String::from_utf8_lossy(v.as_bytes()))
                            .into_bytes(),
                    })
                    .collect();
                (!values.is_empty()).then(|| hash_values(values))
            }
            HashKey::SourceIp => Some(hash64(client.ip().to_string())),
            // An empty value counts as none (Envoy's).
            HashKey::Cookie(c) => match cookie_value(headers, &c.name).filter(|v| !v.is_empty()) {
                Some(v) => Some(hash64(v)),
                None => match (&c.set, cookie_from) {
                    (Some(set), Some(peer)) => {
                        // Envoy's: the same for every request of the
                        // connection, so racing requests agree.
                        let value = format!("{:016x}", hash64(peer.to_string()));
                        set_cookie = set.header(&c.name, &value).map(Box::new);
                        Some(hash64(value.as_str()))
                    }
                    _ => None,
                },
            },
            HashKey::Query(q) => uri
                .query()
                .and_then(|qs| {
                    qs.split('&')
                        .find_map(|kv| kv.strip_prefix(q.as_str())?.strip_prefix('='))
                })
                .map(hash64),
        };
        if let Some(v) = v {
            hash = Some(hash.map_or(0, |h: u64| h.rotate_left(1)) ^ v);
        }
        if p.terminal && hash.is_some() {
            break;
        }
    }
    (hash, set_cookie)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    conn: &Conn,
    origin: &Origin,
    lr: &ListenerRuntime,
    snap: &Snapshot,
    (table, vh, route, fwd): (&RouteTable, &VirtualHost, &Route, &Forward),
    to: Target<'_>,
    mut req: Request<RequestBody>,
    guard: &mut Guard,
    mut fmt: Option<&mut Record>,
) -> Result<Out, Local<'static>> {
    let stats = &conn.shared.stats;
    let cluster = to.cluster;
    if let Some(r) = fmt.as_deref_mut() {
        r.upstream_cluster = cluster.config.name.to_string();
    }
    if let Some(b) = guard.log.as_mut() {
        b.1.upstream_cluster = cluster.config.name.to_string();
    }
    // The control plane's load shedding (EDS `drop_overloads`), before an
    // endpoint is chosen or a retry considered.
    if cluster.drops() {
        // Counted as the cluster's 503 too, as Envoy charges it.
        cluster
            .stats
            .upstream_rq_drop_overload
            .fetch_add(1, Relaxed);
        cluster.stats.count_status(503);
        return Err(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "drop overload\n",
            "DO",
        ));
    }
    let (hash, set_cookie) = if is_hashing(cluster) {
        request_hash(
            fwd,
            (req.headers(), req.uri()),
            origin.client,
            Some(conn.peer),
        )
    } else {
        (None, None)
    };
    // An internal request's own timeouts and retry conditions (boxed: the
    // rare case should not grow every request's future).
    let steer = origin.steered.then(|| {
        Box::new(super::steering::take(
            req.headers_mut(),
            fwd.retry.as_deref(),
        ))
    });
    // An HTTP/1.1 upgrade the configuration does not allow is refused,
    // as Envoy refuses it (403, upgrade_failed); `h2c` is only dropped.
    let upgrade_header = (req.version() == Version::HTTP_11)
        .then(|| req.headers().get(header::UPGRADE))
        .flatten();
    let asked_upgrade = match upgrade_header {
        Some(v) if !v.as_bytes().eq_ignore_ascii_case(b"h2c") => {
            let allowed =
                crate::config::upgrades::allowed(&fwd.upgrades, &lr.config.upgrades, v.as_bytes());
            if !allowed && asks_connection_upgrade(req.headers()) {
                return Err(local(StatusCode::FORBIDDEN, "", ""));
            }
            allowed
        }
        _ => false,
    };
    let down_upgrade = asked_upgrade
        .then(|| {
            req.extensions()
                .get::<OnUpgrade>()
                .and_then(OnUpgrade::take)
        })
        .flatten();
    let upgrade = down_upgrade.is_some();

    // The request as it goes upstream. The Host value is the client's own
    // (shared, not copied) unless the route rewrites it.
    // (A rewrite by a header or the path follows the route's header
    // edits, below; `auto_host_rewrite` follows the endpoint's pick.)
    let mut host_value = match &fwd.host_rewrite {
        HostRewrite::Literal(v) => Some(v.clone()),
        _ => match (to.host, req.uri().authority()) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(a)) => HeaderValue::from_str(a.as_str()).ok(),
            (None, None) => req.headers().get(header::HOST).cloned(),
        },
    };
    // Envoy's stream duration limit (the call's `grpc-timeout` where the
    // route allows it); nothing to compute unless one is configured.
    // The HCM's request timeout: the whole request must arrive in time
    // (unless the answer starts first).
    let request_deadline = lr
        .config
        .request_timeout
        .map(|t| tokio::time::Instant::now() + t);
    let stream_deadline = if fwd.max_stream.is_some() || lr.config.max_stream_duration.is_some() {
        max_duration::stream_limit(
            fwd.max_stream.as_ref(),
            lr.config.max_stream_duration,
            req.headers(),
        )
        .map(|t| tokio::time::Instant::now() + t)
    } else {
        None
    };
    // The deprecated `max_grpc_timeout` sets a gRPC call's route timeout
    // from its deadline (unless the route has a stream duration limit).
    let grpc_route_timeout = match &fwd.grpc_timeout {
        Some(g) if fwd.max_stream.is_none_or(|m| m.max.is_none()) && is_grpc(req.headers()) => {
            Some(max_duration::grpc_route_timeout(g, req.headers()))
        }
        _ => None,
    };
    let route_timeout = match steer.as_ref().and_then(|s| s.timeout) {
        Some(t) => t,
        None => grpc_route_timeout.unwrap_or(fwd.timeout),
    };
    let (parts, body) = req.into_parts();
    let original_uri = &parts.uri;
    let original_pq = original_uri.path_and_query().map_or("/", |p| p.as_str());
    let new_pq = rewrite_path(fwd, route, original_pq);
    let mut up_uri: Option<http::Uri> = None;
    let mut headers = parts.headers;
    strip_hop_by_hop_and(
        &mut headers,
        upgrade,
        !cluster.config.http2,
        !lr.config.proxy_100_continue,
    );
    if let Some(via) = &lr.config.via {
        append_via(&mut headers, via);
    }
    // The client's host, for `x-forwarded-host` when a rewrite replaces it.
    let mut forwarded_host = (fwd.append_x_forwarded_host
        && !matches!(fwd.host_rewrite, HostRewrite::Keep))
    .then(|| {
        original_uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
    })
    .flatten();
    let envoy_headers = lr.config.envoy_headers;
    if envoy_headers && (fwd.prefix_rewrite.is_some() || fwd.regex_rewrite.is_some()) {
        if let Ok(v) = HeaderValue::from_str(original_pq) {
            headers.insert(&X_ENVOY_ORIGINAL_PATH, v);
        }
    }
    for e in edit_order(to.edits, &route.edits, &vh.edits, table)
        .into_iter()
        .flatten()
    {
        e.apply_request(&mut headers, fmt.as_deref());
    }
    let rewritten = match &fwd.host_rewrite {
        HostRewrite::Literal(_) => true,
        HostRewrite::Header(name) => match headers.get(name).filter(|v| !v.is_empty()) {
            Some(v) => {
                host_value = Some(v.clone());
                true
            }
            None => false,
        },
        HostRewrite::PathRegex(s) => {
            let path = original_pq.split_once('?').map_or(original_pq, |(p, _)| p);
            match HeaderValue::from_str(&s.apply(path)) {
                Ok(v) => {
                    host_value = Some(v);
                    true
                }
                Err(_) => false,
            }
        }
        HostRewrite::Keep | HostRewrite::Auto => false,
    };
    if rewritten {
        if let Some(host) = forwarded_host.take() {
            append_forwarded_host(&mut headers, &host);
        }
    }
    // HTTP/2 carries the authority in the URI; HTTP/1.1 gets `host_value`
    // inserted over whatever is there.
    if cluster.config.http2 || host_value.is_none() {
        headers.remove(header::HOST);
    }

    // The most specific non-empty list of mirrors (Envoy does not merge).
    let mirrors = [&fwd.mirrors, &vh.mirrors, &table.mirrors]
        .into_iter()
        .find(|m| !m.is_empty())
        .map_or(&[][..], |m| m.as_slice());
    // Retries need the body again, and mirrors a copy: buffer it when it
    // is small.
    let retry = steer
        .as_ref()
        .and_then(|s| s.retry.as_ref())
        .or(fwd.retry.as_deref());
    let limit = BodyBufferLimit::bytes(fwd.body_buffer_limit, lr.config.body_buffer_limit);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = Some(body);
    let mut buffered: Option<Bytes> = None;
    let empty = body.as_ref().is_some_and(http_body::Body::is_end_stream);
    if empty {
        buffered = Some(Bytes::new());
        body = None;
    } else if (retry.is_some() || !mirrors.is_empty()) && declared.is_some_and(|n| n <= limit) {
        let b = body.take().expect("body present");
        // Boxed, as the other rare states below: every request's future
        // would otherwise carry their size (and be copied with it).
        let collect =
            Box::pin(Limited::new(b, usize::try_from(limit).unwrap_or(usize::MAX)).collect());
        let collected = match request_deadline {
            None => collect.await,
            Some(d) => match tokio::time::timeout_at(d, collect).await {
                Ok(c) => c,
                Err(_) => {
                    stats.downstream_rq_timeout.fetch_add(1, Relaxed);
                    return Err(local(StatusCode::REQUEST_TIMEOUT, "request timeout\n", ""));
                }
            },
        };
        match collected {
            Ok(c) => buffered = Some(c.to_bytes()),
            Err(_) => {
                return Err(local(
                    StatusCode::BAD_REQUEST,
                    "request body could not be read\n",
                    "DPE",
                ))
            }
        }
    }

    if let (false, Some(b)) = (mirrors.is_empty(), &buffered) {
        let copy = mirror::Copy {
            method: &parts.method,
            path_and_query: &new_pq,
            headers: &headers,
            host: host_value.as_ref(),
            body: b,
            timeout: route_timeout,
        };
        mirror::send(snap, mirrors, &copy);
    }
    // One reading of the clock for the route's deadline and the upstream
    // service time (each reading is a call into the vDSO).
    let started = Instant::now();
    let deadline = match (
        route_timeout.map(|t| tokio::time::Instant::from_std(started) + t),
        stream_deadline,
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    // Only asked when a stream duration limit or a request timeout can
    // fire.
    let received = match (
        stream_deadline.is_some()
            || request_deadline.is_some()
            || cluster.config.max_stream_duration.is_some(),
        body.as_mut(),
    ) {
        (true, Some(b)) => Some(b.received()),
        _ => None,
    };
    let max_tries = 1 + match retry {
        Some(r)
            if body.is_none()
                && (r.request_headers.is_empty()
                    || r.request_retriable(&RequestHead {
                        method: parts.method.as_str(),
                        path: original_pq,
                        authority: host_value
                            .as_ref()
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or(""),
                        scheme: "http",
                        headers: &headers,
                    })) =>
        {
            r.num_retries
        }
        _ => 0,
    };
    // What a request's tries need only after a failure, or under rare
    // settings (see [`RareTry`]).
    let mut rare: Option<Box<RareTry>> = None;
    // The last try ended in its per-try timeout (what a retry tells).
    let mut timeout_retry = false;
    let mut failure = local(
        StatusCode::SERVICE_UNAVAILABLE,
        "no healthy upstream\n",
        "UH",
    );
    for attempt in 0..max_tries {
        if attempt > 0 {
            // Retries are bounded by the cluster's retry budget too.
            if !cluster.may_retry() {
                break;
            }
            stats.upstream_rq_retry.fetch_add(1, Relaxed);
            cluster.stats.upstream_rq_retry.fetch_add(1, Relaxed);
            if let Some(r) = retry {
                cluster.retries.fetch_add(1, Relaxed);
                let wait = rare
                    .as_mut()
                    .and_then(|x| x.asked_wait.take())
                    .unwrap_or_else(|| r.backoff(attempt));
                // Never past the route's deadline (an answer may ask for
                // minutes): the try then times out at once.
                let until = tokio::time::Instant::now() + wait;
                let until = deadline.map_or(until, |d| until.min(d));
                Box::pin(tokio::time::sleep_until(until)).await;
                cluster.retries.fetch_sub(1, Relaxed);
                let now = tokio::time::Instant::now();
                if stream_deadline.is_some_and(|d| now >= d) {
                    // The stream's own limit ran out meanwhile.
                    stats
                        .downstream_rq_max_duration_reached
                        .fetch_add(1, Relaxed);
                    failure = local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "downstream duration timeout\n",
                        "DT",
                    );
                    break;
                }
                if deadline.is_some_and(|d| now >= d) {
                    // The route's time ran out during the back-off: its
                    // 504, and no try sent to be cut off at once.
                    stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                    cluster.stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                    failure = local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout\n",
                        "UT",
                    );
                    break;
                }
            }
        }
        // (Bound straight from the match: a named result would take a
        // place of its own in this future.)
        let Some(ep) = (match (
            retry.and_then(|r| r.previous_priorities),
            rare.as_deref_mut(),
        ) {
            (
                Some(every),
                Some(RareTry {
                    last_ep: Some(last),
                    tried,
                    ..
                }),
            ) => {
                let excluded = tried.before_retry(cluster, last, attempt, every);
                cluster.pick_excluding(hash, Some(last), excluded)
            }
            (_, r) => cluster.pick(hash, r.and_then(|r| r.last_ep.as_deref())),
        }) else {
            stats.no_healthy_upstream.fetch_add(1, Relaxed);
            failure = local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                "UH",
            );
            break;
        };
        if cluster.active.load(Relaxed) >= cluster.config.limits.max_requests {
            cluster
                .stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            failure = local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n", "UO");
            break;
        }
        cluster.active.fetch_add(1, Relaxed);
        ep.active.fetch_add(1, Relaxed);
        let upstream = Upstream {
            cluster: cluster.clone(),
            endpoint: ep.clone(),
            slot: None,
        };
        if let Some(b) = guard.log.as_mut() {
            b.1.upstream_host = Some(ep.addr.to_string());
        }
        if let Some(r) = fmt.as_deref_mut() {
            r.upstream_host = Some(ep.addr.to_string());
        }
        // Envoy's auto_host_rewrite: the endpoint's host name, if it has
        // one (the first try that has one tells `x-forwarded-host`).
        let mut forward_host = None;
        let mut new_host = false;
        if let (HostRewrite::Auto, Some(name)) = (&fwd.host_rewrite, &ep.hostname) {
            if let Ok(v) = HeaderValue::from_str(name) {
                new_host = host_value.as_ref() != Some(&v);
                host_value = Some(v);
                forward_host = forwarded_host.take();
            }
        }
        // The URI is built once; a retry clones it (reference-counted),
        // unless its authority (HTTP/2) is another endpoint's host name.
        if up_uri.is_none() || (new_host && cluster.config.http2) {
            let built = if cluster.config.http2 {
                h2_uri(host_value.as_ref(), &new_pq)
            } else if new_pq == original_pq {
                Ok(http::Uri::from(
                    original_uri
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                ))
            } else {
                new_pq.parse::<http::Uri>()
            };
            match built {
                Ok(u) => up_uri = Some(u),
                Err(_) => return Err(local(StatusCode::BAD_REQUEST, "bad request path\n", "DPE")),
            }
        }
        let up_body: ReqBody = match (&buffered, body.take()) {
            (Some(b), _) => Either::Right(Full::new(b.clone())),
            (None, Some(b)) => Either::Left(b),
            (None, None) => break, // streamed body already spent
        };
        let mut up_req = Request::new(up_body);
        *up_req.method_mut() = parts.method.clone();
        *up_req.uri_mut() = up_uri.clone().unwrap_or_default();
        if cluster.config.http2 {
            *up_req.version_mut() = Version::HTTP_2;
        }
        // Each try takes the headers; one that may be followed by another
        // lends them (the send hands them back as soon as it has encoded
        // them, or a copy for HTTP/2), so that a request whose route may
        // retry does not copy its header map for the retries that rarely
        // come. What a try adds below (host, timeouts, attempt count) the
        // next one sets again.
        let more = attempt + 1 < max_tries;
        *up_req.headers_mut() = std::mem::take(&mut headers);
        if let Some(host) = forward_host {
            append_forwarded_host(up_req.headers_mut(), &host);
        }
        if !cluster.config.http2 {
            if let Some(h) = &host_value {
                up_req.headers_mut().insert(header::HOST, h.clone());
            }
        }
        // What is left of the route's time, or the try's (Envoy's
        // setTimeoutHeaders): told to the upstream, and a gRPC call's
        // deadline says the same when the route takes it from the call.
        let per_try = steer
            .as_ref()
            .and_then(|s| s.per_try)
            .or(retry.and_then(|r| r.per_try_timeout));
        if envoy_headers || grpc_route_timeout.is_some() {
            if let Some(ms) = expected_timeout_ms(route_timeout, per_try, started.elapsed()) {
                if envoy_headers {
                    let v = match &fwd.expected_timeout {
                        Some((m, v)) if *m == ms => v.clone(),
                        _ => HeaderValue::from(ms),
                    };
                    up_req
                        .headers_mut()
                        .insert(&X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, v);
                }
                if grpc_route_timeout.is_some() {
                    if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
                        up_req.headers_mut().insert(&GRPC_TIMEOUT, v);
                    }
                }
            }
        }
        if vh.attempt_count_to_upstream {
            up_req
                .headers_mut()
                .insert(&X_ENVOY_ATTEMPT_COUNT, small_number(u64::from(attempt) + 1));
        }
        if vh.timeout_retry_header && attempt > 0 {
            let v = if timeout_retry { "true" } else { "false" };
            up_req
                .headers_mut()
                .insert(&X_ENVOY_IS_TIMEOUT_RETRY, HeaderValue::from_static(v));
        }
        cluster.stats.upstream_rq_total.fetch_add(1, Relaxed);

        if let Some(down) = down_upgrade {
            // Boxed: a rare, large state every request would carry.
            // The route's idle timeout, else the listener's stream idle
            // timeout, bounds the tunnel's silence.
            let idle = fwd.idle_timeout.unwrap_or(lr.config.stream_idle_timeout);
            let tunnel = Tunnel {
                down,
                idle,
                deadline: stream_deadline,
                upstream_limit: cluster
                    .config
                    .max_stream_duration
                    .map(|t| tokio::time::Instant::now() + t),
            };
            return Box::pin(tunnel_upgrade(cluster, upstream, up_req, tunnel, guard)).await;
        }

        // The try's own limits: its timeout, and the cluster's on one
        // upstream stream (Envoy starts that one when the stream is made;
        // here, as the try starts). The clock is read only for them.
        // (By value throughout: a local borrowed here would keep a place
        // in this future across the send.)
        let (per_try, upstream_limit) = match (per_try, cluster.config.max_stream_duration) {
            (None, None) => (None, None),
            (a, b) => {
                let now = tokio::time::Instant::now();
                (a.map(|t| now + t), b.map(|t| now + t))
            }
        };
        let try_deadline = match (deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let try_deadline = match (try_deadline, upstream_limit) {
            (t, None) => t,
            (t, Some(u)) => {
                let first = match t {
                    Some(t) => u <= t,
                    None => true,
                };
                rare.get_or_insert_with(Default::default).upstream_limit = Some((u, first));
                if first {
                    Some(u)
                } else {
                    t
                }
            }
        };
        let noting = match guard.log.as_mut() {
            Some(b) if lr.log_upstream_local => Some(&mut b.1.upstream_local_address),
            _ => None,
        };
        // A request timeout still armed (the body is still coming) races
        // the try; boxed, as a rare state. The send future is made in each
        // arm: bound once before them, it would take a second place in
        // this (large, often moved) future.
        let armed = request_deadline.filter(|_| received.as_ref().is_some_and(|r| !r.whole()));
        // The send's own end (`None`: the try's deadline came first), as
        // it comes: each rewrap of an answer would copy it.
        let mut lent = None;
        let sent: Result<Option<SendResult>, RequestTimedOut> = match armed {
            Some(rd) => {
                // Made when first polled (the race may end before that):
                // `send_noting` takes an idle connection when called.
                let pool = &ep.pool;
                let back = more.then_some(&mut lent);
                Box::pin(race_request_timeout(
                    async move { pool.send_noting(up_req, noting, try_deadline, back).await },
                    rd,
                    received.as_ref(),
                ))
                .await
            }
            None => Ok(ep
                .pool
                .send_noting(up_req, noting, try_deadline, more.then_some(&mut lent))
                .await),
        };
        if let Some(h) = lent {
            headers = h;
        }
        match sent {
            Err(RequestTimedOut) => {
                // Envoy's request_timeout: the client took too long to send
                // the request; not the upstream's fault.
                stats.downstream_rq_timeout.fetch_add(1, Relaxed);
                failure = local(StatusCode::REQUEST_TIMEOUT, "request timeout\n", "");
                break;
            }
            Ok(Some(Ok((resp, slot)))) => {
                let status = resp.status().as_u16();
                cluster.stats.count_status(status);
                cluster.observe(&ep, Some(status));
                // A retry the budget would refuse is not tried: this answer
                // goes back as it is (Envoy decides before discarding it).
                if more
                    && retry.is_some_and(|r| r.retry_status(status, resp.headers()))
                    && cluster.may_retry()
                {
                    rare.get_or_insert_with(Default::default).last_ep = Some(ep);
                    timeout_retry = false;
                    let asked = retry.and_then(|r| {
                        (!r.reset_headers.is_empty())
                            .then(|| r.reset_backoff(resp.headers()))
                            .flatten()
                    });
                    if let (Some(w), Some(r)) = (asked, rare.as_mut()) {
                        r.asked_wait = Some(w);
                    }
                    failure = local(StatusCode::BAD_GATEWAY, "", "URX");
                    drop((resp, slot, upstream));
                    continue;
                }
                let service_ms = started.elapsed().as_millis() as u64;
                if let Some(b) = guard.log.as_mut() {
                    b.1.upstream_service_time = Some(service_ms);
                    b.1.upstream_service_time_sent = envoy_headers;
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers, false, false);
                if envoy_headers {
                    rparts
                        .headers
                        .insert(&X_ENVOY_UPSTREAM_SERVICE_TIME, small_number(service_ms));
                }
                if let Some(c) = set_cookie {
                    rparts.headers.append(header::SET_COOKIE, *c);
                }
                if vh.attempt_count_in_response {
                    rparts
                        .headers
                        .insert(&X_ENVOY_ATTEMPT_COUNT, small_number(u64::from(attempt) + 1));
                }
                // The downstream connection's version, not the upstream's.
                rparts.version = parts.version;
                let mut upstream = upstream;
                upstream.slot = slot;
                guard.upstream = Some(upstream);
                // A map lent to this try and not needed again.
                crate::spare::recycle(std::mem::take(&mut headers));
                let upstream_limit = rare.as_ref().and_then(|r| r.upstream_limit);
                let ends = match (stream_deadline, upstream_limit.map(|(u, _)| u)) {
                    (Some(s), Some(u)) if s <= u => Some(s),
                    (s, None) => s,
                    (_, Some(u)) => {
                        guard.deadline_upstream = true;
                        Some(u)
                    }
                };
                guard.deadline = ends.map(|d| Box::pin(tokio::time::sleep_until(d)));
                return Ok(Response::from_parts(rparts, Either::Left(rbody)));
            }
            Ok(Some(Err(e))) => {
                // Neither the client's failure nor the breaker's limit
                // says anything about the endpoint (Envoy's outlier
                // detection ignores overflow too).
                if !matches!(e, SendError::Downstream { .. } | SendError::Overflow) {
                    cluster.observe(&ep, None);
                }
                let retryable = match &e {
                    SendError::Downstream { gone, .. } => {
                        // Not the upstream's fault: no reset counted, no
                        // outlier detection, no retry.
                        failure = if *gone {
                            local(
                                StatusCode::BAD_REQUEST,
                                "request body not received whole\n",
                                "DC",
                            )
                        } else {
                            local(StatusCode::BAD_REQUEST, "malformed request body\n", "DPE")
                        };
                        false
                    }
                    SendError::Connect(why) => {
                        if let Some(b) = guard.log.as_mut() {
                            b.1.upstream_transport_failure_reason = Some(why.clone());
                        }
                        failure = local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n", "UF");
                        retry.is_some_and(|r| r.retry_connect())
                    }
                    SendError::Reset(_) => {
                        cluster.stats.upstream_rq_reset.fetch_add(1, Relaxed);
                        failure = local(StatusCode::BAD_GATEWAY, "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n", "UC");
                        retry.is_some_and(|r| r.retry_reset())
                    }
                    SendError::Protocol(_) => {
                        cluster.stats.upstream_rq_reset.fetch_add(1, Relaxed);
                        failure = local(StatusCode::BAD_GATEWAY, "upstream connect error or disconnect/reset before headers. reset reason: protocol error\n", "UPE");
                        retry.is_some_and(|r| r.retry_reset())
                    }
                    SendError::Overflow => {
                        failure = local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n", "UO");
                        false
                    }
                };
                tracing::debug!(cluster = %cluster.config.name, endpoint = %ep.addr, error = %e, "upstream request failed");
                rare.get_or_insert_with(Default::default).last_ep = Some(ep);
                timeout_retry = false;
                if !retryable {
                    break;
                }
            }
            Ok(None)
                if rare
                    .as_ref()
                    .is_some_and(|r| r.upstream_limit.is_some_and(|u| u.1)) =>
            {
                // The cluster's limit on one upstream stream: the stream
                // is reset, and retried as a reset would be (Envoy's
                // onStreamMaxDurationReached); not an outlier's mark.
                cluster
                    .stats
                    .upstream_rq_max_duration_reached
                    .fetch_add(1, Relaxed);
                failure = duration_reply(
                    received.as_ref(),
                    "upstream max stream duration reached\n",
                    "UMSDR",
                );
                rare.get_or_insert_with(Default::default).last_ep = Some(ep);
                timeout_retry = false;
                if !retry.is_some_and(|r| r.retry_reset()) {
                    break;
                }
            }
            Ok(None) if stream_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                // The stream's own limit, not the upstream's slowness: no
                // retry, no outlier mark.
                stats
                    .downstream_rq_max_duration_reached
                    .fetch_add(1, Relaxed);
                failure = duration_reply(received.as_ref(), "downstream duration timeout\n", "DT");
                break;
            }
            Ok(None) => {
                stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                cluster.stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                // No answer: a local-origin failure (a 504 when not split).
                cluster.observe(&ep, None);
                failure = if steer.as_ref().is_some_and(|s| s.timeout_no_content) {
                    local(StatusCode::NO_CONTENT, "", "UT")
                } else {
                    local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout\n",
                        "UT",
                    )
                };
                rare.get_or_insert_with(Default::default).last_ep = Some(ep);
                timeout_retry = true;
                let route_timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                if route_timed_out
                    || !retry
                        .is_some_and(|r| r.retry_reset() || r.retry_status(504, &HeaderMap::new()))
                {
                    break;
                }
            }
        }
    }
    if failure.flags == "URX" {
        // Retries ran out on a retriable status: Envoy passes the last
        // response through; we report it as a bad gateway with the flag.
        failure.status = StatusCode::BAD_GATEWAY;
    }
    Err(failure)
}

/// The answer to a stream ended by a duration limit: Envoy's 504, or its
/// 408 while the request is still coming.
fn duration_reply(
    received: Option<&super::body::Received>,
    body: &'static str,
    flags: &'static str,
) -> Local<'static> {
    let whole = received.is_none_or(|r| r.whole());
    let status = if whole {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::REQUEST_TIMEOUT
    };
    local(status, body, flags)
}

/// What only some requests' tries need, boxed when they do: each field
/// would grow every request's future (which is moved, and its size
/// copied, on its way).
#[derive(Default)]
struct RareTry {
    /// The endpoint the last try went to (a retry goes elsewhere).
    last_ep: Option<Arc<crate::upstream::Endpoint>>,
    /// The wait the last answer asked for (rate-limited back-off).
    asked_wait: Option<Duration>,
    /// The try's end by its cluster's `max_stream_duration`, and whether
    /// that comes before the try's other deadlines.
    upstream_limit: Option<(tokio::time::Instant, bool)>,
    /// The priority levels earlier tries went to (`previous_priorities`).
    tried: crate::upstream::lb::TriedLevels,
}

/// A try given up at the HCM's request timeout: the request was not yet
/// received whole.
struct RequestTimedOut;

/// Runs a try against the request timeout: at `request_deadline` the try
/// is given up if the client has still not sent the whole body; if it
/// has, the timer is disarmed (Envoy's) and the try goes on alone (with
/// its own deadline, if any, inside `send`).
async fn race_request_timeout<T>(
    send: impl std::future::Future<Output = T>,
    request_deadline: tokio::time::Instant,
    received: Option<&super::body::Received>,
) -> Result<T, RequestTimedOut> {
    let mut send = std::pin::pin!(send);
    let request_timer = tokio::time::sleep_until(request_deadline);
    let mut request_timer = std::pin::pin!(request_timer);
    tokio::select! {
        r = &mut send => return Ok(r),
        () = &mut request_timer => {}
    }
    if received.is_none_or(|r| r.whole()) {
        Ok(send.await)
    } else {
        Err(RequestTimedOut)
    }
}

/// The absolute URI an HTTP/2 upstream request carries (the host as its
/// `:authority`).
pub(super) fn h2_uri(
    host: Option<&HeaderValue>,
    path_and_query: &str,
) -> Result<http::Uri, http::uri::InvalidUri> {
    let auth = host.and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    format!("http://{auth}{path_and_query}").parse()
}

/// A random 128-bit request id in hex (Envoy generates one per request).
/// Appends the original host to `x-forwarded-host` unless it is already
/// the last entry (Envoy's `append_x_forwarded_host`).
fn append_forwarded_host(headers: &mut HeaderMap, host: &str) {
    let joined = match headers.get(&X_FORWARDED_HOST).and_then(|v| v.to_str().ok()) {
        Some(prev) if prev.rsplit(',').next().map(str::trim) == Some(host) => return,
        Some(prev) if !prev.is_empty() => format!("{prev},{host}"),
        _ => host.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(&X_FORWARDED_HOST, v);
    }
}

/// Appends this proxy's `via` entry to the header's list (one field).
fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    let joined = match headers.get(header::VIA) {
        None => via.clone(),
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + via.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(via.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| via.clone())
        }
    };
    headers.insert(header::VIA, joined);
}

/// A number as a header value; under 100 without an allocation.
fn small_number(n: u64) -> HeaderValue {
    const DIGITS: &str = "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";
    match n {
        0..=9 => HeaderValue::from_static(&DIGITS[2 * n as usize + 1..2 * n as usize + 2]),
        10..=99 => HeaderValue::from_static(&DIGITS[2 * n as usize..2 * n as usize + 2]),
        _ => HeaderValue::from(n),
    }
}

/// A random (version 4) UUID, the form Envoy gives `x-request-id`.
fn request_id() -> HeaderValue {
    // Two hex digits per byte, looked up.
    const HEX2: [[u8; 2]; 256] = {
        let digits = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [digits[i >> 4], digits[i & 15]];
            i += 1;
        }
        t
    };
    let mut bytes = fastrand::u128(..).to_le_bytes();
    // Version 4, variant 10 (RFC 9562 section 5.4).
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let hex = |out: &mut [u8], from: &[u8]| {
        for (pair, b) in out.chunks_exact_mut(2).zip(from) {
            pair.copy_from_slice(&HEX2[usize::from(*b)]);
        }
    };
    hex(&mut out[0..8], &bytes[0..4]);
    hex(&mut out[9..13], &bytes[4..6]);
    hex(&mut out[14..18], &bytes[6..8]);
    hex(&mut out[19..23], &bytes[8..10]);
    hex(&mut out[24..36], &bytes[10..16]);
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

/// Path after the route's rewrite (prefix or regex), query kept.
fn rewrite_path<'a>(fwd: &Forward, route: &Route, pq: &'a str) -> Cow<'a, str> {
    if let Some(prefix) = &fwd.prefix_rewrite {
        let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
        let n = route.matched_prefix_len(path).min(path.len());
        let mut out = format!("{prefix}{}", &path[n..]);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        return Cow::Owned(out);
    }
    if let Some(re) = &fwd.regex_rewrite {
        let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
        let mut out = re.apply(path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        return Cow::Owned(out);
    }
    Cow::Borrowed(pq)
}

/// Whether the Connection header names `upgrade` (with an Upgrade header,
/// an HTTP/1.1 upgrade request).
fn asks_connection_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    })
}

/// The client's side of an upgrade (WebSocket, or another protocol the
/// configuration allows).
struct Tunnel {
    /// Yields the client's connection once the 101 is written.
    down: tokio::sync::oneshot::Receiver<Upgraded>,
    /// How long the tunnel may carry nothing either way (`None`: forever).
    idle: Option<Duration>,
    /// When the stream's duration limit ends it, busy or not.
    deadline: Option<tokio::time::Instant>,
    /// When the cluster's limit on one upstream stream ends it.
    upstream_limit: Option<tokio::time::Instant>,
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_any(at: Option<tokio::time::Instant>) {
    match at {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// An upgrade (WebSocket or another): its own upstream connection; after both sides
/// switch protocols, bytes are copied both ways until either closes, or
/// until none passed for the idle timeout, or until the stream's duration
/// limit (Envoy applies both to upgraded streams too).
async fn tunnel_upgrade(
    cluster: &Arc<Cluster>,
    upstream: Upstream,
    up_req: Request<ReqBody>,
    Tunnel {
        down,
        idle,
        deadline,
        upstream_limit,
    }: Tunnel,
    guard: &mut Guard,
) -> Result<Out, Local<'static>> {
    let fail = || {
        local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n", "UF")
    };
    // A connection may have to wait for one to free (a pending request),
    // bounded by the stream's duration limit as the tunnel is.
    let connected = tokio::select! {
        c = upstream.endpoint.pool.connect_h1() => c,
        () = sleep_until_any(deadline) => {
            return Err(local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n", "UT"));
        }
    };
    let mut tx = connected.map_err(|e| match e {
        SendError::Overflow => local(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
            "UO",
        ),
        _ => fail(),
    })?;
    let mut resp = tx.send_request(up_req).await.map_err(|_| {
        local(
            StatusCode::BAD_GATEWAY,
            "upstream reset before the upgrade\n",
            "UC",
        )
    })?;
    cluster.stats.count_status(resp.status().as_u16());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        guard.upstream = Some(upstream);
        return Ok(Response::from_parts(
            parts,
            Either::Left(Either::Right(body)),
        ));
    }
    let up = hyper::upgrade::on(&mut resp);
    let stats = guard.stats.clone();
    let cluster_stats = cluster.stats.clone();
    tokio::spawn(async move {
        let _hold = upstream; // counts as active until the tunnel closes
        if let (Ok(d), Ok(u)) = tokio::join!(down, up) {
            stats.upstream_upgrades.fetch_add(1, Relaxed);
            let Upgraded { io, read_ahead } = d;
            let mut u = TokioIo::new(u);
            let progress = Progress::default();
            let mut io = Tracked::new(io, progress.clone());
            let mut watch = idle.map(Watch::new);
            // What the client sent right behind its request goes first.
            if u.write_all(&read_ahead).await.is_ok() {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut io, &mut u) => {}
                    () = Watch::expiry(watch.as_mut(), &progress) => {
                        stats.downstream_rq_idle_timeout.fetch_add(1, Relaxed);
                    }
                    () = sleep_until_any(deadline) => {
                        stats.downstream_rq_max_duration_reached.fetch_add(1, Relaxed);
                    }
                    () = sleep_until_any(upstream_limit) => {
                        cluster_stats.upstream_rq_max_duration_reached.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    });
    // The upstream's 101, though its body is empty here.
    if let Some(b) = guard.log.as_mut() {
        b.1.response_code_details = "via_upstream";
    }
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Either::Right(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_and_their_local_replies() {
        let with = |ct: &str| is_grpc(&map(&[("content-type", ct)]));
        assert!(with("application/grpc"));
        assert!(with("Application/GRPC+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/json"));
        assert_eq!(
            grpc_status_for_http(StatusCode::SERVICE_UNAVAILABLE.as_u16()),
            14
        );
        assert_eq!(grpc_status_for_http(StatusCode::NOT_FOUND.as_u16()), 12);
        assert_eq!(
            grpc_status_for_http(StatusCode::REQUEST_TIMEOUT.as_u16()),
            2
        );
        assert_eq!(grpc_message("50% off: caf\u{e9}"), "50%25 off: caf%C3%A9");
        let head = || Response::new(()).into_parts().0;
        let r = grpc_reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout\n",
            "UT",
            head(),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "upstream request timeout");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
        let r = grpc_reply(
            StatusCode::GATEWAY_TIMEOUT,
            "downstream duration timeout\n",
            "DT",
            head(),
        );
        assert_eq!(r.headers()["grpc-status"], "4");
        // A redirect keeps its location; a status already on the head
        // stays; no text, no message.
        let mut parts = head();
        parts
            .headers
            .insert(header::LOCATION, HeaderValue::from_static("/new"));
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(5));
        parts.headers.insert("grpc-status", HeaderValue::from(7));
        let r = grpc_reply(StatusCode::MOVED_PERMANENTLY, "", "", parts);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            (
                &r.headers()[header::LOCATION],
                &r.headers()["grpc-status"],
                r.headers().get("grpc-message"),
                r.headers().get(header::CONTENT_LENGTH),
            ),
            (
                &HeaderValue::from_static("/new"),
                &HeaderValue::from(7),
                None,
                None
            )
        );
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Hop, te"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "close"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-keep", "2"),
        ]);
        strip_hop_by_hop(&mut h, false, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);

        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("a", "b"),
        ]);
        strip_hop_by_hop(&mut h, true, false);
        assert_eq!(h.len(), 3, "an upgrade keeps Connection and Upgrade");

        let mut h = map(&[("a", "b"), ("c", "d")]);
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 2);

        // `te` goes only to HTTP/1.1 upstreams.
        let mut h = map(&[("te", "trailers"), ("a", "b")]);
        strip_hop_by_hop(&mut h, false, false);
        assert_eq!(h.len(), 2);
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a"]);

        // `expect: 100-continue` goes unless proxied; other expectations
        // stay (the upstream answers them, 417 as like as not).
        let mut h = map(&[("expect", "100-Continue"), ("a", "b")]);
        strip_hop_by_hop_and(&mut h, false, false, false);
        assert_eq!(h.len(), 2);
        strip_hop_by_hop_and(&mut h, false, false, true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a"]);
        let mut h = map(&[("expect", "something-else")]);
        strip_hop_by_hop_and(&mut h, false, false, true);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("gw:8080"), ("gw", Some("8080")));
        assert_eq!(split_host_port("gw"), ("gw", None));
        assert_eq!(split_host_port("gw:"), ("gw:", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some("80")));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("gw.:443"), ("gw.", Some("443")));
    }

    #[test]
    fn small_numbers() {
        for n in [0, 1, 9, 10, 42, 99, 100, 12345] {
            assert_eq!(small_number(n).to_str().ok(), Some(n.to_string().as_str()));
        }
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            let id = request_id();
            let b = id.as_bytes();
            assert_eq!(b.len(), 36, "{id:?}");
            for (i, c) in b.iter().enumerate() {
                if matches!(i, 8 | 13 | 18 | 23) {
                    assert_eq!(*c, b'-', "{id:?}");
                } else {
                    assert!(c.is_ascii_digit() || (b'a'..=b'f').contains(c), "{id:?}");
                }
            }
            assert_eq!(b[14], b'4', "version: {id:?}");
            assert!(
                matches!(b[19], b'8' | b'9' | b'a' | b'b'),
                "variant: {id:?}"
            );
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn hash_policies_combine_as_envoys_and_cookies_are_made_to_stick() {
        use crate::config::route::RouteTable;
        use portico_proto::envoy::config::route::v3::route_action::{
            hash_policy::{Cookie, Header, PolicySpecifier, QueryParameter},
            ClusterSpecifier, HashPolicy as PbHash,
        };
        use portico_proto::envoy::config::route::v3::{
            route::Action, route_match::PathSpecifier, Route as PbRoute, RouteAction as PbAction,
            RouteConfiguration, RouteMatch, VirtualHost as PbVh,
        };
        let header = |n: &str, terminal| PbHash {
            policy_specifier: Some(PolicySpecifier::Header(Header {
                header_name: n.into(),
                ..Default::default()
            })),
            terminal,
        };
        let table = |policies: Vec<PbHash>| {
            RouteTable::convert(&RouteConfiguration {
                virtual_hosts: vec![PbVh {
                    domains: vec!["*".into()],
                    routes: vec![PbRoute {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(Action::Route(PbAction {
                            cluster_specifier: Some(ClusterSpecifier::Cluster("c".into())),
                            hash_policy: policies,
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .expect("converts")
        };
        fn fwd(t: &RouteTable) -> &Forward {
            match &t.virtual_host("any", false).expect("a host").routes[0].action {
                RouteAction::Forward(f) => f,
                _ => unreachable!(),
            }
        }
        let uri: http::Uri = "/p?user=7".parse().unwrap();
        let client: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let hash =
            |t: &RouteTable, h: &HeaderMap| request_hash(fwd(t), (h, &uri), client, Some(client));
        let h = map(&[("x-a", "1"), ("x-b", "2")]);
        let (a, b) = (hash64(&b"1"[..]), hash64(&b"2"[..]));
        // Both count: the first's hash rotated, then the second's.
        let both = table(vec![header("x-a", false), header("x-b", false)]);
        assert_eq!(hash(&both, &h).0, Some(a.rotate_left(1) ^ b));
        // Missing ones are skipped; a terminal one that yields ends it.
        let t = table(vec![
            header("x-none", true),
            header("x-b", true),
            header("x-a", false),
        ]);
        assert_eq!(hash(&t, &h).0, Some(b));
        assert_eq!(hash(&t, &HeaderMap::new()).0, None);
        let q = table(vec![PbHash {
            policy_specifier: Some(PolicySpecifier::QueryParameter(QueryParameter {
                name: "user".into(),
            })),
            terminal: false,
        }]);
        assert_eq!(hash(&q, &h).0, Some(hash64("7")));
        // A header's several values, in any order: each one's xxHash64
        // seeds the next, sorted.
        let several = |values: &[&str]| {
            let mut m = HeaderMap::new();
            for v in values {
                m.append("x-a", HeaderValue::from_str(v).unwrap());
            }
            hash(&table(vec![header("x-a", false)]), &m).0
        };
        let chained = xxhash_rust::xxh64::xxh64(b"b", xxhash_rust::xxh64::xxh64(b"a", 0));
        assert_eq!(several(&["b", "a"]), Some(chained));
        assert_eq!(several(&["a", "b"]), Some(chained));
        // The source IP as text, without the port.
        let by_ip = table(vec![PbHash {
            policy_specifier: Some(PolicySpecifier::ConnectionProperties(
                portico_proto::envoy::config::route::v3::route_action::hash_policy::ConnectionProperties {
                    source_ip: true,
                },
            )),
            terminal: false,
        }]);
        assert_eq!(hash(&by_ip, &h).0, Some(hash64("192.0.2.1")));

        // A cookie with a ttl: made when missing, set on the answer, and
        // the same cookie sent back hashes the same.
        let sticky = table(vec![PbHash {
            policy_specifier: Some(PolicySpecifier::Cookie(Cookie {
                name: "route".into(),
                ttl: Some(portico_proto::google::protobuf::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                path: "/".into(),
                ..Default::default()
            })),
            terminal: false,
        }]);
        let (first, set) = hash(&sticky, &HeaderMap::new());
        let set = set.expect("a cookie to set");
        let set = set.to_str().unwrap();
        assert!(
            set.starts_with("route=\"") && set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"),
            "{set}"
        );
        let value = set.split('"').nth(1).unwrap();
        let back = map(&[("cookie", &format!("a=b; route=\"{value}\""))]);
        let (again, none) = hash(&sticky, &back);
        assert_eq!((again, none.is_none()), (first, true));
        // Without a ttl nothing is made.
        let plain = table(vec![PbHash {
            policy_specifier: Some(PolicySpecifier::Cookie(Cookie {
                name: "route".into(),
                ..Default::default()
            })),
            terminal: false,
        }]);
        assert_eq!(hash(&plain, &HeaderMap::new()).0, None);
        assert_eq!(hash(&plain, &back).0, first);
    }
}
