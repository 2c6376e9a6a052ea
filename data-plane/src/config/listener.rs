//! `Listener` → [`ListenerConfig`]: an address and an HTTP connection
//! manager (its routes, filters, access logs and limits).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portico_proto::envoy::config::accesslog::v3::access_log;
use portico_proto::envoy::config::core::v3::{
    http_protocol_options::HeadersWithUnderscoresAction, substitution_format_string, CidrRange,
    Http1ProtocolOptions, SubstitutionFormatString,
};
use portico_proto::envoy::config::listener::v3::{
    filter, filter_chain_match::ConnectionSourceType, FilterChainMatch, Listener,
};
use portico_proto::envoy::extensions::access_loggers::file::v3::{
    file_access_log::AccessLogFormat as FileFormat, FileAccessLog,
};
use portico_proto::envoy::extensions::access_loggers::stream::v3::{
    stderr_access_log, stdout_access_log, StderrAccessLog, StdoutAccessLog,
};
use portico_proto::envoy::extensions::filters::http::router::v3::Router;
use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, PathWithEscapedSlashesAction, RouteSpecifier,
        ServerHeaderTransformation, StripPortMode,
    },
    http_filter, HttpConnectionManager,
};
use prost::Name;

use super::local_reply::LocalReplies;
use super::route::RouteTable;
use super::{duration, inline_bytes, socket_addr, unpack, ConfigError};
use crate::access_log::{LogFilter, LogFormat};

/// Where a listener's routes come from.
#[derive(Debug)]
pub enum Routes {
    /// A `RouteConfiguration` by name, over RDS.
    Rds(Arc<str>),
    /// Inline in the listener.
    Inline(Arc<RouteTable>),
}

/// Which HTTP versions the listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// HTTP/1.1 and h2c with prior knowledge.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// What a listener does with a request header whose name has an
/// underscore (`common_http_protocol_options.headers_with_underscores_action`).
/// Such names are legal HTTP, but some upstreams read `x_user` and
/// `x-user` as one header (CGI turns both into `HTTP_X_USER`), which lets a
/// client smuggle past a header the gateway sets or checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underscores {
    /// Pass them on (Envoy's default).
    Allow,
    /// HTTP/1.1: a 400 and the connection closes; HTTP/2: the stream is
    /// reset.
    Reject,
    /// Remove them before any filter or route sees the request.
    Drop,
}

/// Rules on a request head's fields, applied by both codecs as they
/// parse, as Envoy's codecs apply them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRules {
    /// Most header fields a request may have
    /// (`common_http_protocol_options.max_headers_count`, 100 by default),
    /// counted as Envoy's codecs count: HTTP/1.1 its header fields (not the
    /// request line), HTTP/2 its pseudo-headers too. Over it: a 431 over
    /// HTTP/1.1, a stream reset over HTTP/2.
    pub max_count: usize,
    /// Names with an underscore.
    pub underscores: Underscores,
}

impl Default for HeaderRules {
    fn default() -> Self {
        HeaderRules {
            max_count: 100,
            underscores: Underscores::Allow,
        }
    }
}

/// What a listener does with `%2F` and `%5C` (escaped `/` and `\`) in a
/// request path (the HCM's `path_with_escaped_slashes_action`): a route
/// for `/public/` must not let `/public%2F..%2Fadmin` through to an
/// upstream that decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Leave them (Envoy's default).
    Keep,
    /// Answer 400.
    Reject,
    /// Unescape them, and answer 307 with the new path (gRPC: 400, as a
    /// gRPC client does not follow redirects).
    Redirect,
    /// Unescape them and go on with the new path.
    Forward,
}

/// One access log of a listener: where, and in which format.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// Where lines go.
    pub target: LogTarget,
    /// `None`: Envoy's default fields as JSON.
    pub format: Option<Arc<LogFormat>>,
    /// Which requests get a line (`None`: all).
    pub filter: Option<Arc<LogFilter>>,
}

impl AccessLogConfig {
    fn new(
        target: LogTarget,
        format: Option<Result<LogFormat, String>>,
        at: &str,
    ) -> Result<AccessLogConfig, ConfigError> {
        let format = format
            .transpose()
            .map_err(|e| ConfigError::new(at, format!("log format: {e}")))?;
        Ok(AccessLogConfig {
            target,
            format: format.map(Arc::new),
            filter: None,
        })
    }
}

/// A `SubstitutionFormatString`'s format (`None`: the default). The
/// deprecated `text_format` is still what most configurations use.
#[allow(deprecated)]
pub(crate) fn substitution(l: &SubstitutionFormatString) -> Option<Result<LogFormat, String>> {
    let format = match &l.format {
        None => None,
        Some(substitution_format_string::Format::TextFormat(t)) => Some(LogFormat::text(t)),
        Some(substitution_format_string::Format::JsonFormat(j)) => Some(LogFormat::json(&j.fields)),
        Some(substitution_format_string::Format::TextFormatSource(d)) => {
            Some(match inline_bytes(d) {
                Some(t) => LogFormat::text(&String::from_utf8_lossy(t)),
                None => Err("text_format_source must be inline".into()),
            })
        }
    };
    if l.omit_empty_values {
        format.map(|f| f.map(LogFormat::omitting_empty))
    } else {
        format
    }
}

/// A converted listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// Resource name.
    pub name: Arc<str>,
    /// Where to listen.
    pub address: SocketAddr,
    /// How its socket is set up (a change of it binds anew).
    pub socket: ListenSocket,
    /// The connections the listener's filter chain takes (`None`: all);
    /// others are closed at once.
    pub chain_match: Option<ChainMatch>,
    /// The HCM's stat prefix.
    pub stat_prefix: Arc<str>,
    /// Routes.
    pub routes: Routes,
    /// The port taken off the request's host.
    pub strip_port: StripPort,
    /// Remove a trailing dot from the host name before routing
    /// (`strip_trailing_host_dot`).
    pub strip_trailing_host_dot: bool,
    /// HTTP versions.
    pub codec: Codec,
    /// Upgrades (WebSocket, or any protocol listed) allowed on every route
    /// that does not say otherwise.
    pub upgrades: super::upgrades::Upgrades,
    /// Access logs.
    pub access_logs: Vec<AccessLogConfig>,
    /// Time allowed for a request's headers to arrive.
    pub request_headers_timeout: Duration,
    /// Time allowed for a whole request to arrive, unless its answer has
    /// started (the HCM's `request_timeout`; `None` unset or 0).
    pub request_timeout: Option<Duration>,
    /// Limit on request header size.
    pub max_request_headers: usize,
    /// What HTTP/1.0 requests get (`http_protocol_options`).
    pub http10: Http10,
    /// Downstream HTTP/2 limits (`http2_protocol_options`).
    pub h2: H2Limits,
    /// The most of a request body kept for retries and mirrors, unless
    /// the route says otherwise (`per_connection_buffer_limit_bytes`,
    /// 1 MiB by default as in Envoy).
    pub body_buffer_limit: u64,
    /// Idle connection timeout.
    pub idle_timeout: Option<Duration>,
    /// How long a stream may go without activity (the HCM's
    /// `stream_idle_timeout`; `None` when turned off with 0).
    pub stream_idle_timeout: Option<Duration>,
    /// How long any stream may last (the HCM's
    /// `common_http_protocol_options.max_stream_duration`; `None` unset or
    /// 0); a route's `max_stream_duration` replaces it.
    pub max_stream_duration: Option<Duration>,
    /// The HCM's `proxy_100_continue`: a request's `Expect: 100-continue`
    /// goes upstream, and an HTTP/1.1 upstream's `100 Continue` is what
    /// asks the client for the body. Off (Envoy's default): the header is
    /// dropped, and the proxy asks for the body itself.
    pub proxy_100_continue: bool,
    /// Requests a downstream connection may carry before it is drained
    /// (`common_http_protocol_options.max_requests_per_connection`).
    pub max_requests_per_connection: Option<u64>,
    /// How long a downstream connection may live before it is drained
    /// (`common_http_protocol_options.max_connection_duration`).
    pub max_connection_duration: Option<Duration>,
    /// Up to this share more of it, drawn per connection
    /// (`max_connection_duration_jitter`, a fraction of 1), so that
    /// connections opened together do not all end together.
    pub max_connection_jitter: f64,
    /// An idle HTTP/1.1 connection past its age is not closed: the next
    /// request's answer says `Connection: close` and the connection ends
    /// after it (`http1_safe_max_connection_duration`, RFC 9112 section
    /// 9.6).
    pub http1_safe_max_duration: bool,
    /// How long a removed listener lets open requests finish.
    pub drain_timeout: Duration,
    /// How the client of a request is found (x-forwarded-for and
    /// internal addresses).
    pub client: ClientAddressing,
    /// Keep an edge request's own `x-request-id` (the HCM's
    /// `preserve_external_request_id`); otherwise it gets a new one.
    pub preserve_external_request_id: bool,
    /// Normalize request paths (RFC 3986) before routing.
    pub normalize_path: bool,
    /// Merge runs of slashes in request paths before routing.
    pub merge_slashes: bool,
    /// Escaped slashes in request paths.
    pub escaped_slashes: EscapedSlashes,
    /// Rules on request header fields.
    pub header_rules: HeaderRules,
    /// Whether the router adds its `x-envoy-*` headers
    /// (`x-envoy-upstream-service-time`, `x-envoy-expected-rq-timeout-ms`,
    /// `x-envoy-original-path`): the router's `!suppress_envoy_headers`.
    pub envoy_headers: bool,
    /// The `server` response header (the HCM's `server_name` and
    /// `server_header_transformation`).
    pub server_header: ServerHeader,
    /// Give a request without an `x-request-id` one (the HCM's
    /// `generate_request_id`, on unless set false).
    pub generate_request_id: bool,
    /// Copy the request's `x-request-id` into the response
    /// (`always_set_request_id_in_response`).
    pub request_id_in_response: bool,
    /// Appended to the `via` header of requests and responses (the HCM's
    /// `via`; `None` when empty).
    pub via: Option<http::HeaderValue>,
    /// How the proxy's own answers look (`local_reply_config`).
    pub local_replies: Option<LocalReplies>,
}

/// Which port the listener takes off the request's host before routing
/// (Envoy's `strip_any_host_port` and `strip_matching_host_port`); the
/// request goes upstream without it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripPort {
    /// None.
    Keep,
    /// Any.
    Any,
    /// The listener's own.
    Matching(u16),
}

/// What the listener does with the `server` header of its responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHeader {
    /// Set it, replacing the upstream's (Envoy's default, with `envoy`).
    Overwrite(http::HeaderValue),
    /// Set it only when the response has none.
    AppendIfAbsent(http::HeaderValue),
    /// Leave the response's as it is, or absent.
    PassThrough,
}

impl ListenerConfig {
    /// Converts a Listener; every error names the place.
    pub fn convert(l: &Listener) -> Result<Self, ConfigError> {
        let at = format!("Listener {:?}", l.name);
        let address = socket_addr(l.address.as_ref(), &format!("{at} address"))?;
        if !l.listener_filters.is_empty() {
            return Err(ConfigError::new(&at, "listener_filters are not supported"));
        }
        // Each would change which connections the listener takes, or how.
        let refused = [
            (!l.additional_addresses.is_empty(), "additional_addresses"),
            (l.fcds_config.is_some(), "fcds_config"),
            (l.filter_chain_matcher.is_some(), "filter_chain_matcher"),
            (
                l.use_original_dst.is_some_and(|b| b.value),
                "use_original_dst",
            ),
            (
                l.bind_to_port.is_some_and(|b| !b.value),
                "bind_to_port: false",
            ),
            (l.transparent.is_some_and(|b| b.value), "transparent"),
            (l.enable_mptcp, "enable_mptcp"),
            (l.udp_listener_config.is_some(), "udp_listener_config"),
            (l.api_listener.is_some(), "api_listener"),
            (l.listener_specifier.is_some(), "internal_listener"),
        ];
        super::refuse(&at, &refused)?;
        let chains: Vec<_> = l
            .filter_chains
            .iter()
            .chain(l.default_filter_chain.iter())
            .collect();
        let [chain] = chains.as_slice() else {
            return Err(ConfigError::new(
                &at,
                format!(
                    "exactly one filter chain is supported, got {}",
                    chains.len()
                ),
            ));
        };
        let chain_match = chain
            .filter_chain_match
            .as_ref()
            .map(|m| ChainMatch::convert(m, &format!("{at} filter_chain_match")))
            .transpose()?
            .flatten();
        if chain.transport_socket.is_some() {
            return Err(ConfigError::new(
                &at,
                "TLS termination (transport_socket) is not supported yet",
            ));
        }
        let [f] = chain.filters.as_slice() else {
            return Err(ConfigError::new(&at, "the filter chain must hold exactly one network filter, the HTTP connection manager"));
        };
        let fat = format!("{at} filter {:?}", f.name);
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return Err(ConfigError::new(&fat, "needs a typed_config"));
        };
        let hcm: HttpConnectionManager = unpack(any, &fat)?;
        let socket = ListenSocket::convert(l, address, &at)?;
        Ok(ListenerConfig {
            chain_match,
            socket,
            ..Self::from_hcm(l, address, hcm, &fat)?
        })
    }

    fn from_hcm(
        l: &Listener,
        address: SocketAddr,
        hcm: HttpConnectionManager,
        at: &str,
    ) -> Result<Self, ConfigError> {
        let routes = match &hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => {
                if rds.route_config_name.is_empty() {
                    return Err(ConfigError::new(at, "rds.route_config_name is empty"));
                }
                Routes::Rds(rds.route_config_name.as_str().into())
            }
            Some(RouteSpecifier::RouteConfig(rc)) => {
                Routes::Inline(Arc::new(RouteTable::convert(rc)?))
            }
            Some(RouteSpecifier::ScopedRoutes(_)) => {
                return Err(ConfigError::new(at, "scoped_routes are not supported"))
            }
            None => {
                return Err(ConfigError::new(
                    at,
                    "no route specifier (rds or route_config)",
                ))
            }
        };
        if let Some(e) = hcm.original_ip_detection_extensions.first() {
            // They replace the x-forwarded-for rules below; ignoring one
            // would take the client address from the wrong place.
            return Err(ConfigError::new(
                at,
                format!(
                    "original_ip_detection_extensions ({}) are not supported; \
                     set xff_num_trusted_hops on the connection manager instead",
                    e.name
                ),
            ));
        }
        // Each would change what goes upstream if ignored.
        let refused = [
            (
                !hcm.early_header_mutation_extensions.is_empty(),
                "early_header_mutation_extensions",
            ),
            (
                hcm.scheme_header_transformation
                    .as_ref()
                    .is_some_and(|t| t.match_upstream || t.transformation.is_some()),
                "scheme_header_transformation",
            ),
            (
                hcm.add_user_agent.is_some_and(|b| b.value),
                "add_user_agent",
            ),
            (
                hcm.path_normalization_options.as_ref().is_some_and(|p| {
                    p.forwarding_transformation.is_some() || p.http_filter_transformation.is_some()
                }),
                "path_normalization_options",
            ),
            (
                hcm.typed_header_validation_config.is_some(),
                "typed_header_validation_config",
            ),
            (
                hcm.represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
                "represent_ipv4_remote_address_as_ipv4_mapped_ipv6",
            ),
            (hcm.proxy_status_config.is_some(), "proxy_status_config"),
            (
                hcm.request_id_extension
                    .as_ref()
                    .and_then(|r| r.typed_config.as_ref())
                    .is_some_and(|a| !a.type_url.ends_with(".UuidRequestIdConfig")),
                "request_id_extension other than the UUID one",
            ),
        ];
        super::refuse(at, &refused)?;
        let router = check_http_filters(&hcm, at)?;
        let server_header = server_header(&hcm, at)?;
        let codec = match CodecType::try_from(hcm.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => return Err(ConfigError::new(at, "codec_type HTTP3 is not supported")),
        };
        let access_logs = hcm
            .access_log
            .iter()
            .map(|a| {
                let aat = format!("{at} access_log {:?}", a.name);
                let filter = a
                    .filter
                    .as_ref()
                    .map(|f| LogFilter::convert(f, &format!("{aat} filter")).map(Arc::new))
                    .transpose()?;
                let Some(access_log::ConfigType::TypedConfig(any)) = &a.config_type else {
                    return Err(ConfigError::new(&aat, "needs a typed_config"));
                };
                let made = if any.type_url == FileAccessLog::type_url() {
                    let f: FileAccessLog = unpack(any, &aat)?;
                    let target = match f.path.as_str() {
                        "/dev/stdout" => LogTarget::Stdout,
                        "/dev/stderr" => LogTarget::Stderr,
                        "" => return Err(ConfigError::new(&aat, "path is empty")),
                        p => LogTarget::File(p.into()),
                    };
                    #[allow(deprecated)]
                    let format = match &f.access_log_format {
                        None => None,
                        Some(FileFormat::Format(t)) if t.is_empty() => None,
                        Some(FileFormat::Format(t)) => Some(LogFormat::text(t)),
                        Some(FileFormat::JsonFormat(j) | FileFormat::TypedJsonFormat(j)) => {
                            Some(LogFormat::json(&j.fields))
                        }
                        Some(FileFormat::LogFormat(l)) => substitution(l),
                    };
                    AccessLogConfig::new(target, format, &aat)
                } else if any.type_url == StdoutAccessLog::type_url() {
                    let f: StdoutAccessLog = unpack(any, &aat)?;
                    let format = f.access_log_format.as_ref().and_then(|f| match f {
                        stdout_access_log::AccessLogFormat::LogFormat(l) => substitution(l),
                    });
                    AccessLogConfig::new(LogTarget::Stdout, format, &aat)
                } else if any.type_url == StderrAccessLog::type_url() {
                    let f: StderrAccessLog = unpack(any, &aat)?;
                    let format = f.access_log_format.as_ref().and_then(|f| match f {
                        stderr_access_log::AccessLogFormat::LogFormat(l) => substitution(l),
                    });
                    AccessLogConfig::new(LogTarget::Stderr, format, &aat)
                } else {
                    Err(ConfigError::new(
                        &aat,
                        format!("access logger {} is not supported", any.type_url),
                    ))
                };
                made.map(|c| AccessLogConfig { filter, ..c })
            })
            .collect::<Result<_, _>>()?;
        let common = hcm.common_http_protocol_options.as_ref();
        if common.is_some_and(|c| c.max_response_headers_kb.is_some()) {
            // Envoy's words: the limit is a cluster's.
            return Err(ConfigError::new(
                at,
                "max_response_headers_kb cannot be set on http_connection_manager",
            ));
        }
        let header_rules = HeaderRules {
            max_count: match common.and_then(|c| c.max_headers_count.as_ref()) {
                None => 100,
                Some(n) if n.value == 0 => {
                    return Err(ConfigError::new(
                        at,
                        "common_http_protocol_options.max_headers_count must be at least 1",
                    ))
                }
                Some(n) => n.value as usize,
            },
            underscores: match common.map(|c| c.headers_with_underscores_action) {
                None => Underscores::Allow,
                Some(a) => match HeadersWithUnderscoresAction::try_from(a) {
                    Ok(HeadersWithUnderscoresAction::Allow) => Underscores::Allow,
                    Ok(HeadersWithUnderscoresAction::RejectRequest) => Underscores::Reject,
                    Ok(HeadersWithUnderscoresAction::DropHeader) => Underscores::Drop,
                    Err(_) => {
                        return Err(ConfigError::new(
                            at,
                            format!("unknown headers_with_underscores_action {a}"),
                        ))
                    }
                },
            },
        };
        let escaped_slashes =
            match PathWithEscapedSlashesAction::try_from(hcm.path_with_escaped_slashes_action) {
                Ok(
                    PathWithEscapedSlashesAction::ImplementationSpecificDefault
                    | PathWithEscapedSlashesAction::KeepUnchanged,
                ) => EscapedSlashes::Keep,
                Ok(PathWithEscapedSlashesAction::RejectRequest) => EscapedSlashes::Reject,
                Ok(PathWithEscapedSlashesAction::UnescapeAndRedirect) => EscapedSlashes::Redirect,
                Ok(PathWithEscapedSlashesAction::UnescapeAndForward) => EscapedSlashes::Forward,
                Err(_) => {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "unknown path_with_escaped_slashes_action {}",
                            hcm.path_with_escaped_slashes_action
                        ),
                    ))
                }
            };
        Ok(ListenerConfig {
            chain_match: None,
            socket: ListenSocket::default(),
            name: l.name.as_str().into(),
            address,
            stat_prefix: hcm.stat_prefix.as_str().into(),
            routes,
            strip_port: if matches!(
                hcm.strip_port_mode,
                Some(StripPortMode::StripAnyHostPort(true))
            ) {
                StripPort::Any
            } else if hcm.strip_matching_host_port {
                StripPort::Matching(address.port())
            } else {
                StripPort::Keep
            },
            strip_trailing_host_dot: hcm.strip_trailing_host_dot,
            codec,
            upgrades: {
                if let Some(i) = hcm
                    .upgrade_configs
                    .iter()
                    .position(|u| !u.filters.is_empty())
                {
                    return Err(ConfigError::new(
                        &format!("{at} upgrade_configs[{i}]"),
                        "filters for upgrades are not supported",
                    ));
                }
                super::upgrades::Upgrades::convert(
                    hcm.upgrade_configs
                        .iter()
                        .map(|u| (u.upgrade_type.as_str(), u.enabled.is_none_or(|e| e.value))),
                    at,
                )?
            },
            access_logs,
            // Envoy has no header timeout by default; a gateway facing the
            // internet needs one against slow-header attacks.
            request_headers_timeout: hcm
                .request_headers_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(10)),
            request_timeout: hcm
                .request_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            http10: Http10::convert(hcm.http_protocol_options.as_ref(), at)?,
            h2: H2Limits::convert(
                hcm.http2_protocol_options.as_ref(),
                hcm.stream_error_on_invalid_http_message
                    .as_ref()
                    .map(|v| v.value),
                at,
            )?,
            body_buffer_limit: l
                .per_connection_buffer_limit_bytes
                .as_ref()
                .map_or(1 << 20, |v| u64::from(v.value)),
            max_request_headers: hcm
                .max_request_headers_kb
                .as_ref()
                .map_or(60, |v| v.value as usize)
                * 1024,
            idle_timeout: Some(
                common
                    .and_then(|c| c.idle_timeout.as_ref())
                    .map(duration)
                    .unwrap_or(Duration::from_secs(3600)),
            )
            .filter(|d| !d.is_zero()),
            // Envoy's default: 5 minutes.
            stream_idle_timeout: Some(
                hcm.stream_idle_timeout
                    .as_ref()
                    .map(duration)
                    .unwrap_or(Duration::from_secs(300)),
            )
            .filter(|d| !d.is_zero()),
            max_stream_duration: common
                .and_then(|c| c.max_stream_duration.as_ref())
                .map(duration)
                .filter(|d| !d.is_zero()),
            proxy_100_continue: hcm.proxy_100_continue,
            max_requests_per_connection: common
                .and_then(|c| c.max_requests_per_connection.as_ref())
                .map(|v| u64::from(v.value))
                .filter(|n| *n > 0),
            max_connection_duration: common
                .and_then(|c| c.max_connection_duration.as_ref())
                .map(duration)
                .filter(|d| !d.is_zero()),
            max_connection_jitter: match common
                .and_then(|c| c.max_connection_duration_jitter.as_ref())
                .map(|p| p.value)
            {
                None => 0.0,
                Some(p) if (0.0..=100.0).contains(&p) => p / 100.0,
                Some(p) => {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "common_http_protocol_options.max_connection_duration_jitter {p} is not a percentage"
                        ),
                    ))
                }
            },
            http1_safe_max_duration: hcm.http1_safe_max_connection_duration,
            drain_timeout: hcm
                .drain_timeout
                .as_ref()
                .map(duration)
                .unwrap_or(Duration::from_secs(5)),
            client: ClientAddressing {
                use_remote_address: hcm.use_remote_address.is_some_and(|b| b.value),
                xff_num_trusted_hops: hcm.xff_num_trusted_hops,
                skip_xff_append: hcm.skip_xff_append,
                keep_client_cert: hcm.forward_client_cert_details
                    == ForwardClientCertDetails::AlwaysForwardOnly as i32,
                forwarded_port: hcm
                    .append_x_forwarded_port
                    .then(|| http::HeaderValue::from(address.port())),
                internal: match &hcm.internal_address_config {
                    None => AddressRanges::default(),
                    Some(c) => AddressRanges::convert(
                        &c.cidr_ranges,
                        "internal_address_config.cidr_ranges",
                        at,
                    )?,
                },
            },
            preserve_external_request_id: hcm.preserve_external_request_id,
            normalize_path: hcm.normalize_path.is_some_and(|b| b.value),
            merge_slashes: hcm.merge_slashes,
            escaped_slashes,
            header_rules,
            envoy_headers: !router.suppress_envoy_headers,
            server_header,
            generate_request_id: hcm.generate_request_id.is_none_or(|b| b.value),
            request_id_in_response: hcm.always_set_request_id_in_response,
            local_replies: hcm
                .local_reply_config
                .as_ref()
                .map(|c| LocalReplies::convert(c, at))
                .transpose()?,
            via: match hcm.via.as_str() {
                "" => None,
                v => Some(http::HeaderValue::from_str(v).map_err(|_| {
                    ConfigError::new(at, format!("via {v:?} is not a valid header value"))
                })?),
            },
        })
    }
}

/// How the connection manager finds who a request is from (Envoy's
/// x-forwarded-for rules).
#[derive(Debug, Clone, Default)]
pub struct ClientAddressing {
    /// The connection's peer is the client (the HCM's
    /// `use_remote_address`): its address is appended to x-forwarded-for,
    /// and a request from outside `internal` is an edge request.
    /// Otherwise the client is read from x-forwarded-for.
    pub use_remote_address: bool,
    /// Proxies in front of this one whose x-forwarded-for entries are
    /// trusted (the HCM's `xff_num_trusted_hops`).
    pub xff_num_trusted_hops: u32,
    /// Leave x-forwarded-for as it came (the HCM's `skip_xff_append`).
    pub skip_xff_append: bool,
    /// The addresses whose requests are internal (the HCM's
    /// `internal_address_config`; none unless configured, as in Envoy 1.33
    /// and later).
    pub internal: AddressRanges,
    /// Pass a client's `x-forwarded-client-cert` on (the HCM's
    /// `forward_client_cert_details: ALWAYS_FORWARD_ONLY`); every other
    /// mode removes it from a connection without client certificates,
    /// which is every connection until TLS comes.
    pub keep_client_cert: bool,
    /// The listener's port, to tell the upstream as `x-forwarded-port`
    /// (the HCM's `append_x_forwarded_port`).
    pub forwarded_port: Option<http::HeaderValue>,
}

/// Downstream HTTP/2 limits, from the HCM's `http2_protocol_options`.
/// Unset, Portico's own (Envoy's defaults are 2^31-1 streams and 256 MiB
/// windows, which let one client hold that much of the proxy's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// Streams a client may have open at once
    /// (`max_concurrent_streams`, 256 here).
    pub max_streams: u32,
    /// Each stream's receive window: what a client may send of one
    /// request body before the proxy has passed it on
    /// (`initial_stream_window_size`, 1 MiB here).
    pub stream_window: u32,
    /// The connection's receive window, all request bodies together
    /// (`initial_connection_window_size`, 2 MiB here).
    pub conn_window: u32,
    /// A PING every so often, the connection closed when one goes
    /// unanswered this long (`connection_keepalive`; see
    /// [`super::h2_keepalive`]).
    pub keepalive: Option<(std::time::Duration, std::time::Duration)>,
    /// When set, a malformed request (RFC 9113 section 8.1.1: a bad
    /// field, a missing pseudo-header, a body that disagrees with its
    /// content-length) resets its stream alone; unset (Envoy's default),
    /// it ends the whole connection with a GOAWAY (the HCM's
    /// `stream_error_on_invalid_http_message`, overridden by
    /// `override_stream_error_on_invalid_http_message` here).
    pub stream_error_on_invalid: bool,
}

impl Default for H2Limits {
    fn default() -> Self {
        H2Limits {
            max_streams: 256,
            stream_window: 1 << 20,
            conn_window: 2 << 20,
            keepalive: None,
            stream_error_on_invalid: false,
        }
    }
}

impl H2Limits {
    /// `hcm_stream_error` is the HCM's `stream_error_on_invalid_http_message`.
    fn convert(
        o: Option<&portico_proto::envoy::config::core::v3::Http2ProtocolOptions>,
        hcm_stream_error: Option<bool>,
        at: &str,
    ) -> Result<Self, ConfigError> {
        let d = H2Limits {
            stream_error_on_invalid: hcm_stream_error.unwrap_or_default(),
            ..H2Limits::default()
        };
        let Some(o) = o else { return Ok(d) };
        let at = format!("{at} http2_protocol_options");
        let window = |v: Option<u32>, name: &str, default: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(default),
                Some(n) if (65_535..=2_147_483_647).contains(&n) => Ok(n),
                Some(n) => Err(ConfigError::new(
                    &at,
                    format!("{name} {n} is outside 65535..2147483647"),
                )),
            }
        };
        if o.allow_connect || !o.custom_settings_parameters.is_empty() {
            return Err(ConfigError::new(
                &at,
                "allow_connect and custom_settings_parameters are not supported",
            ));
        }
        Ok(H2Limits {
            max_streams: match o.max_concurrent_streams.as_ref().map(|v| v.value) {
                None => d.max_streams,
                Some(0) => {
                    return Err(ConfigError::new(
                        &at,
                        "max_concurrent_streams must be at least 1",
                    ))
                }
                Some(n) => n,
            },
            stream_window: window(
                o.initial_stream_window_size.as_ref().map(|v| v.value),
                "initial_stream_window_size",
                d.stream_window,
            )?,
            conn_window: window(
                o.initial_connection_window_size.as_ref().map(|v| v.value),
                "initial_connection_window_size",
                d.conn_window,
            )?,
            keepalive: match &o.connection_keepalive {
                None => None,
                Some(k) => super::h2_keepalive(k, &at)?,
            },
            // Envoy's order: the override, then the HCM's field, then the
            // deprecated field it replaced.
            #[allow(deprecated)]
            stream_error_on_invalid: o
                .override_stream_error_on_invalid_http_message
                .as_ref()
                .map(|v| v.value)
                .or(hcm_stream_error)
                .unwrap_or(o.stream_error_on_invalid_http_messaging),
        })
    }
}

/// The connection manager's rules for HTTP/1.0 requests (Envoy's
/// `Http1ProtocolOptions`).
#[derive(Debug, Clone, Default)]
pub struct Http10 {
    /// Served (`accept_http_10`); otherwise answered 426 Upgrade Required,
    /// Envoy's default.
    pub accept: bool,
    /// The Host of one that has none (`default_host_for_http_10`).
    pub default_host: Option<http::HeaderValue>,
}

impl Http10 {
    /// From the HCM's `http_protocol_options`, refusing by name the
    /// options that would change answers if ignored.
    fn convert(o: Option<&Http1ProtocolOptions>, at: &str) -> Result<Self, ConfigError> {
        let Some(o) = o else {
            return Ok(Http10::default());
        };
        let at = format!("{at} http_protocol_options");
        let refused = [
            (
                o.allow_absolute_url.is_some_and(|b| !b.value),
                "allow_absolute_url: false",
            ),
            (o.header_key_format.is_some(), "header_key_format"),
            // Both framings on one request are refused (no smuggling).
            (o.allow_chunked_length, "allow_chunked_length"),
            (
                !o.ignore_http_11_upgrade.is_empty(),
                "ignore_http_11_upgrade",
            ),
        ];
        super::refuse(&at, &refused)?;
        let default_host = match o.default_host_for_http_10.as_str() {
            "" => None,
            h => Some(http::HeaderValue::from_str(h).map_err(|_| {
                ConfigError::new(
                    &at,
                    format!("default_host_for_http_10 {h:?} is not a valid host"),
                )
            })?),
        };
        Ok(Http10 {
            accept: o.accept_http_10,
            default_host,
        })
    }
}

/// How a listener's socket is set up: Envoy's `socket_options`,
/// `tcp_keepalive` and `tcp_backlog_size` (accepted connections inherit
/// keep-alive from it, as the kernel copies it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListenSocket {
    /// Options set on it, each at its stage.
    pub options: Vec<SocketOption>,
    /// TCP keep-alive.
    pub keepalive: Option<super::Keepalive>,
    /// The accept queue's length (`tcp_backlog_size`; 4,096 unless set).
    pub backlog: Option<u32>,
}

/// One of Envoy's `socket_options`: a raw `setsockopt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOption {
    /// What it is for (`description`), for errors.
    pub description: String,
    /// `level`.
    pub level: i32,
    /// `name`.
    pub name: i32,
    /// `int_value` (as a C int) or `buf_value`.
    pub value: Vec<u8>,
    /// When it is set (`state`).
    pub stage: SocketStage,
}

/// When a socket option is set: before the bind, after it, or once the
/// socket listens (Envoy's `SocketState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketStage {
    /// `STATE_PREBIND`.
    Prebind,
    /// `STATE_BOUND`.
    Bound,
    /// `STATE_LISTENING`.
    Listening,
}

impl ListenSocket {
    fn convert(l: &Listener, address: SocketAddr, at: &str) -> Result<Self, ConfigError> {
        use portico_proto::envoy::config::core::v3::socket_option::{
            SocketIpVersion, SocketState, Value,
        };
        let mut options = Vec::new();
        for (i, o) in l.socket_options.iter().enumerate() {
            let oat = format!("{at} socket_options[{i}]");
            // Only for datagram sockets: not this (TCP) listener's.
            if o.r#type
                .as_ref()
                .is_some_and(|t| t.stream.is_none() && t.datagram.is_some())
            {
                continue;
            }
            match SocketIpVersion::try_from(o.ip_version) {
                Ok(SocketIpVersion::Unspecified) => {}
                Ok(SocketIpVersion::Ipv4) if address.is_ipv4() => {}
                Ok(SocketIpVersion::Ipv6) if address.is_ipv6() => {}
                // For the other family: not this listener's.
                Ok(_) => continue,
                Err(_) => {
                    return Err(ConfigError::new(
                        &oat,
                        format!("unknown ip_version {}", o.ip_version),
                    ))
                }
            }
            let int = |v: i64, what: &str| {
                i32::try_from(v)
                    .map_err(|_| ConfigError::new(&oat, format!("{what} {v} does not fit a C int")))
            };
            let value = match &o.value {
                Some(Value::IntValue(v)) => int(*v, "int_value")?.to_ne_bytes().to_vec(),
                Some(Value::BufValue(b)) => b.clone(),
                None => return Err(ConfigError::new(&oat, "needs an int_value or a buf_value")),
            };
            let stage = match SocketState::try_from(o.state) {
                Ok(SocketState::StatePrebind) => SocketStage::Prebind,
                Ok(SocketState::StateBound) => SocketStage::Bound,
                Ok(SocketState::StateListening) => SocketStage::Listening,
                Err(_) => return Err(ConfigError::new(&oat, format!("unknown state {}", o.state))),
            };
            options.push(SocketOption {
                description: o.description.clone(),
                level: int(o.level, "level")?,
                name: int(o.name, "name")?,
                value,
                stage,
            });
        }
        Ok(ListenSocket {
            options,
            keepalive: match &l.tcp_keepalive {
                None => None,
                Some(k) => super::Keepalive::convert(k, at)?,
            },
            backlog: l
                .tcp_backlog_size
                .as_ref()
                .map(|b| b.value.clamp(1, i32::MAX as u32)),
        })
    }
}

/// A filter chain's `filter_chain_match`. A listener has one chain here,
/// and no default chain, so a connection it does not match is closed, as
/// Envoy closes a connection no chain matches.
#[derive(Debug, Clone, Default)]
pub struct ChainMatch {
    destination_port: Option<u16>,
    /// `prefix_ranges`: the address the client connected to.
    destination: AddressRanges,
    /// `direct_source_prefix_ranges` and `source_prefix_ranges`: the
    /// same here (no PROXY protocol), both must hold.
    sources: [AddressRanges; 2],
    source_type: SourceType,
    source_ports: Vec<u16>,
    /// It asks for a server name, TLS or an application protocol, which a
    /// plaintext connection, with no listener filter to find them, never
    /// has.
    never: bool,
}

/// `filter_chain_match.source_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum SourceType {
    #[default]
    Any,
    /// `SAME_IP_OR_LOOPBACK`: from this host.
    Local,
    /// `EXTERNAL`: from elsewhere.
    External,
}

impl ChainMatch {
    /// `None` when the match takes every connection.
    fn convert(m: &FilterChainMatch, at: &str) -> Result<Option<Self>, ConfigError> {
        if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
            // Envoy does not implement them either.
            return Err(ConfigError::new(
                at,
                "address_suffix and suffix_len are not supported",
            ));
        }
        let destination_port = match m.destination_port.as_ref().map(|p| p.value) {
            None => None,
            Some(p) => Some(u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                ConfigError::new(at, format!("destination_port {p} is not a port"))
            })?),
        };
        let source_ports =
            m.source_ports
                .iter()
                .map(|&p| {
                    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                        ConfigError::new(at, format!("source_ports: {p} is not a port"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
        let source_type = match ConnectionSourceType::try_from(m.source_type) {
            Ok(ConnectionSourceType::Any) => SourceType::Any,
            Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::Local,
            Ok(ConnectionSourceType::External) => SourceType::External,
            Err(_) => {
                return Err(ConfigError::new(
                    at,
                    format!("source_type {} is not a source type", m.source_type),
                ))
            }
        };
        let never = !m.server_names.is_empty()
            || !matches!(m.transport_protocol.as_str(), "" | "raw_buffer")
            || !m.application_protocols.is_empty();
        let out = ChainMatch {
            destination_port,
            destination: AddressRanges::convert(&m.prefix_ranges, "prefix_ranges", at)?,
            sources: [
                AddressRanges::convert(
                    &m.direct_source_prefix_ranges,
                    "direct_source_prefix_ranges",
                    at,
                )?,
                AddressRanges::convert(&m.source_prefix_ranges, "source_prefix_ranges", at)?,
            ],
            source_type,
            source_ports,
            never,
        };
        let all = out.destination_port.is_none()
            && out.destination.is_empty()
            && out.sources.iter().all(AddressRanges::is_empty)
            && out.source_type == SourceType::Any
            && out.source_ports.is_empty()
            && !out.never;
        Ok((!all).then_some(out))
    }

    /// Whether [`ChainMatch::matches`] needs the connection's own address.
    pub fn needs_local(&self) -> bool {
        self.destination_port.is_some()
            || !self.destination.is_empty()
            || self.source_type != SourceType::Any
    }

    /// Whether a connection from `peer` to `local` takes the chain
    /// (`local` as the socket reports it; `None` when unknown, which no
    /// condition on it matches).
    pub fn matches(&self, local: Option<SocketAddr>, peer: SocketAddr) -> bool {
        if self.never {
            return false;
        }
        if let Some(p) = self.destination_port {
            if local.map(|l| l.port()) != Some(p) {
                return false;
            }
        }
        if !self.destination.is_empty() && !local.is_some_and(|l| self.destination.contains(l.ip()))
        {
            return false;
        }
        if self
            .sources
            .iter()
            .any(|r| !r.is_empty() && !r.contains(peer.ip()))
        {
            return false;
        }
        let from_here = || {
            let ip = canonical(peer.ip());
            ip.is_loopback() || local.is_some_and(|l| canonical(l.ip()) == ip)
        };
        match self.source_type {
            SourceType::Any => {}
            SourceType::Local if !from_here() => return false,
            SourceType::External if from_here() => return false,
            SourceType::Local | SourceType::External => {}
        }
        self.source_ports.is_empty() || self.source_ports.contains(&peer.port())
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// IP address ranges (Envoy's `CidrRange` lists): the addresses whose
/// requests are internal (`internal_address_config`'s `cidr_ranges`;
/// `unix_sockets` does not apply: listeners are TCP), and the ranges of a
/// filter chain's match.
#[derive(Debug, Clone, Default)]
pub struct AddressRanges {
    ranges: Vec<(std::net::IpAddr, u8)>,
}

impl AddressRanges {
    /// From Envoy's `CidrRange`s; `field` names the list in errors.
    pub fn convert(ranges: &[CidrRange], field: &str, at: &str) -> Result<Self, ConfigError> {
        Self::parse(
            &ranges
                .iter()
                .map(|r| {
                    (
                        r.address_prefix.as_str(),
                        r.prefix_len.as_ref().map(|p| p.value),
                    )
                })
                .collect::<Vec<_>>(),
            field,
            at,
        )
    }

    /// Ranges from (prefix, length) pairs; a missing length is the whole
    /// address, as in Envoy's `CidrRange`.
    pub fn parse(
        ranges: &[(&str, Option<u32>)],
        field: &str,
        at: &str,
    ) -> Result<Self, ConfigError> {
        let mut out = Vec::with_capacity(ranges.len());
        for (i, (prefix, len)) in ranges.iter().enumerate() {
            let place = || format!("{field}[{i}]");
            let ip: std::net::IpAddr = prefix.parse().map_err(|_| {
                ConfigError::new(at, format!("{}: {prefix:?} is not an IP address", place()))
            })?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = len.unwrap_or(max);
            if len > max {
                return Err(ConfigError::new(
                    at,
                    format!("{}: prefix_len {len} is over {max}", place()),
                ));
            }
            out.push((ip, len as u8));
        }
        Ok(AddressRanges { ranges: out })
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `ip` is in one of the ranges (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        self.ranges.iter().any(|&(net, len)| match (net, ip) {
            (V4(n), V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (V6(n), V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }
}

/// The HCM's `server_name` (`envoy` when empty, as in Envoy) and what to
/// do with it.
fn server_header(hcm: &HttpConnectionManager, at: &str) -> Result<ServerHeader, ConfigError> {
    let value = if hcm.server_name.is_empty() {
        http::HeaderValue::from_static("envoy")
    } else {
        http::HeaderValue::from_str(&hcm.server_name).map_err(|_| {
            ConfigError::new(
                at,
                format!(
                    "server_name {:?} is not a valid header value",
                    hcm.server_name
                ),
            )
        })?
    };
    Ok(
        match ServerHeaderTransformation::try_from(hcm.server_header_transformation) {
            Ok(ServerHeaderTransformation::Overwrite) => ServerHeader::Overwrite(value),
            Ok(ServerHeaderTransformation::AppendIfAbsent) => ServerHeader::AppendIfAbsent(value),
            Ok(ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
            Err(_) => {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "server_header_transformation {} is not a known value",
                        hcm.server_header_transformation
                    ),
                ))
            }
        },
    )
}

/// The filter chain must end with the router; a filter this proxy does not
/// know is an error unless it is marked optional (Envoy's rule). Returns
/// the router's config.
fn check_http_filters(hcm: &HttpConnectionManager, at: &str) -> Result<Router, ConfigError> {
    let Some(last) = hcm.http_filters.last() else {
        return Err(ConfigError::new(
            at,
            "http_filters is empty; the router filter must be last",
        ));
    };
    for (i, f) in hcm.http_filters.iter().enumerate() {
        let fat = format!("{at} http_filters[{i}] {:?}", f.name);
        let type_url = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
            Some(http_filter::ConfigType::ConfigDiscovery(_)) => {
                return Err(ConfigError::new(
                    &fat,
                    "filter config discovery (ECDS) is not supported",
                ));
            }
            None => return Err(ConfigError::new(&fat, "needs a typed_config")),
        };
        let is_router = type_url == Router::type_url();
        if is_router != std::ptr::eq(f, last) {
            return Err(ConfigError::new(
                &fat,
                if is_router {
                    "the router filter must be last"
                } else {
                    "the last filter must be the router"
                },
            ));
        }
        if !is_router && !f.is_optional && !f.disabled {
            return Err(ConfigError::new(
                &fat,
                format!("unknown HTTP filter {type_url} (not optional)"),
            ));
        }
        if !is_router && f.is_optional && !f.disabled {
            // Skipped, as xDS lets a client that lacks an optional filter
            // do; said, for an Envoy that has it would run it (an
            // authorization filter, say).
            tracing::warn!(filter = %fat, type_url, "optional HTTP filter not supported here: skipped");
        }
    }
    let at = format!(
        "{at} http_filters[{}] {:?}",
        hcm.http_filters.len() - 1,
        last.name
    );
    let Some(http_filter::ConfigType::TypedConfig(any)) = &last.config_type else {
        return Err(ConfigError::new(&at, "needs a typed_config"));
    };
    let router: Router = unpack(any, &at)?;
    if !router.upstream_http_filters.is_empty() {
        return Err(ConfigError::new(
            &at,
            "upstream_http_filters are not supported",
        ));
    }
    Ok(router)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::core::v3::{
        address, socket_address, Address, HttpProtocolOptions, SocketAddress, TypedExtensionConfig,
    };
    use portico_proto::envoy::config::listener::v3::{Filter, FilterChain};
    use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpFilter, Rds,
    };
    use portico_proto::google::protobuf::{Any, BoolValue, UInt32Value};
    use prost::Message;

    fn any<M: Message + Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn listener(edit: impl FnOnce(&mut HttpConnectionManager)) -> Listener {
        let mut hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "routes".into(),
                ..Default::default()
            })),
            http_filters: vec![HttpFilter {
                name: "router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(
                    any(&Router::default()),
                )),
                ..Default::default()
            }],
            ..Default::default()
        };
        edit(&mut hcm);
        Listener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "hcm".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn client_addressing_is_read_and_ip_detection_extensions_are_refused() {
        let c = ListenerConfig::convert(&listener(|h| {
            h.use_remote_address = Some(BoolValue { value: true });
            h.xff_num_trusted_hops = 2;
            h.skip_xff_append = true;
            h.preserve_external_request_id = true;
        }))
        .expect("valid");
        assert!(c.client.use_remote_address && c.client.skip_xff_append);
        assert_eq!(c.client.xff_num_trusted_hops, 2);
        assert!(c.preserve_external_request_id);
        let msg = ListenerConfig::convert(&listener(|h| {
            h.original_ip_detection_extensions = vec![TypedExtensionConfig {
                name: "envoy.http.original_ip_detection.custom_header".into(),
                typed_config: None,
            }];
        }))
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("original_ip_detection_extensions")
                && msg.contains("custom_header")
                && msg.contains("xff_num_trusted_hops"),
            "{msg}"
        );
        for (edit, what) in [
            (
                Box::new(|h: &mut HttpConnectionManager| {
                    h.add_user_agent = Some(BoolValue { value: true })
                }) as Box<dyn Fn(&mut HttpConnectionManager)>,
                "add_user_agent",
            ),
            (
                Box::new(|h: &mut HttpConnectionManager| {
                    h.early_header_mutation_extensions = vec![Default::default()]
                }),
                "early_header_mutation_extensions",
            ),
            (
                Box::new(|h: &mut HttpConnectionManager| {
                    h.proxy_status_config = Some(Default::default())
                }),
                "proxy_status_config",
            ),
            (
                Box::new(|h: &mut HttpConnectionManager| {
                    h.represent_ipv4_remote_address_as_ipv4_mapped_ipv6 = true
                }),
                "represent_ipv4_remote_address_as_ipv4_mapped_ipv6",
            ),
            (
                Box::new(|h: &mut HttpConnectionManager| {
                    h.request_id_extension = Some(
                        portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::RequestIdExtension {
                            typed_config: Some(Any {
                                type_url: "type.googleapis.com/example.XrayRequestIdConfig".into(),
                                value: Vec::new(),
                            }),
                        },
                    )
                }),
                "request_id_extension",
            ),
        ] {
            let msg = ListenerConfig::convert(&listener(|h| edit(h)))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(what), "{msg}");
        }
    }

    #[test]
    fn internal_addresses_match_their_ranges_and_bad_ranges_are_named() {
        let r = AddressRanges::parse(
            &[
                ("10.0.0.0", Some(8)),
                ("fd00::", Some(8)),
                ("192.0.2.1", None),
            ],
            "cidr_ranges",
            "l",
        )
        .expect("valid");
        for (ip, inside) in [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("192.0.2.1", true),
            ("192.0.2.2", false),
            ("fd12::1", true),
            ("fe80::1", false),
            ("::ffff:10.9.8.7", true),
        ] {
            assert_eq!(r.contains(ip.parse().unwrap()), inside, "{ip}");
        }
        assert!(!AddressRanges::default().contains("127.0.0.1".parse().unwrap()));
        let all = AddressRanges::parse(&[("0.0.0.0", Some(0))], "cidr_ranges", "l").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for (bad, what) in [
            (("10.0.0.0", Some(33)), "prefix_len 33"),
            (("not-an-ip", Some(8)), "not an IP address"),
        ] {
            let msg = AddressRanges::parse(&[bad], "cidr_ranges", "l")
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(what) && msg.contains("cidr_ranges[0]"),
                "{msg}"
            );
        }
    }

    #[test]
    fn header_rules_and_escaped_slashes() {
        let c = ListenerConfig::convert(&listener(|_| {})).expect("valid");
        assert_eq!(c.header_rules, HeaderRules::default());
        assert_eq!(c.escaped_slashes, EscapedSlashes::Keep);

        let c = ListenerConfig::convert(&listener(|h| {
            h.common_http_protocol_options = Some(HttpProtocolOptions {
                max_headers_count: Some(UInt32Value { value: 250 }),
                headers_with_underscores_action: HeadersWithUnderscoresAction::DropHeader as i32,
                ..Default::default()
            });
            h.path_with_escaped_slashes_action =
                PathWithEscapedSlashesAction::UnescapeAndForward as i32;
        }))
        .expect("valid");
        assert_eq!(
            c.header_rules,
            HeaderRules {
                max_count: 250,
                underscores: Underscores::Drop
            }
        );
        assert_eq!(c.escaped_slashes, EscapedSlashes::Forward);

        let e = ListenerConfig::convert(&listener(|h| {
            h.common_http_protocol_options = Some(HttpProtocolOptions {
                max_headers_count: Some(UInt32Value { value: 0 }),
                ..Default::default()
            });
        }))
        .expect_err("0 fields");
        assert!(e.reason.contains("max_headers_count"), "{e:?}");
        assert!(e.at.contains("Listener \"l\""), "{e:?}");
        let e = ListenerConfig::convert(&listener(|h| {
            h.common_http_protocol_options = Some(HttpProtocolOptions {
                max_response_headers_kb: Some(UInt32Value { value: 90 }),
                ..Default::default()
            });
        }))
        .expect_err("a cluster's limit");
        assert!(
            e.reason
                .contains("max_response_headers_kb cannot be set on http_connection_manager"),
            "{e:?}"
        );
        let e = ListenerConfig::convert(&listener(|h| {
            h.common_http_protocol_options = Some(HttpProtocolOptions {
                headers_with_underscores_action: 7,
                ..Default::default()
            });
        }))
        .expect_err("unknown action");
        assert!(
            e.reason.contains("headers_with_underscores_action 7"),
            "{e:?}"
        );
        let e = ListenerConfig::convert(&listener(|h| h.path_with_escaped_slashes_action = 9))
            .expect_err("unknown action");
        assert!(
            e.reason.contains("path_with_escaped_slashes_action 9"),
            "{e:?}"
        );
    }

    #[test]
    fn router_and_server_header_options() {
        let cfg = |edit: fn(&mut HttpConnectionManager)| ListenerConfig::convert(&listener(edit));
        let c = cfg(|_| {}).expect("defaults");
        assert!(c.envoy_headers);
        assert_eq!(
            c.server_header,
            ServerHeader::Overwrite(http::HeaderValue::from_static("envoy"))
        );
        let c = cfg(|h| {
            h.server_name = "gw".into();
            h.server_header_transformation = ServerHeaderTransformation::AppendIfAbsent as i32;
            h.http_filters[0].config_type =
                Some(http_filter::ConfigType::TypedConfig(any(&Router {
                    suppress_envoy_headers: true,
                    ..Default::default()
                })));
        })
        .expect("converts");
        assert!(!c.envoy_headers);
        assert_eq!(
            c.server_header,
            ServerHeader::AppendIfAbsent(http::HeaderValue::from_static("gw"))
        );
        let c = cfg(|h| {
            h.server_header_transformation = ServerHeaderTransformation::PassThrough as i32
        })
        .expect("converts");
        assert_eq!(c.server_header, ServerHeader::PassThrough);
        // Each bad value is refused, naming the field.
        let e = cfg(|h| h.server_name = "a\nb".into()).expect_err("newline");
        assert!(e.to_string().contains("server_name"), "{e}");
        let e = cfg(|h| h.via = "a\rb".into()).expect_err("carriage return");
        assert!(e.to_string().contains("via \"a\\rb\""), "{e}");
        let e = cfg(|h| h.server_header_transformation = 7).expect_err("unknown value");
        assert!(
            e.to_string().contains("server_header_transformation 7"),
            "{e}"
        );
        let e = cfg(|h| {
            h.http_filters[0].config_type =
                Some(http_filter::ConfigType::TypedConfig(any(&Router {
                    upstream_http_filters: vec![HttpFilter::default()],
                    ..Default::default()
                })))
        })
        .expect_err("upstream filters");
        assert!(
            e.to_string().contains("http_filters[0]")
                && e.to_string().contains("upstream_http_filters"),
            "{e}"
        );
    }

    fn chain_match(m: FilterChainMatch) -> Result<Option<ChainMatch>, ConfigError> {
        let mut l = listener(|_| {});
        l.filter_chains[0].filter_chain_match = Some(m);
        ListenerConfig::convert(&l).map(|c| c.chain_match)
    }

    fn cidr(prefix: &str, len: u32) -> CidrRange {
        CidrRange {
            address_prefix: prefix.into(),
            prefix_len: Some(UInt32Value { value: len }),
        }
    }

    #[test]
    fn filter_chain_match_decides_which_connections_are_served() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Nothing asked: no check at all.
        assert!(chain_match(FilterChainMatch::default()).unwrap().is_none());
        let raw = FilterChainMatch {
            transport_protocol: "raw_buffer".into(),
            ..Default::default()
        };
        assert!(chain_match(raw).unwrap().is_none());

        // An allow-list of clients, and the port connected to.
        let m = chain_match(FilterChainMatch {
            destination_port: Some(UInt32Value { value: 8080 }),
            source_prefix_ranges: vec![cidr("10.0.0.0", 8), cidr("127.0.0.1", 32)],
            source_ports: vec![],
            ..Default::default()
        })
        .unwrap()
        .expect("a match");
        assert!(m.needs_local());
        let local = Some(a("127.0.0.1:8080"));
        assert!(m.matches(local, a("127.0.0.1:5000")));
        assert!(m.matches(local, a("10.1.2.3:5000")));
        assert!(m.matches(local, a("[::ffff:10.1.2.3]:5000")));
        assert!(!m.matches(local, a("127.0.0.2:5000")));
        assert!(!m.matches(local, a("192.168.1.1:5000")));
        assert!(!m.matches(Some(a("127.0.0.1:8081")), a("127.0.0.1:5000")));
        assert!(!m.matches(None, a("127.0.0.1:5000")));

        // Where the client connected to, from where, and from which port.
        let m = chain_match(FilterChainMatch {
            prefix_ranges: vec![cidr("127.0.0.2", 32)],
            source_type: ConnectionSourceType::External as i32,
            source_ports: vec![1234],
            ..Default::default()
        })
        .unwrap()
        .expect("a match");
        let ext = a("192.0.2.7:1234");
        assert!(m.matches(Some(a("127.0.0.2:80")), ext));
        assert!(!m.matches(Some(a("127.0.0.3:80")), ext));
        assert!(!m.matches(Some(a("127.0.0.2:80")), a("192.0.2.7:1235")));
        assert!(!m.matches(Some(a("127.0.0.2:80")), a("127.0.0.1:1234")));
        let same_ip = chain_match(FilterChainMatch {
            source_type: ConnectionSourceType::SameIpOrLoopback as i32,
            ..Default::default()
        })
        .unwrap()
        .expect("a match");
        assert!(same_ip.matches(Some(a("192.0.2.1:80")), a("192.0.2.1:9")));
        assert!(same_ip.matches(Some(a("192.0.2.1:80")), a("127.0.0.5:9")));
        assert!(!same_ip.matches(Some(a("192.0.2.1:80")), a("192.0.2.2:9")));

        // TLS, server names and application protocols never match a
        // plaintext connection.
        for m in [
            FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            },
            FilterChainMatch {
                server_names: vec!["api.example".into()],
                ..Default::default()
            },
            FilterChainMatch {
                application_protocols: vec!["http/1.1".into()],
                ..Default::default()
            },
        ] {
            let m = chain_match(m).unwrap().expect("a match");
            assert!(!m.matches(Some(a("127.0.0.1:8080")), a("127.0.0.1:5000")));
        }

        // Bad ones are refused with the place.
        for (m, what) in [
            (
                FilterChainMatch {
                    source_prefix_ranges: vec![cidr("10.0.0.300", 8)],
                    ..Default::default()
                },
                "source_prefix_ranges[0]",
            ),
            (
                FilterChainMatch {
                    prefix_ranges: vec![cidr("10.0.0.0", 33)],
                    ..Default::default()
                },
                "prefix_ranges[0]",
            ),
            (
                FilterChainMatch {
                    destination_port: Some(UInt32Value { value: 70000 }),
                    ..Default::default()
                },
                "destination_port 70000",
            ),
            (
                FilterChainMatch {
                    address_suffix: "x".into(),
                    ..Default::default()
                },
                "address_suffix",
            ),
        ] {
            let msg = chain_match(m).expect_err(what).to_string();
            assert!(
                msg.contains("filter_chain_match") && msg.contains(what),
                "{msg}"
            );
        }
    }

    #[test]
    fn body_buffer_limit_defaults_to_envoys_megabyte() {
        let c = ListenerConfig::convert(&listener(|_| {})).unwrap();
        assert_eq!(c.body_buffer_limit, 1 << 20);
        let mut l = listener(|_| {});
        l.per_connection_buffer_limit_bytes = Some(UInt32Value { value: 4096 });
        assert_eq!(ListenerConfig::convert(&l).unwrap().body_buffer_limit, 4096);
    }

    #[test]
    fn http10_is_refused_unless_accepted_and_options_that_matter_are_named() {
        let c = ListenerConfig::convert(&listener(|_| {})).unwrap();
        assert!(!c.http10.accept && c.http10.default_host.is_none());
        let c = ListenerConfig::convert(&listener(|h| {
            h.http_protocol_options = Some(Http1ProtocolOptions {
                accept_http_10: true,
                default_host_for_http_10: "old.example".into(),
                ..Default::default()
            })
        }))
        .unwrap();
        assert!(c.http10.accept);
        assert_eq!(c.http10.default_host.unwrap(), "old.example");
        for (edit, name) in [
            (
                Http1ProtocolOptions {
                    allow_chunked_length: true,
                    ..Default::default()
                },
                "allow_chunked_length",
            ),
            (
                Http1ProtocolOptions {
                    allow_absolute_url: Some(BoolValue { value: false }),
                    ..Default::default()
                },
                "allow_absolute_url",
            ),
            (
                Http1ProtocolOptions {
                    header_key_format: Some(Default::default()),
                    ..Default::default()
                },
                "header_key_format",
            ),
            (
                Http1ProtocolOptions {
                    default_host_for_http_10: "bad host\n".into(),
                    ..Default::default()
                },
                "default_host_for_http_10",
            ),
        ] {
            let msg = ListenerConfig::convert(&listener(|h| h.http_protocol_options = Some(edit)))
                .expect_err(name)
                .to_string();
            assert!(
                msg.contains("http_protocol_options") && msg.contains(name),
                "{msg}"
            );
        }
    }

    #[test]
    fn listener_fields_that_change_what_it_takes_are_refused_by_name() {
        type Edit = Box<dyn Fn(&mut Listener)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|l| l.additional_addresses = vec![Default::default()]),
                "additional_addresses",
            ),
            (
                Box::new(|l| l.use_original_dst = Some(BoolValue { value: true })),
                "use_original_dst",
            ),
            (
                Box::new(|l| l.bind_to_port = Some(BoolValue { value: false })),
                "bind_to_port",
            ),
            (
                Box::new(|l| l.filter_chain_matcher = Some(Default::default())),
                "filter_chain_matcher",
            ),
        ];
        for (edit, name) in cases {
            let mut l = listener(|_| {});
            edit(&mut l);
            let msg = ListenerConfig::convert(&l).expect_err(name).to_string();
            assert!(msg.contains(name) && msg.contains("\"l\""), "{msg}");
        }
        let mut l = listener(|_| {});
        l.bind_to_port = Some(BoolValue { value: true });
        ListenerConfig::convert(&l).expect("binding is what it does anyway");
    }

    /// `socket_options`: kept for this listener's socket (not those for
    /// datagrams or the other IP family), each at its stage; values that
    /// do not fit are refused by place. `tcp_keepalive` and
    /// `tcp_backlog_size` too.
    #[test]
    fn socket_options_are_read_for_this_socket() {
        use portico_proto::envoy::config::core::v3::socket_option::{
            socket_type, SocketIpVersion, SocketState, SocketType, Value,
        };
        use portico_proto::envoy::config::core::v3::{SocketOption as Pb, TcpKeepalive};
        let opt = |level: i64, state: SocketState| Pb {
            description: format!("o{level}"),
            level,
            name: 2,
            state: state as i32,
            value: Some(Value::IntValue(7)),
            ..Default::default()
        };
        let mut l = listener(|_| {});
        l.socket_options = vec![
            opt(1, SocketState::StateBound),
            Pb {
                r#type: Some(SocketType {
                    datagram: Some(socket_type::Datagram {}),
                    stream: None,
                }),
                ..opt(2, SocketState::StatePrebind)
            },
            Pb {
                ip_version: SocketIpVersion::Ipv6 as i32,
                ..opt(3, SocketState::StatePrebind)
            },
            Pb {
                value: Some(Value::BufValue(b"xy".to_vec())),
                ..opt(4, SocketState::StateListening)
            },
        ];
        l.tcp_keepalive = Some(TcpKeepalive {
            keepalive_time: Some(UInt32Value { value: 9 }),
            ..Default::default()
        });
        l.tcp_backlog_size = Some(UInt32Value { value: 64 });
        let s = ListenerConfig::convert(&l).unwrap().socket;
        let kept: Vec<_> = s
            .options
            .iter()
            .map(|o| (o.level, o.stage, o.value.clone()))
            .collect();
        assert_eq!(
            kept,
            [
                (1, SocketStage::Bound, 7i32.to_ne_bytes().to_vec()),
                (4, SocketStage::Listening, b"xy".to_vec())
            ]
        );
        assert_eq!(
            s.keepalive.and_then(|k| k.idle),
            Some(std::time::Duration::from_secs(9))
        );
        assert_eq!(s.backlog, Some(64));
        l.socket_options = vec![Pb {
            value: Some(Value::IntValue(1 << 40)),
            ..opt(1, SocketState::StatePrebind)
        }];
        let e = ListenerConfig::convert(&l).unwrap_err().to_string();
        assert!(
            e.contains("socket_options[0]") && e.contains("int_value"),
            "{e}"
        );
    }

    #[test]
    fn http2_limits_come_from_the_connection_manager() {
        use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
        let c = ListenerConfig::convert(&listener(|_| {})).unwrap();
        assert_eq!(c.h2, H2Limits::default());
        let c = ListenerConfig::convert(&listener(|h| {
            h.http2_protocol_options = Some(Http2ProtocolOptions {
                max_concurrent_streams: Some(UInt32Value { value: 100 }),
                initial_stream_window_size: Some(UInt32Value { value: 65_535 }),
                ..Default::default()
            })
        }))
        .unwrap();
        assert_eq!(
            c.h2,
            H2Limits {
                max_streams: 100,
                stream_window: 65_535,
                conn_window: 2 << 20,
                keepalive: None,
                stream_error_on_invalid: false,
            }
        );
        for (o, what) in [
            (
                Http2ProtocolOptions {
                    initial_stream_window_size: Some(UInt32Value { value: 1000 }),
                    ..Default::default()
                },
                "initial_stream_window_size 1000",
            ),
            (
                Http2ProtocolOptions {
                    max_concurrent_streams: Some(UInt32Value { value: 0 }),
                    ..Default::default()
                },
                "max_concurrent_streams",
            ),
            (
                Http2ProtocolOptions {
                    allow_connect: true,
                    ..Default::default()
                },
                "allow_connect",
            ),
        ] {
            let msg = ListenerConfig::convert(&listener(|h| h.http2_protocol_options = Some(o)))
                .expect_err(what)
                .to_string();
            assert!(
                msg.contains("http2_protocol_options") && msg.contains(what),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_malformed_http2_request_ends_the_connection_unless_asked() {
        use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
        use portico_proto::google::protobuf::BoolValue;
        let b = |value| Some(BoolValue { value });
        #[allow(deprecated)]
        let deprecated = |value| Http2ProtocolOptions {
            stream_error_on_invalid_http_messaging: value,
            ..Default::default()
        };
        let overridden = |value| Http2ProtocolOptions {
            override_stream_error_on_invalid_http_message: b(value),
            ..Default::default()
        };
        // (HCM field, HTTP/2 options, stream error?)
        for (hcm, h2, want) in [
            (None, None, false),
            (b(true), None, true),
            (b(false), None, false),
            (None, Some(deprecated(true)), true),
            (b(false), Some(deprecated(true)), false),
            (b(true), Some(deprecated(false)), true),
            (b(true), Some(overridden(false)), false),
            (b(false), Some(overridden(true)), true),
            (None, Some(overridden(true)), true),
        ] {
            let c = ListenerConfig::convert(&listener(|h| {
                h.stream_error_on_invalid_http_message = hcm;
                h.http2_protocol_options = h2.clone();
            }))
            .unwrap();
            assert_eq!(c.h2.stream_error_on_invalid, want, "{hcm:?} {h2:?}");
        }
    }
}
