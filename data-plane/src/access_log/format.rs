//! Envoy's access log formats (`log_format`: `text_format`,
//! `text_format_source`, `json_format`, and the deprecated `format` and
//! `json_format` of the file logger), parsed once when the listener is
//! converted and rendered per request from its [`Record`].
//!
//! Command operators supported: `%START_TIME%` and `%START_TIME(FORMAT)%`
//! (strftime's common specifiers, Envoy's `%f` and `%1f`..`%9f`, UTC),
//! `%REQ(H?ALT):LEN%` (any request header, and `:method`, `:path`,
//! `:authority`, `:scheme`), `%REQ_WITHOUT_QUERY(:PATH)%`, `%RESP(H?ALT)%`
//! (any response header, and `x-envoy-upstream-service-time`),
//! `%PROTOCOL%`, `%RESPONSE_CODE%`, `%RESPONSE_FLAGS%`,
//! `%RESPONSE_CODE_DETAILS%`, `%BYTES_RECEIVED%`, `%BYTES_SENT%`,
//! `%DURATION%`, `%UPSTREAM_HOST%`, `%UPSTREAM_CLUSTER%` (and `_RAW`),
//! `%UPSTREAM_TRANSPORT_FAILURE_REASON%`, `%ROUTE_NAME%`,
//! `%DOWNSTREAM_REMOTE_ADDRESS%`, `%DOWNSTREAM_LOCAL_ADDRESS%`,
//! `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%` (each also `_WITHOUT_PORT`),
//! `%TRAILER(H?ALT)%` (any response trailer), `%LOCAL_REPLY_BODY%`,
//! `%GRPC_STATUS%` (and `(CAMEL_STRING)`, `(SNAKE_STRING)`, `(NUMBER)`,
//! `%GRPC_STATUS_NUMBER%`; `-` unless the request is a gRPC call),
//! `%REQUESTED_SERVER_NAME%` (always `-`: listeners have no TLS yet, so
//! no SNI), `%CONNECTION_TERMINATION_DETAILS%` (always `-`: no network
//! filter ends connections), `%UPSTREAM_LOCAL_ADDRESS%` (looked up only
//! for a listener whose format asks), and `%%` — enough for Istio's
//! default format. Any other operator is refused by name, so a
//! configuration is never half understood. A value
//! that is missing is `-` in text and `null` in JSON; in JSON an operator
//! alone in a value keeps its type (numbers stay numbers).

use std::fmt::Write as _;

use http::HeaderName;
use serde_json::{Map, Number, Value};

use super::Record;

/// A parsed format.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// A line of text (a newline is added when missing).
    Text(Vec<Piece>),
    /// One JSON object per line.
    Json(Vec<(String, Field)>),
}

/// Part of a text format.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Written as is.
    Literal(String),
    /// Replaced by a value of the record.
    Op(Op),
}

/// A value of a JSON format.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// One operator: its value with its type.
    Typed(Op),
    /// Text with operators in it: a string.
    Text(Vec<Piece>),
    /// A nested object.
    Object(Vec<(String, Field)>),
    /// A constant (number, boolean, null).
    Constant(Value),
}

/// A command operator and its truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    what: What,
    max_len: Option<usize>,
    /// `omit_empty_values`: a missing value is empty text, or no key.
    omit: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum What {
    StartTime,
    StartTimeFormat(Vec<TimePart>),
    /// A request header, or its alternative.
    Req(Header, Option<Header>),
    /// A response header, or its alternative.
    Resp(HeaderName, Option<HeaderName>),
    ResponseCodeDetails,
    UpstreamTransportFailureReason,
    LocalAddress,
    LocalAddressWithoutPort,
    UpstreamLocalAddress,
    /// Always missing (see the module's notes).
    Missing,
    PathWithoutQuery,
    Protocol,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamServiceTime,
    UpstreamHost,
    UpstreamCluster,
    RouteName,
    /// The trusted client address (from x-forwarded-for, when the
    /// listener takes it from there).
    RemoteAddress,
    RemoteAddressWithoutPort,
    /// The connection's peer.
    DirectRemoteAddress,
    DirectRemoteAddressWithoutPort,
    /// A gRPC call's status (`-` for other requests).
    GrpcStatus(GrpcStyle),
    /// The text of the proxy's own answer.
    LocalReplyBody,
    /// A response trailer, or its alternative.
    Trailer(HeaderName, Option<HeaderName>),
}

/// How `%GRPC_STATUS%` writes a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrpcStyle {
    /// `DeadlineExceeded` (the default).
    Camel,
    /// `DEADLINE_EXCEEDED`.
    Snake,
    /// `4`.
    Number,
}

/// gRPC's status names, by code, as Envoy writes them.
const GRPC_NAMES: [(&str, &str); 17] = [
    ("OK", "OK"),
    ("Canceled", "CANCELLED"),
    ("Unknown", "UNKNOWN"),
    ("InvalidArgument", "INVALID_ARGUMENT"),
    ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
    ("NotFound", "NOT_FOUND"),
    ("AlreadyExists", "ALREADY_EXISTS"),
    ("PermissionDenied", "PERMISSION_DENIED"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
    ("FailedPrecondition", "FAILED_PRECONDITION"),
    ("Aborted", "ABORTED"),
    ("OutOfRange", "OUT_OF_RANGE"),
    ("Unimplemented", "UNIMPLEMENTED"),
    ("Internal", "INTERNAL"),
    ("Unavailable", "UNAVAILABLE"),
    ("DataLoss", "DATA_LOSS"),
    ("Unauthenticated", "UNAUTHENTICATED"),
];

#[derive(Debug, Clone, PartialEq)]
enum Header {
    Method,
    Path,
    Authority,
    Scheme,
    Other(HeaderName),
}

impl LogFormat {
    /// Parses a text format.
    pub fn text(s: &str) -> Result<LogFormat, String> {
        Ok(LogFormat::Text(pieces(s)?))
    }

    /// Parses a JSON format from its fields.
    pub fn json(
        fields: &std::collections::HashMap<String, portico_proto::google::protobuf::Value>,
    ) -> Result<LogFormat, String> {
        Ok(LogFormat::Json(object(fields)?))
    }

    /// Its text when it has no operator (only literals, `%%` among
    /// them): nothing to make per request.
    pub fn literal(&self) -> Option<String> {
        match self {
            LogFormat::Text(p) => p
                .iter()
                .map(|piece| match piece {
                    Piece::Literal(s) => Some(s.as_str()),
                    Piece::Op(_) => None,
                })
                .collect(),
            LogFormat::Json(_) => None,
        }
    }

    /// The request headers (other than pseudo-headers) it logs, to be
    /// kept in the record.
    pub fn request_headers(&self) -> Vec<HeaderName> {
        let mut out = Vec::new();
        self.each_op(&mut |op: &Op| {
            if let What::Req(a, b) = &op.what {
                for h in std::iter::once(a).chain(b) {
                    if let Header::Other(n) = h {
                        if !out.contains(n) {
                            out.push(n.clone());
                        }
                    }
                }
            }
        });
        out
    }

    /// The response headers it logs, to be kept in the record.
    pub fn response_headers(&self) -> Vec<HeaderName> {
        let mut out = Vec::new();
        self.each_op(&mut |op: &Op| {
            if let What::Resp(a, b) = &op.what {
                for n in std::iter::once(a).chain(b) {
                    if !out.contains(n) {
                        out.push(n.clone());
                    }
                }
            }
        });
        out
    }

    /// Whether it logs the upstream connection's local address, which
    /// costs a system call per request to learn.
    pub fn wants_upstream_local_address(&self) -> bool {
        let mut wants = false;
        self.each_op(&mut |op: &Op| wants |= op.what == What::UpstreamLocalAddress);
        wants
    }

    /// Whether it logs response trailers (kept for it when they come).
    pub fn wants_trailers(&self) -> bool {
        let mut wants = false;
        self.each_op(&mut |op: &Op| wants |= matches!(op.what, What::Trailer(..)));
        wants
    }

    /// The format with Envoy's `omit_empty_values`: a missing value is
    /// empty text instead of `-`, and a JSON key whose value is missing is
    /// left out.
    pub fn omitting_empty(mut self) -> LogFormat {
        fn pieces(p: &mut [Piece]) {
            for piece in p {
                if let Piece::Op(op) = piece {
                    op.omit = true;
                }
            }
        }
        fn fields(f: &mut [(String, Field)]) {
            for (_, v) in f {
                match v {
                    Field::Typed(op) => op.omit = true,
                    Field::Text(p) => pieces(p),
                    Field::Object(o) => fields(o),
                    Field::Constant(_) => {}
                }
            }
        }
        match &mut self {
            LogFormat::Text(p) => pieces(p),
            LogFormat::Json(f) => fields(f),
        }
        self
    }

    fn each_op(&self, add: &mut impl FnMut(&Op)) {
        fn walk_pieces(p: &[Piece], add: &mut impl FnMut(&Op)) {
            for piece in p {
                if let Piece::Op(op) = piece {
                    add(op);
                }
            }
        }
        fn walk_fields(f: &[(String, Field)], add: &mut impl FnMut(&Op)) {
            for (_, v) in f {
                match v {
                    Field::Typed(op) => add(op),
                    Field::Text(p) => walk_pieces(p, add),
                    Field::Object(o) => walk_fields(o, add),
                    Field::Constant(_) => {}
                }
            }
        }
        match self {
            LogFormat::Text(p) => walk_pieces(p, add),
            LogFormat::Json(f) => walk_fields(f, add),
        }
    }

    /// Renders a local reply's body: as a log line, but text gets no
    /// newline of its own.
    pub fn render_body(&self, r: &Record) -> Vec<u8> {
        match self {
            LogFormat::Text(p) => text(p, r).into_bytes(),
            LogFormat::Json(_) => self.render(r),
        }
    }

    /// One line for `r`, with its newline.
    pub fn render(&self, r: &Record) -> Vec<u8> {
        match self {
            LogFormat::Text(p) => {
                let mut line = text(p, r);
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                line.into_bytes()
            }
            LogFormat::Json(f) => {
                let mut line = serde_json::to_vec(&Value::Object(json(f, r))).unwrap_or_default();
                line.push(b'\n');
                line
            }
        }
    }
}

fn object(
    fields: &std::collections::HashMap<String, portico_proto::google::protobuf::Value>,
) -> Result<Vec<(String, Field)>, String> {
    use portico_proto::google::protobuf::value::Kind;
    let mut out = Vec::with_capacity(fields.len());
    for (k, v) in fields {
        let f = match &v.kind {
            Some(Kind::StringValue(s)) => match pieces(s)?.as_slice() {
                [Piece::Op(op)] => Field::Typed(op.clone()),
                p => Field::Text(p.to_vec()),
            },
            Some(Kind::StructValue(s)) => Field::Object(object(&s.fields)?),
            Some(Kind::NumberValue(n)) => {
                Field::Constant(Number::from_f64(*n).map_or(Value::Null, Value::Number))
            }
            Some(Kind::BoolValue(b)) => Field::Constant(Value::Bool(*b)),
            Some(Kind::NullValue(_)) | None => Field::Constant(Value::Null),
            Some(Kind::ListValue(_)) => {
                return Err(format!("json_format {k:?}: lists are not supported"))
            }
        };
        out.push((k.clone(), f));
    }
    // The message's map has no order; a stable one makes lines comparable.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn pieces(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let end = op_end(rest).ok_or_else(|| format!("unterminated operator in {s:?}"))?;
        let op = parse_op(&rest[..end])?;
        rest = &rest[end + 1..];
        if !lit.is_empty() {
            out.push(Piece::Literal(std::mem::take(&mut lit)));
        }
        out.push(Piece::Op(op));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Piece::Literal(lit));
    }
    Ok(out)
}

/// Where an operator's closing `%` is (a `%` inside its parentheses, as in
/// a time format, does not close it).
fn op_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_op(token: &str) -> Result<Op, String> {
    let (body, max_len) = match token.rfind(':') {
        Some(i) if token[i + 1..].chars().all(|c| c.is_ascii_digit()) && i + 1 < token.len() => {
            let n = token[i + 1..]
                .parse()
                .map_err(|_| format!("%{token}%: bad length"))?;
            (&token[..i], Some(n))
        }
        _ => (token, None),
    };
    let (name, arg) = match body.find('(') {
        Some(i) if body.ends_with(')') => (&body[..i], Some(&body[i + 1..body.len() - 1])),
        Some(_) => return Err(format!("%{token}%: unbalanced parentheses")),
        None => (body, None),
    };
    let what = match (name, arg) {
        ("START_TIME", None) => What::StartTime,
        ("START_TIME", Some(f)) => What::StartTimeFormat(time_format(f, token)?),
        ("REQ", Some(a)) => {
            let (main, alt) = match a.split_once('?') {
                Some((m, alt)) => (m, Some(alt)),
                None => (a, None),
            };
            What::Req(
                header(main, token)?,
                alt.map(|h| header(h, token)).transpose()?,
            )
        }
        ("REQ_WITHOUT_QUERY", Some(a)) if a.eq_ignore_ascii_case(":path") => What::PathWithoutQuery,
        ("RESP", Some(a)) if a.eq_ignore_ascii_case("x-envoy-upstream-service-time") => {
            What::UpstreamServiceTime
        }
        ("RESP" | "TRAILER", Some(a)) => {
            let is_trailer = name == "TRAILER";
            let name = |h: &str| {
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("%{token}%: {h:?} is not a header name"))
            };
            let (main, alt) = match a.split_once('?') {
                Some((m, alt)) => (m, Some(alt)),
                None => (a, None),
            };
            let (main, alt) = (name(main)?, alt.map(name).transpose()?);
            if is_trailer {
                What::Trailer(main, alt)
            } else {
                What::Resp(main, alt)
            }
        }
        ("RESPONSE_CODE_DETAILS", None) => What::ResponseCodeDetails,
        ("LOCAL_REPLY_BODY", None) => What::LocalReplyBody,
        ("GRPC_STATUS", None | Some("CAMEL_STRING")) => What::GrpcStatus(GrpcStyle::Camel),
        ("GRPC_STATUS", Some("SNAKE_STRING")) => What::GrpcStatus(GrpcStyle::Snake),
        ("GRPC_STATUS", Some("NUMBER")) | ("GRPC_STATUS_NUMBER", None) => {
            What::GrpcStatus(GrpcStyle::Number)
        }
        ("UPSTREAM_TRANSPORT_FAILURE_REASON", None) => What::UpstreamTransportFailureReason,
        ("UPSTREAM_CLUSTER_RAW", None) => What::UpstreamCluster,
        ("DOWNSTREAM_LOCAL_ADDRESS", None) => What::LocalAddress,
        ("UPSTREAM_LOCAL_ADDRESS", None) => What::UpstreamLocalAddress,
        ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None) => What::LocalAddressWithoutPort,
        // No proxy protocol: the direct peer is the remote address.
        ("DOWNSTREAM_DIRECT_REMOTE_ADDRESS", None) => What::DirectRemoteAddress,
        ("DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT", None) => {
            What::DirectRemoteAddressWithoutPort
        }
        ("REQUESTED_SERVER_NAME" | "CONNECTION_TERMINATION_DETAILS", None) => What::Missing,
        ("PROTOCOL", None) => What::Protocol,
        ("RESPONSE_CODE", None) => What::ResponseCode,
        ("RESPONSE_FLAGS", None) => What::ResponseFlags,
        ("BYTES_RECEIVED", None) => What::BytesReceived,
        ("BYTES_SENT", None) => What::BytesSent,
        ("DURATION", None) => What::Duration,
        ("UPSTREAM_HOST", None) => What::UpstreamHost,
        ("UPSTREAM_CLUSTER", None) => What::UpstreamCluster,
        ("ROUTE_NAME", None) => What::RouteName,
        ("DOWNSTREAM_REMOTE_ADDRESS", None) => What::RemoteAddress,
        ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => What::RemoteAddressWithoutPort,
        _ => return Err(format!("command operator %{token}% is not supported")),
    };
    Ok(Op {
        what,
        max_len,
        omit: false,
    })
}

fn header(name: &str, token: &str) -> Result<Header, String> {
    Ok(match name.to_ascii_lowercase().as_str() {
        ":method" => Header::Method,
        ":path" => Header::Path,
        ":authority" | "host" => Header::Authority,
        ":scheme" => Header::Scheme,
        other => Header::Other(
            HeaderName::from_bytes(other.as_bytes())
                .map_err(|_| format!("%{token}%: {name:?} is not a header name"))?,
        ),
    })
}

/// An operator's value: a string, a number, or nothing.
enum Got<'a> {
    Str(std::borrow::Cow<'a, str>),
    Num(u64),
    None,
}

fn value<'a>(what: &What, r: &'a Record) -> Got<'a> {
    use std::borrow::Cow::{Borrowed, Owned};
    let opt = |s: &'a Option<String>| s.as_deref().map_or(Got::None, |s| Got::Str(Borrowed(s)));
    let non_empty = |s: &'a str| {
        if s.is_empty() {
            Got::None
        } else {
            Got::Str(Borrowed(s))
        }
    };
    match what {
        What::StartTime => non_empty(&r.start_time),
        What::StartTimeFormat(f) => r
            .started
            .map_or(Got::None, |t| Got::Str(Owned(render_time(f, t)))),
        What::Resp(a, b) => {
            let find = |n: &HeaderName| {
                r.response_headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .and_then(|(_, v)| v.as_deref())
            };
            find(a)
                .or_else(|| b.as_ref().and_then(find))
                .map_or(Got::None, |v| Got::Str(Borrowed(v)))
        }
        What::ResponseCodeDetails => non_empty(r.response_code_details),
        What::UpstreamTransportFailureReason => opt(&r.upstream_transport_failure_reason),
        What::LocalAddress => r
            .downstream_local_address
            .map_or(Got::None, |a| Got::Str(Owned(a.to_string()))),
        What::LocalAddressWithoutPort => r
            .downstream_local_address
            .map_or(Got::None, |a| Got::Str(Owned(a.ip().to_string()))),
        What::UpstreamLocalAddress => r
            .upstream_local_address
            .map_or(Got::None, |a| Got::Str(Owned(a.to_string()))),
        What::Missing => Got::None,
        What::Req(a, b) => match req(a, r) {
            Got::None => b.as_ref().map_or(Got::None, |b| req(b, r)),
            got => got,
        },
        What::PathWithoutQuery => non_empty(r.path.split('?').next().unwrap_or_default()),
        What::Protocol => Got::Str(Borrowed(r.protocol)),
        What::ResponseCode => Got::Num(u64::from(r.response_code)),
        What::ResponseFlags => Got::Str(if r.response_flags.is_empty() {
            Borrowed("-")
        } else {
            Borrowed(r.response_flags.as_str())
        }),
        What::BytesReceived => Got::Num(r.bytes_received),
        What::BytesSent => Got::Num(r.bytes_sent),
        What::Duration => Got::Num(r.duration),
        What::UpstreamServiceTime => match r.upstream_service_time {
            Some(ms) if r.upstream_service_time_sent => Got::Num(ms),
            _ => Got::None,
        },
        What::LocalReplyBody => opt(&r.local_reply_body),
        What::Trailer(a, b) => {
            let t = r.trailers.as_deref();
            let find = |n: &HeaderName| t?.get(n)?.to_str().ok();
            find(a)
                .or_else(|| b.as_ref().and_then(find))
                .map_or(Got::None, |v| Got::Str(Borrowed(v)))
        }
        What::GrpcStatus(_) if !r.grpc_request => Got::None,
        What::GrpcStatus(style) => {
            let code = r.grpc_status_or_inferred();
            match (style, GRPC_NAMES.get(code as usize)) {
                (GrpcStyle::Number, _) | (_, None) => Got::Num(u64::from(code)),
                (GrpcStyle::Camel, Some((camel, _))) => Got::Str(Borrowed(camel)),
                (GrpcStyle::Snake, Some((_, snake))) => Got::Str(Borrowed(snake)),
            }
        }
        What::UpstreamHost => opt(&r.upstream_host),
        What::UpstreamCluster => non_empty(&r.upstream_cluster),
        What::RouteName => non_empty(&r.route_name),
        What::RemoteAddress => non_empty(&r.downstream_remote_address),
        What::RemoteAddressWithoutPort => without_port(&r.downstream_remote_address),
        What::DirectRemoteAddress => non_empty(direct(r)),
        What::DirectRemoteAddressWithoutPort => without_port(direct(r)),
    }
}

/// The connection's peer (records made before it was kept apart from the
/// client address have only the one).
fn direct(r: &Record) -> &str {
    if r.downstream_direct_remote_address.is_empty() {
        &r.downstream_remote_address
    } else {
        &r.downstream_direct_remote_address
    }
}

fn without_port(a: &str) -> Got<'_> {
    use std::borrow::Cow::{Borrowed, Owned};
    match a.parse::<std::net::SocketAddr>() {
        Ok(s) => Got::Str(Owned(s.ip().to_string())),
        Err(_) if a.is_empty() => Got::None,
        Err(_) => Got::Str(Borrowed(a)),
    }
}

/// A piece of a `START_TIME` format.
#[derive(Debug, Clone, PartialEq)]
enum TimePart {
    Literal(String),
    /// A strftime specifier's letter.
    Spec(char),
    /// Envoy's `%Nf`: the first N digits of the nanoseconds (`%f`: 9).
    Fraction(usize),
}

/// Parses a strftime format; a specifier this renderer lacks is refused.
fn time_format(f: &str, token: &str) -> Result<Vec<TimePart>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        let part = match chars.next() {
            Some('%') => {
                lit.push('%');
                continue;
            }
            Some('f') => TimePart::Fraction(9),
            Some(d @ '1'..='9') if chars.peek() == Some(&'f') => {
                chars.next();
                TimePart::Fraction(d as usize - '0' as usize)
            }
            Some(
                s @ ('Y' | 'y' | 'm' | 'd' | 'e' | 'H' | 'M' | 'S' | 'j' | 'F' | 'T' | 'z' | 'Z'
                | 's' | 'b' | 'a'),
            ) => TimePart::Spec(s),
            other => {
                return Err(format!(
                    "%{token}%: time format specifier %{} is not supported",
                    other.map(String::from).unwrap_or_default()
                ))
            }
        };
        if !lit.is_empty() {
            out.push(TimePart::Literal(std::mem::take(&mut lit)));
        }
        out.push(part);
    }
    if !lit.is_empty() {
        out.push(TimePart::Literal(lit));
    }
    Ok(out)
}

/// Renders `t` in UTC. The calendar fields come from humantime's RFC 3339
/// form, so no date arithmetic is done here.
fn render_time(parts: &[TimePart], t: std::time::SystemTime) -> String {
    let iso = humantime::format_rfc3339_nanos(t).to_string(); // YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ
    let f = |a: usize, b: usize| iso.get(a..b).unwrap_or("00");
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let days = since.as_secs() / 86_400;
    let mut out = String::new();
    for p in parts {
        match p {
            TimePart::Literal(l) => out.push_str(l),
            TimePart::Fraction(n) => out.push_str(f(20, 20 + n)),
            TimePart::Spec(c) => match c {
                'Y' => out.push_str(f(0, 4)),
                'y' => out.push_str(f(2, 4)),
                'm' => out.push_str(f(5, 7)),
                'd' => out.push_str(f(8, 10)),
                'e' => {
                    let d = f(8, 10);
                    out.push_str(&d.replacen('0', " ", usize::from(d.starts_with('0'))));
                }
                'H' => out.push_str(f(11, 13)),
                'M' => out.push_str(f(14, 16)),
                'S' => out.push_str(f(17, 19)),
                'F' => out.push_str(f(0, 10)),
                'T' => out.push_str(f(11, 19)),
                'z' => out.push_str("+0000"),
                'Z' => out.push_str("UTC"),
                's' => {
                    let _ = write!(out, "{}", since.as_secs());
                }
                'j' => {
                    // Day of the year: days since the 1st of January.
                    let jan1 = humantime::parse_rfc3339(&format!("{}-01-01T00:00:00Z", f(0, 4)))
                        .ok()
                        .and_then(|j| j.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(days, |d| d.as_secs() / 86_400);
                    let _ = write!(out, "{:03}", days - jan1 + 1);
                }
                'b' => {
                    const MONTHS: [&str; 12] = [
                        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                        "Nov", "Dec",
                    ];
                    let m: usize = f(5, 7).parse().unwrap_or(1);
                    out.push_str(MONTHS[m.clamp(1, 12) - 1]);
                }
                'a' => {
                    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
                    out.push_str(DAYS[(days % 7) as usize]); // 1970-01-01 was a Thursday
                }
                _ => {}
            },
        }
    }
    out
}

fn req<'a>(h: &Header, r: &'a Record) -> Got<'a> {
    use std::borrow::Cow::Borrowed;
    match h {
        Header::Method => Got::Str(Borrowed(&r.method)),
        Header::Path => Got::Str(Borrowed(&r.path)),
        Header::Authority if r.authority.is_empty() => Got::None,
        Header::Authority => Got::Str(Borrowed(&r.authority)),
        Header::Scheme => Got::Str(Borrowed("http")),
        Header::Other(n) => r
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .and_then(|(_, v)| v.as_deref())
            .map_or(Got::None, |v| Got::Str(Borrowed(v))),
    }
}

fn truncated(s: &str, max: Option<usize>) -> &str {
    match max {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

fn text(p: &[Piece], r: &Record) -> String {
    let mut out = String::new();
    for piece in p {
        match piece {
            Piece::Literal(l) => out.push_str(l),
            Piece::Op(op) => match value(&op.what, r) {
                Got::Str(s) => out.push_str(truncated(&s, op.max_len)),
                Got::Num(n) => {
                    let _ = write!(out, "{n}");
                }
                Got::None if op.omit => {}
                Got::None => out.push('-'),
            },
        }
    }
    out
}

fn json(fields: &[(String, Field)], r: &Record) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, f) in fields {
        let v = match f {
            Field::Typed(op) => match value(&op.what, r) {
                Got::Str(s) => Value::String(truncated(&s, op.max_len).to_owned()),
                Got::Num(n) => Value::Number(n.into()),
                Got::None if op.omit => continue,
                Got::None => Value::Null,
            },
            Field::Text(p) => Value::String(text(p, r)),
            Field::Object(o) => Value::Object(json(o, r)),
            Field::Constant(c) => c.clone(),
        };
        m.insert(k.clone(), v);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            start_time: "2026-11-28T12:00:00.000Z".into(),
            method: "GET".into(),
            path: "/pets/1?x=2".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            bytes_sent: 12,
            duration: 3,
            authority: "api.example".into(),
            upstream_cluster: "pets".into(),
            route_name: "r1".into(),
            downstream_remote_address: "10.0.0.1:5555".into(),
            headers: vec![
                (HeaderName::from_static("x-user"), Some("ann".into())),
                (HeaderName::from_static("x-missing"), None),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn addresses_and_the_service_time_header_as_sent() {
        let f = LogFormat::text(
            "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        )
        .expect("parses");
        let mut r = Record {
            downstream_direct_remote_address: "127.0.0.1:4000".into(),
            upstream_service_time: Some(7),
            ..record()
        };
        let text = |r: &Record| String::from_utf8(f.render(r)).expect("utf-8");
        assert_eq!(text(&r), "10.0.0.1:5555 127.0.0.1 -\n", "suppressed");
        r.upstream_service_time_sent = true;
        assert_eq!(text(&r), "10.0.0.1:5555 127.0.0.1 7\n");
        r.downstream_direct_remote_address.clear();
        assert_eq!(text(&r), "10.0.0.1:5555 10.0.0.1 7\n", "one address kept");
    }

    #[test]
    fn text_formats() {
        let f = LogFormat::text(
            "[%START_TIME%] \"%REQ(:METHOD)% %REQ_WITHOUT_QUERY(:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(X-MISSING?X-USER)% %REQ(X-MISSING)% %UPSTREAM_HOST% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(:AUTHORITY):3% 100%%",
        )
        .expect("parses");
        assert_eq!(
            String::from_utf8(f.render(&record())).expect("utf-8"),
            "[2026-11-28T12:00:00.000Z] \"GET /pets/1 HTTP/1.1\" 200 - ann - - 10.0.0.1 api 100%\n"
        );
        assert_eq!(
            f.request_headers(),
            [
                HeaderName::from_static("x-missing"),
                HeaderName::from_static("x-user")
            ]
        );
    }

    #[test]
    fn json_formats_keep_types() {
        use portico_proto::google::protobuf::{value::Kind, Struct, Value as Pb};
        let s = |v: &str| Pb {
            kind: Some(Kind::StringValue(v.into())),
        };
        let mut inner = Struct::default();
        inner
            .fields
            .insert("cluster".into(), s("%UPSTREAM_CLUSTER%"));
        let fields = [
            ("code", s("%RESPONSE_CODE%")),
            ("line", s("%REQ(:METHOD)% %REQ(:PATH)%")),
            ("user", s("%REQ(X-USER)%")),
            ("host", s("%UPSTREAM_HOST%")),
            (
                "up",
                Pb {
                    kind: Some(Kind::StructValue(inner)),
                },
            ),
            (
                "v",
                Pb {
                    kind: Some(Kind::NumberValue(2.0)),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let f = LogFormat::json(&fields).expect("parses");
        let line: Value = serde_json::from_slice(&f.render(&record())).expect("json");
        assert_eq!(
            line,
            serde_json::json!({"code": 200, "line": "GET /pets/1?x=2", "user": "ann",
                "host": null, "up": {"cluster": "pets"}, "v": 2.0})
        );
    }

    #[test]
    fn unknown_operators_are_named() {
        for (f, want) in [
            ("%FILTER_STATE(x)%", "%FILTER_STATE(x)%"),
            ("%START_TIME(%Q)%", "specifier %Q"),
            ("%RESP(bad name)%", "not a header name"),
            ("%REQ(:PATH)", "unterminated"),
        ] {
            let e = LogFormat::text(f).expect_err(f);
            assert!(e.contains(want), "{f}: {e}");
        }
    }

    #[test]
    fn time_formats_response_headers_and_details() {
        let mut r = record();
        // 2025-11-28T09:05:07.123456789Z, a Friday, day 332.
        r.started =
            Some(std::time::UNIX_EPOCH + std::time::Duration::new(1_764_320_707, 123_456_789));
        r.response_headers = vec![
            (
                HeaderName::from_static("content-type"),
                Some("text/plain".into()),
            ),
            (HeaderName::from_static("x-none"), None),
        ];
        r.response_code_details = "via_upstream";
        r.downstream_local_address = Some("127.0.0.1:8080".parse().expect("addr"));
        let f = LogFormat::text(
            "%START_TIME(%Y-%m-%dT%H:%M:%S.%3f%z)% %START_TIME(%a %e %b %y %j %s.%f %F %T %Z %%)% %RESP(X-NONE?CONTENT-TYPE)% %RESP(x-none)% %RESPONSE_CODE_DETAILS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %UPSTREAM_TRANSPORT_FAILURE_REASON% %UPSTREAM_CLUSTER_RAW%",
        )
        .expect("parses");
        assert_eq!(
            String::from_utf8(f.render(&r)).expect("utf-8"),
            "2025-11-28T09:05:07.123+0000 Fri 28 Nov 25 332 1764320707.123456789 2025-11-28 09:05:07 UTC % text/plain - via_upstream 127.0.0.1:8080 127.0.0.1 10.0.0.1:5555 - - pets\n"
        );
        assert_eq!(
            f.response_headers(),
            [
                HeaderName::from_static("x-none"),
                HeaderName::from_static("content-type")
            ]
        );
        r.started = Some(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600 + 4 * 86_400),
        );
        let f = LogFormat::text("%START_TIME(%a %e %j)%").expect("parses");
        assert_eq!(f.render(&r), b"Mon  5 005\n", "2026-01-05");
    }

    #[test]
    fn omitted_empty_values_and_trailers() {
        let mut r = record();
        let f = LogFormat::text("[%UPSTREAM_HOST%] %TRAILER(GRPC-STATUS?X-NONE)%").expect("parses");
        assert_eq!(f.render(&r), b"[-] -\n");
        assert!(f.wants_trailers());
        assert_eq!(f.clone().omitting_empty().render(&r), b"[] \n");
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        r.trailers = Some(Box::new(t));
        assert_eq!(f.render(&r), b"[-] 0\n");
        let s = |v: &str| portico_proto::google::protobuf::Value {
            kind: Some(portico_proto::google::protobuf::value::Kind::StringValue(
                v.into(),
            )),
        };
        let fields = [("host", "%UPSTREAM_HOST%"), ("code", "%RESPONSE_CODE%")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), s(v)))
            .collect();
        let j = LogFormat::json(&fields).expect("parses");
        assert!(!j.wants_trailers());
        let line = String::from_utf8(j.clone().omitting_empty().render(&r)).expect("utf-8");
        assert_eq!(line, "{\"code\":200}\n");
        let line = String::from_utf8(j.render(&r)).expect("utf-8");
        assert_eq!(line, "{\"code\":200,\"host\":null}\n");
    }

    #[test]
    fn grpc_status_in_three_styles() {
        let f = LogFormat::text(
            "%GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)% %GRPC_STATUS_NUMBER%",
        )
        .expect("parses");
        let mut r = record();
        assert_eq!(f.render(&r), b"- - - -\n", "not a gRPC call");
        r.grpc_request = true;
        r.grpc_status = Some(4);
        assert_eq!(f.render(&r), b"DeadlineExceeded DEADLINE_EXCEEDED 4 4\n");
        r.grpc_status = None;
        r.response_code = 503;
        assert_eq!(f.render(&r), b"Unavailable UNAVAILABLE 14 14\n", "inferred");
        r.grpc_status = Some(99);
        assert_eq!(f.render(&r), b"99 99 99 99\n");
        let e = LogFormat::text("%GRPC_STATUS(LOUD)%").expect_err("unknown style");
        assert!(e.contains("GRPC_STATUS(LOUD)"), "{e}");
    }

    #[test]
    fn istio_default_format_parses() {
        // Istio's default text format.
        let istio = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";
        let f = LogFormat::text(istio).expect("parses");
        let line = String::from_utf8(f.render(&record())).expect("utf-8");
        assert!(
            line.starts_with(
                "[2026-11-28T12:00:00.000Z] \"GET /pets/1?x=2 HTTP/1.1\" 200 - - - \"-\" 0 12 3 -"
            ),
            "{line}"
        );
    }
}
