//! Envoy resources converted once into the proxy's own immutable types.
//!
//! Everything here is checked when a resource arrives; a problem becomes a
//! [`ConfigError`] naming the resource, the place and the reason, which the
//! xDS client sends back as the NACK's `error_detail`. The request path then
//! reads only these converted types.

pub mod cluster;
pub mod listener;
pub mod local_reply;
pub mod matcher;
pub mod route;
pub mod upgrades;

use std::fmt;

/// A resource the proxy cannot run, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The resource and the place in it.
    pub at: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// A new error at `at`.
    pub fn new(at: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            at: at.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Fields the proxy does not implement and may not ignore (each would
/// change answers or what goes upstream): the first that is set, as
/// "`name` is not supported" at `at`.
pub(crate) fn refuse(at: &str, fields: &[(bool, &str)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(set, _)| *set) {
        Some((_, name)) => Err(ConfigError::new(at, format!("{name} is not supported"))),
        None => Ok(()),
    }
}

/// A protobuf duration as a std one (negative values become zero).
pub fn duration(d: &portico_proto::google::protobuf::Duration) -> std::time::Duration {
    if d.seconds < 0 || d.nanos < 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(d.seconds as u64, d.nanos as u32)
}

/// A `DataSource` given inline (`inline_string` or `inline_bytes`);
/// `None` for a file, an environment variable or nothing (the proxy reads
/// no files for its configuration).
pub fn inline_bytes(d: &portico_proto::envoy::config::core::v3::DataSource) -> Option<&[u8]> {
    use portico_proto::envoy::config::core::v3::data_source::Specifier;
    match d.specifier.as_ref()? {
        Specifier::InlineString(s) => Some(s.as_bytes()),
        Specifier::InlineBytes(b) => Some(b),
        _ => None,
    }
}

/// Decodes a typed `Any` as `M`, checking its type URL.
pub fn unpack<M: prost::Message + prost::Name + Default>(
    any: &portico_proto::google::protobuf::Any,
    at: &str,
) -> Result<M, ConfigError> {
    if any.type_url != M::type_url() {
        return Err(ConfigError::new(
            at,
            format!("expected {} but got {}", M::type_url(), any.type_url),
        ));
    }
    M::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(at, format!("cannot decode {}: {e}", M::full_name())))
}

/// A socket address from an Envoy `Address` (IP literals only).
pub fn socket_addr(
    a: Option<&portico_proto::envoy::config::core::v3::Address>,
    at: &str,
) -> Result<std::net::SocketAddr, ConfigError> {
    let (host, port) = host_port(a, at)?;
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| ConfigError::new(at, format!("address {host:?} is not an IP address")))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// Host and port from an Envoy `Address`.
pub fn host_port(
    a: Option<&portico_proto::envoy::config::core::v3::Address>,
    at: &str,
) -> Result<(String, u16), ConfigError> {
    use portico_proto::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(ConfigError::new(at, "only socket addresses are supported"));
    };
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p)
            .map_err(|_| ConfigError::new(at, format!("port {p} is out of range")))?,
        _ => {
            return Err(ConfigError::new(
                at,
                "address needs a port_value (named ports are not supported)",
            ))
        }
    };
    Ok((sa.address.clone(), port))
}

/// TCP keep-alive on a socket (Envoy's `TcpKeepalive`): on, with each
/// setting that is given (the system's for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    /// Idle time before the first probe (`keepalive_time`).
    pub idle: Option<std::time::Duration>,
    /// Time between probes (`keepalive_interval`).
    pub interval: Option<std::time::Duration>,
    /// Unanswered probes before the connection is dropped
    /// (`keepalive_probes`).
    pub probes: Option<u32>,
}

impl Keepalive {
    /// Converts Envoy's message: `None` when a field is 0 (Envoy's way to
    /// turn keep-alive off); values over Linux's limits (32,767 s, 127
    /// probes), which the kernel would refuse, are refused here.
    pub fn convert(
        k: &portico_proto::envoy::config::core::v3::TcpKeepalive,
        at: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let fields = [k.keepalive_time, k.keepalive_interval, k.keepalive_probes];
        if fields.iter().flatten().any(|v| v.value == 0) {
            return Ok(None);
        }
        let bounded = |v: Option<u32>, max: u32, field: &str| match v {
            Some(n) if n > max => Err(ConfigError::new(
                at,
                format!("tcp_keepalive.{field} {n} is out of range (1 to {max})"),
            )),
            v => Ok(v),
        };
        let secs = |v: Option<u32>| v.map(|s| std::time::Duration::from_secs(u64::from(s)));
        Ok(Some(Keepalive {
            idle: secs(bounded(
                k.keepalive_time.as_ref().map(|v| v.value),
                32_767,
                "keepalive_time",
            )?),
            interval: secs(bounded(
                k.keepalive_interval.as_ref().map(|v| v.value),
                32_767,
                "keepalive_interval",
            )?),
            probes: bounded(
                k.keepalive_probes.as_ref().map(|v| v.value),
                127,
                "keepalive_probes",
            )?,
        }))
    }

    /// Turns it on for `socket`.
    pub fn apply(&self, socket: socket2::SockRef<'_>) -> std::io::Result<()> {
        let mut k = socket2::TcpKeepalive::new();
        if let Some(t) = self.idle {
            k = k.with_time(t);
        }
        if let Some(i) = self.interval {
            k = k.with_interval(i);
        }
        if let Some(p) = self.probes {
            k = k.with_retries(p);
        }
        socket.set_tcp_keepalive(&k)
    }
}

/// Envoy's HTTP/2 `connection_keepalive`: a PING every `interval` (a
/// `connection_idle_interval` alone stands in for it: Envoy pings a
/// connection idle that long before a new stream), the connection closed
/// when one goes unanswered for `timeout`; `None` when neither interval is
/// set. (`interval_jitter` is not applied.)
pub fn h2_keepalive(
    k: &portico_proto::envoy::config::core::v3::KeepaliveSettings,
    at: &str,
) -> Result<Option<(std::time::Duration, std::time::Duration)>, ConfigError> {
    let timeout = k
        .timeout
        .as_ref()
        .map(duration)
        .filter(|d| *d >= std::time::Duration::from_millis(1))
        .ok_or_else(|| ConfigError::new(at, "connection_keepalive.timeout must be at least 1ms"))?;
    let every = |d: &Option<portico_proto::google::protobuf::Duration>| {
        d.as_ref().map(duration).filter(|d| !d.is_zero())
    };
    Ok(every(&k.interval)
        .or(every(&k.connection_idle_interval))
        .map(|interval| (interval, timeout)))
}
