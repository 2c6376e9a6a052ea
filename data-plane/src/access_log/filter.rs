//! Envoy's access log filters (`AccessLog.filter`): which requests a log
//! writes a line for, decided when the line would be written.

use http::HeaderMap;
use portico_proto::envoy::config::accesslog::v3::{
    access_log_filter::FilterSpecifier, comparison_filter::Op, AccessLogFilter, ComparisonFilter,
};
use portico_proto::envoy::data::accesslog::v3::AccessLogType;

use super::Record;
use crate::config::matcher::{HeaderMatch, RequestHead};
use crate::config::route::fractional_percent;
use crate::config::ConfigError;

/// Envoy's response flags, by their short names.
const RESPONSE_FLAGS: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

/// A compiled access log filter; equal to another when compiled from the
/// same message.
#[derive(Debug)]
pub struct LogFilter {
    rule: Rule,
    source: AccessLogFilter,
}

impl PartialEq for LogFilter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What a filter checks.
#[derive(Debug)]
enum Rule {
    /// The response code compared with a value.
    Status(Cmp),
    /// The request's duration in milliseconds compared with a value.
    Duration(Cmp),
    /// Always true: no health check filter marks requests as health checks.
    NotHealthCheck,
    /// Always false: requests are not traced.
    Traceable,
    /// A share of requests, as (numerator, denominator); by the request
    /// id's first eight hex digits unless `independent` (Envoy's pivot).
    Runtime {
        /// The share.
        share: (u64, u64),
        /// Draw at random even when there is a request id.
        independent: bool,
    },
    /// Every filter admits.
    And(Vec<Rule>),
    /// Some filter admits.
    Or(Vec<Rule>),
    /// A request header matches.
    Header(Box<HeaderMatch>),
    /// The response has one of these flags (any flag when empty).
    ResponseFlags(Vec<String>),
    /// The answer's gRPC status (else the one its HTTP status implies) is
    /// among `statuses`, or not when `exclude`.
    GrpcStatus {
        /// Listed statuses.
        statuses: Vec<u32>,
        /// Admit the statuses not listed instead.
        exclude: bool,
    },
    /// The line's type (always the end of a downstream request here) is
    /// among `types`, or not when `exclude`.
    LogType {
        /// Listed types.
        types: Vec<i32>,
        /// Admit the types not listed instead.
        exclude: bool,
    },
}

/// A comparison with a constant (a `RuntimeUInt32`'s default value: there
/// is no runtime to look keys up in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// Equal.
    Eq(u64),
    /// Greater or equal.
    Ge(u64),
    /// Less or equal.
    Le(u64),
    /// Not equal.
    Ne(u64),
}

impl Cmp {
    fn convert(c: Option<&ComparisonFilter>, at: &str) -> Result<Cmp, ConfigError> {
        let c = c.ok_or_else(|| ConfigError::new(at, "needs a comparison"))?;
        let v = c.value.as_ref().map_or(0, |v| u64::from(v.default_value));
        match Op::try_from(c.op) {
            Ok(Op::Eq) => Ok(Cmp::Eq(v)),
            Ok(Op::Ge) => Ok(Cmp::Ge(v)),
            Ok(Op::Le) => Ok(Cmp::Le(v)),
            Ok(Op::Ne) => Ok(Cmp::Ne(v)),
            Err(_) => Err(ConfigError::new(
                at,
                format!("comparison op {} is not a known value", c.op),
            )),
        }
    }

    fn holds(self, x: u64) -> bool {
        match self {
            Cmp::Eq(v) => x == v,
            Cmp::Ge(v) => x >= v,
            Cmp::Le(v) => x <= v,
            Cmp::Ne(v) => x != v,
        }
    }
}

impl LogFilter {
    /// Compiles a filter; errors name the place (`at`) and the filter.
    pub fn convert(f: &AccessLogFilter, at: &str) -> Result<LogFilter, ConfigError> {
        Ok(LogFilter {
            rule: Rule::convert(f, at)?,
            source: f.clone(),
        })
    }

    /// Whether the filter looks at request headers (which then have to be
    /// kept for it until the line is written).
    pub fn needs_headers(&self) -> bool {
        self.rule.needs_headers()
    }

    /// Whether a line is written for this record.
    pub fn admits(&self, r: &Record) -> bool {
        self.rule.admits(r)
    }
}

impl Rule {
    fn convert(f: &AccessLogFilter, at: &str) -> Result<Rule, ConfigError> {
        let Some(spec) = &f.filter_specifier else {
            return Err(ConfigError::new(at, "the filter is empty"));
        };
        Ok(match spec {
            FilterSpecifier::StatusCodeFilter(s) => Rule::Status(Cmp::convert(
                s.comparison.as_ref(),
                &format!("{at} status_code_filter"),
            )?),
            FilterSpecifier::DurationFilter(d) => Rule::Duration(Cmp::convert(
                d.comparison.as_ref(),
                &format!("{at} duration_filter"),
            )?),
            FilterSpecifier::NotHealthCheckFilter(_) => Rule::NotHealthCheck,
            FilterSpecifier::TraceableFilter(_) => Rule::Traceable,
            FilterSpecifier::RuntimeFilter(r) => {
                let at = format!("{at} runtime_filter");
                let share = match &r.percent_sampled {
                    Some(p) => fractional_percent(p, "percent_sampled", &at)?,
                    None => (0, 100),
                };
                Rule::Runtime {
                    share,
                    independent: r.use_independent_randomness,
                }
            }
            FilterSpecifier::AndFilter(a) => Rule::And(Self::all(&a.filters, "and", at)?),
            FilterSpecifier::OrFilter(o) => Rule::Or(Self::all(&o.filters, "or", at)?),
            FilterSpecifier::HeaderFilter(h) => {
                let at = format!("{at} header_filter");
                let m = h
                    .header
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&at, "needs a header"))?;
                Rule::Header(Box::new(HeaderMatch::compile(m, &at)?))
            }
            FilterSpecifier::ResponseFlagFilter(r) => {
                if let Some(bad) = r
                    .flags
                    .iter()
                    .find(|f| !RESPONSE_FLAGS.contains(&f.as_str()))
                {
                    return Err(ConfigError::new(
                        &format!("{at} response_flag_filter"),
                        format!("{bad:?} is not a response flag"),
                    ));
                }
                Rule::ResponseFlags(r.flags.clone())
            }
            FilterSpecifier::LogTypeFilter(t) => {
                if let Some(bad) = t
                    .types
                    .iter()
                    .find(|v| AccessLogType::try_from(**v).is_err())
                {
                    return Err(ConfigError::new(
                        &format!("{at} log_type_filter"),
                        format!("type {bad} is not a known value"),
                    ));
                }
                Rule::LogType {
                    types: t.types.clone(),
                    exclude: t.exclude,
                }
            }
            FilterSpecifier::GrpcStatusFilter(g) => {
                if let Some(bad) = g.statuses.iter().find(|s| !(0..=16).contains(*s)) {
                    return Err(ConfigError::new(
                        &format!("{at} grpc_status_filter"),
                        format!("status {bad} is not a gRPC status"),
                    ));
                }
                Rule::GrpcStatus {
                    statuses: g.statuses.iter().map(|s| *s as u32).collect(),
                    exclude: g.exclude,
                }
            }
            FilterSpecifier::ExtensionFilter(e) => {
                return Err(ConfigError::new(
                    at,
                    format!("extension_filter {:?} is not supported", e.name),
                ))
            }
            FilterSpecifier::MetadataFilter(_) => {
                return Err(ConfigError::new(at, "metadata_filter is not supported"))
            }
        })
    }

    fn all(fs: &[AccessLogFilter], what: &str, at: &str) -> Result<Vec<Rule>, ConfigError> {
        if fs.len() < 2 {
            return Err(ConfigError::new(
                at,
                format!("{what}_filter needs at least two filters"),
            ));
        }
        fs.iter()
            .enumerate()
            .map(|(i, f)| Self::convert(f, &format!("{at} {what}_filter.filters[{i}]")))
            .collect()
    }

    fn needs_headers(&self) -> bool {
        match self {
            Rule::Header(_) => true,
            Rule::And(fs) | Rule::Or(fs) => fs.iter().any(Self::needs_headers),
            _ => false,
        }
    }

    fn admits(&self, r: &Record) -> bool {
        match self {
            Rule::Status(c) => c.holds(u64::from(r.response_code)),
            Rule::Duration(c) => c.holds(r.duration),
            Rule::NotHealthCheck => true,
            Rule::Traceable => false,
            Rule::Runtime { share, independent } => {
                let (n, d) = *share;
                let pivot = r
                    .request_id
                    .as_deref()
                    .filter(|_| !independent)
                    .and_then(|id| u64::from_str_radix(id.get(..8)?, 16).ok());
                pivot.unwrap_or_else(|| fastrand::u64(..)) % d < n
            }
            Rule::And(fs) => fs.iter().all(|f| f.admits(r)),
            Rule::Or(fs) => fs.iter().any(|f| f.admits(r)),
            Rule::Header(m) => {
                let empty = HeaderMap::new();
                m.matches(&RequestHead {
                    method: &r.method,
                    path: &r.path,
                    authority: &r.authority,
                    scheme: "http",
                    headers: r.filter_headers.as_deref().unwrap_or(&empty),
                })
            }
            Rule::ResponseFlags(want) => {
                let mut have = r.response_flags.split(',').filter(|f| !f.is_empty());
                if want.is_empty() {
                    have.next().is_some()
                } else {
                    have.any(|f| want.iter().any(|w| w == f))
                }
            }
            Rule::GrpcStatus { statuses, exclude } => {
                statuses.contains(&r.grpc_status_or_inferred()) != *exclude
            }
            Rule::LogType { types, exclude } => {
                types.contains(&(AccessLogType::DownstreamEnd as i32)) != *exclude
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::accesslog::v3::{
        AndFilter, DurationFilter, GrpcStatusFilter, LogTypeFilter, ResponseFlagFilter,
        RuntimeFilter, StatusCodeFilter,
    };
    use portico_proto::envoy::config::core::v3::RuntimeUInt32;
    use portico_proto::envoy::r#type::v3::FractionalPercent;

    fn filter(spec: FilterSpecifier) -> AccessLogFilter {
        AccessLogFilter {
            filter_specifier: Some(spec),
        }
    }

    fn cmp(op: Op, v: u32) -> Option<ComparisonFilter> {
        Some(ComparisonFilter {
            op: op as i32,
            value: Some(RuntimeUInt32 {
                default_value: v,
                runtime_key: "k".into(),
            }),
        })
    }

    fn rec(code: u16, ms: u64, flags: &str, id: Option<&str>) -> Record {
        Record {
            response_code: code,
            duration: ms,
            response_flags: flags.into(),
            request_id: id.map(str::to_owned),
            ..Default::default()
        }
    }

    fn admits(f: &AccessLogFilter, r: &Record) -> bool {
        LogFilter::convert(f, "log").expect("converts").admits(r)
    }

    #[test]
    fn comparisons_flags_and_combinations() {
        let status = |op, v| {
            filter(FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
                comparison: cmp(op, v),
            }))
        };
        assert!(admits(&status(Op::Ge, 500), &rec(503, 0, "", None)));
        assert!(!admits(&status(Op::Ge, 500), &rec(404, 0, "", None)));
        assert!(admits(&status(Op::Eq, 404), &rec(404, 0, "", None)));
        assert!(admits(&status(Op::Le, 299), &rec(200, 0, "", None)));
        assert!(!admits(&status(Op::Ne, 200), &rec(200, 0, "", None)));
        let slow = filter(FilterSpecifier::DurationFilter(DurationFilter {
            comparison: cmp(Op::Ge, 1000),
        }));
        assert!(admits(&slow, &rec(200, 1500, "", None)));
        assert!(!admits(&slow, &rec(200, 20, "", None)));
        let flags = |f: &[&str]| {
            filter(FilterSpecifier::ResponseFlagFilter(ResponseFlagFilter {
                flags: f.iter().map(|s| s.to_string()).collect(),
            }))
        };
        assert!(admits(&flags(&[]), &rec(503, 0, "UH", None)));
        assert!(!admits(&flags(&[]), &rec(200, 0, "", None)));
        assert!(admits(&flags(&["UF", "UH"]), &rec(503, 0, "UH", None)));
        assert!(admits(&flags(&["URX"]), &rec(503, 0, "UF,URX", None)));
        assert!(!admits(&flags(&["UF"]), &rec(503, 0, "UH", None)));
        let both = filter(FilterSpecifier::AndFilter(AndFilter {
            filters: vec![status(Op::Ge, 500), flags(&["UH"])],
        }));
        assert!(admits(&both, &rec(503, 0, "UH", None)));
        assert!(!admits(&both, &rec(503, 0, "UF", None)));
        let end = |types: Vec<i32>, exclude| {
            filter(FilterSpecifier::LogTypeFilter(LogTypeFilter {
                types,
                exclude,
            }))
        };
        let downstream_end = AccessLogType::DownstreamEnd as i32;
        assert!(admits(
            &end(vec![downstream_end], false),
            &rec(200, 0, "", None)
        ));
        assert!(!admits(
            &end(vec![downstream_end], true),
            &rec(200, 0, "", None)
        ));
        assert!(!admits(
            &end(vec![AccessLogType::UpstreamEnd as i32], false),
            &rec(200, 0, "", None)
        ));
        // The answer's grpc-status, else the HTTP status's (503:
        // UNAVAILABLE, 200: UNKNOWN).
        let grpc = |statuses: Vec<i32>, exclude| {
            filter(FilterSpecifier::GrpcStatusFilter(GrpcStatusFilter {
                statuses,
                exclude,
            }))
        };
        let with = |s| Record {
            grpc_status: Some(s),
            ..rec(200, 0, "", None)
        };
        assert!(admits(&grpc(vec![4, 14], false), &with(4)));
        assert!(!admits(&grpc(vec![4, 14], false), &with(0)));
        assert!(admits(&grpc(vec![0], true), &with(5)));
        assert!(admits(&grpc(vec![14], false), &rec(503, 0, "", None)));
        assert!(admits(&grpc(vec![2], false), &rec(200, 0, "", None)));
    }

    #[test]
    fn runtime_sampling_pivots_on_the_request_id() {
        let sampled = |percent: u32, independent| {
            filter(FilterSpecifier::RuntimeFilter(RuntimeFilter {
                runtime_key: "k".into(),
                percent_sampled: Some(FractionalPercent {
                    numerator: percent,
                    denominator: 0,
                }),
                use_independent_randomness: independent,
            }))
        };
        // 0x10 = 16: under 20%, not under 10%; the same every time.
        let id = Some("00000010-aaaa-4bbb-8ccc-dddddddddddd");
        for _ in 0..50 {
            assert!(admits(&sampled(20, false), &rec(200, 0, "", id)));
            assert!(!admits(&sampled(10, false), &rec(200, 0, "", id)));
        }
        // Without an id, or asked to, it draws: about half of 2,000.
        let f = LogFilter::convert(&sampled(50, true), "log").expect("converts");
        let n = (0..2_000)
            .filter(|_| f.admits(&rec(200, 0, "", id)))
            .count();
        assert!((800..1_200).contains(&n), "{n}");
        assert!(admits(&sampled(100, false), &rec(200, 0, "", None)));
        assert!(!admits(&sampled(0, false), &rec(200, 0, "", None)));
    }

    #[test]
    fn bad_filters_are_named() {
        let err = |f: AccessLogFilter| {
            LogFilter::convert(&f, "log")
                .expect_err("refused")
                .to_string()
        };
        let e = err(filter(FilterSpecifier::ResponseFlagFilter(
            ResponseFlagFilter {
                flags: vec!["UH".into(), "NOPE".into()],
            },
        )));
        assert!(
            e.contains("response_flag_filter") && e.contains("\"NOPE\""),
            "{e}"
        );
        let e = err(filter(FilterSpecifier::AndFilter(AndFilter {
            filters: vec![filter(FilterSpecifier::NotHealthCheckFilter(
                Default::default(),
            ))],
        })));
        assert!(e.contains("and_filter needs at least two"), "{e}");
        let e = err(filter(FilterSpecifier::GrpcStatusFilter(
            GrpcStatusFilter {
                statuses: vec![14, 17],
                exclude: false,
            },
        )));
        assert!(
            e.contains("grpc_status_filter") && e.contains("status 17"),
            "{e}"
        );
        let e = err(filter(FilterSpecifier::StatusCodeFilter(
            StatusCodeFilter {
                comparison: Some(ComparisonFilter { op: 9, value: None }),
            },
        )));
        assert!(
            e.contains("status_code_filter") && e.contains("op 9"),
            "{e}"
        );
        let e = err(filter(FilterSpecifier::AndFilter(AndFilter {
            filters: vec![
                filter(FilterSpecifier::TraceableFilter(Default::default())),
                AccessLogFilter::default(),
            ],
        })));
        assert!(
            e.contains("and_filter.filters[1]") && e.contains("empty"),
            "{e}"
        );
        assert!(err(AccessLogFilter::default()).contains("empty"));
    }
}
