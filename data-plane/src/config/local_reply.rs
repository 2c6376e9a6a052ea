//! The HCM's `local_reply_config`: how the proxy's own answers (404s,
//! 503s, timeouts) look. Mappers, tried in order, match a reply with an
//! access log filter and may change its status, body and headers; a body
//! format (Envoy's `SubstitutionFormatString`, text or JSON) then writes
//! the body, with `%LOCAL_REPLY_BODY%` for the reply's own text.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use portico_proto::envoy::config::core::v3::{
    substitution_format_string, DataSource, SubstitutionFormatString,
};
use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig;

use super::listener::substitution;
use super::route::Edits;
use super::{inline_bytes, ConfigError};
use crate::access_log::{LogFilter, LogFormat, Record};

/// A converted `local_reply_config`.
#[derive(Debug)]
pub struct LocalReplies {
    mappers: Vec<Mapper>,
    format: Option<BodyFormat>,
}

#[derive(Debug)]
struct Mapper {
    filter: LogFilter,
    status: Option<StatusCode>,
    body: Option<String>,
    format: Option<BodyFormat>,
    headers: Edits,
}

#[derive(Debug)]
struct BodyFormat {
    format: LogFormat,
    content_type: HeaderValue,
}

/// A local reply as the config makes it.
pub struct Reply<'a> {
    /// Its status.
    pub status: StatusCode,
    /// Its body.
    pub body: Bytes,
    /// Its content type.
    pub content_type: HeaderValue,
    /// Headers the matching mapper adds.
    pub edits: Option<&'a Edits>,
}

impl LocalReplies {
    /// The request headers its formats and its mappers' header values
    /// read, to be kept in the request's record.
    pub fn request_headers(&self) -> Vec<http::HeaderName> {
        let formats = self
            .mappers
            .iter()
            .filter_map(|m| m.format.as_ref())
            .chain(&self.format);
        let mut out: Vec<_> = formats.flat_map(|f| f.format.request_headers()).collect();
        for m in &self.mappers {
            out.extend(m.headers.format_headers().0);
        }
        out
    }

    /// Converts the config; errors name the mapper and the field.
    pub fn convert(c: &LocalReplyConfig, at: &str) -> Result<LocalReplies, ConfigError> {
        let at = format!("{at} local_reply_config");
        let mappers = c
            .mappers
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let at = format!("{at}.mappers[{i}]");
                let filter = m
                    .filter
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&at, "needs a filter"))?;
                let status = m
                    .status_code
                    .as_ref()
                    .map(|s| {
                        u16::try_from(s.value)
                            .ok()
                            .filter(|s| (200..600).contains(s))
                            .and_then(|s| StatusCode::from_u16(s).ok())
                            .ok_or_else(|| {
                                ConfigError::new(
                                    &at,
                                    format!("status_code {} is not between 200 and 599", s.value),
                                )
                            })
                    })
                    .transpose()?;
                Ok(Mapper {
                    filter: LogFilter::convert(filter, &format!("{at}.filter"))?,
                    status,
                    body: m
                        .body
                        .as_ref()
                        .map(|d| inline(d, &format!("{at}.body")))
                        .transpose()?,
                    format: m
                        .body_format_override
                        .as_ref()
                        .map(|f| BodyFormat::convert(f, &format!("{at}.body_format_override")))
                        .transpose()?,
                    headers: Edits::convert(&[], &[], &m.headers_to_add, &[], &at)?,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalReplies {
            mappers,
            format: c
                .body_format
                .as_ref()
                .map(|f| BodyFormat::convert(f, &format!("{at}.body_format")))
                .transpose()?,
        })
    }

    /// Makes the reply for `status` and `body` (the proxy's own text):
    /// the first mapper whose filter admits `rec` (given the reply's
    /// status here) rewrites it, then the body format writes it. `rec` is
    /// the request's record, with the reply's flags.
    pub fn reply(&self, rec: &mut Record, status: StatusCode, body: &str) -> Reply<'_> {
        rec.response_code = status.as_u16();
        let mut status = status;
        let mut text = body.to_owned();
        let mut format = self.format.as_ref();
        let mut edits = None;
        if let Some(m) = self.mappers.iter().find(|m| m.filter.admits(rec)) {
            if let Some(b) = &m.body {
                text.clone_from(b);
            }
            if let Some(s) = m.status {
                status = s;
            }
            if m.format.is_some() {
                format = m.format.as_ref();
            }
            edits = Some(&m.headers);
        }
        rec.response_code = status.as_u16();
        rec.local_reply_body = Some(text);
        let (body, content_type) = match format {
            None => (
                Bytes::from(rec.local_reply_body.clone().unwrap_or_default()),
                HeaderValue::from_static("text/plain"),
            ),
            Some(f) => (
                Bytes::from(f.format.render_body(rec)),
                f.content_type.clone(),
            ),
        };
        Reply {
            status,
            body,
            content_type,
            edits,
        }
    }
}

impl BodyFormat {
    fn convert(f: &SubstitutionFormatString, at: &str) -> Result<BodyFormat, ConfigError> {
        let format = substitution(f)
            .unwrap_or_else(|| LogFormat::text("%LOCAL_REPLY_BODY%"))
            .map_err(|e| ConfigError::new(at, e))?;
        let content_type = if f.content_type.is_empty() {
            HeaderValue::from_static(match (&format, &f.format) {
                (LogFormat::Json(_), _) => "application/json",
                (_, Some(substitution_format_string::Format::JsonFormat(_))) => "application/json",
                _ => "text/plain",
            })
        } else {
            HeaderValue::from_str(&f.content_type).map_err(|_| {
                ConfigError::new(
                    at,
                    format!("content_type {:?} is not a header value", f.content_type),
                )
            })?
        };
        Ok(BodyFormat {
            format,
            content_type,
        })
    }
}

/// A mapper's body: inline only (the proxy reads no files for config).
fn inline(d: &DataSource, at: &str) -> Result<String, ConfigError> {
    inline_bytes(d)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .ok_or_else(|| ConfigError::new(at, "only inline bodies are supported"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::accesslog::v3::{
        access_log_filter::FilterSpecifier, comparison_filter::Op, AccessLogFilter,
        ComparisonFilter, StatusCodeFilter,
    };
    use portico_proto::envoy::config::core::v3::{data_source, RuntimeUInt32};
    use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::ResponseMapper;
    use portico_proto::google::protobuf::UInt32Value;

    fn status_is(code: u32) -> Option<AccessLogFilter> {
        Some(AccessLogFilter {
            filter_specifier: Some(FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
                comparison: Some(ComparisonFilter {
                    op: Op::Eq as i32,
                    value: Some(RuntimeUInt32 {
                        default_value: code,
                        runtime_key: "k".into(),
                    }),
                }),
            })),
        })
    }

    fn text(t: &str) -> SubstitutionFormatString {
        SubstitutionFormatString {
            format: Some(substitution_format_string::Format::TextFormatSource(
                DataSource {
                    specifier: Some(data_source::Specifier::InlineString(t.into())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    #[test]
    fn mappers_rewrite_and_the_format_writes() {
        let c = LocalReplyConfig {
            mappers: vec![ResponseMapper {
                filter: status_is(503),
                status_code: Some(UInt32Value { value: 502 }),
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString("try later".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            body_format: Some(text("[%RESPONSE_CODE%] %LOCAL_REPLY_BODY%")),
        };
        let lr = LocalReplies::convert(&c, "l").expect("converts");
        let mut rec = Record {
            response_code: 503,
            ..Default::default()
        };
        let r = lr.reply(
            &mut rec,
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream\n",
        );
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(&r.body[..], b"[502] try later");
        assert_eq!(r.content_type, "text/plain");
        assert!(r.edits.is_some());
        // Not matched: the own text, in the listener's format.
        let mut rec = Record {
            response_code: 404,
            ..Default::default()
        };
        let r = lr.reply(&mut rec, StatusCode::NOT_FOUND, "");
        assert_eq!(
            (r.status, &r.body[..]),
            (StatusCode::NOT_FOUND, &b"[404] "[..])
        );
        assert!(r.edits.is_none());
    }

    #[test]
    fn bad_mappers_are_named() {
        let err = |m: ResponseMapper| {
            LocalReplies::convert(
                &LocalReplyConfig {
                    mappers: vec![m],
                    body_format: None,
                },
                "Listener \"l\"",
            )
            .expect_err("refused")
            .to_string()
        };
        let e = err(ResponseMapper::default());
        assert!(
            e.contains("mappers[0]") && e.contains("needs a filter"),
            "{e}"
        );
        let e = err(ResponseMapper {
            filter: status_is(500),
            status_code: Some(UInt32Value { value: 99 }),
            ..Default::default()
        });
        assert!(e.contains("status_code 99"), "{e}");
        let e = err(ResponseMapper {
            filter: status_is(500),
            body_format_override: Some(text("%NOPE%")),
            ..Default::default()
        });
        assert!(
            e.contains("body_format_override") && e.contains("NOPE"),
            "{e}"
        );
        let e = err(ResponseMapper {
            filter: status_is(500),
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::Filename("/etc/x".into())),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(e.contains("only inline bodies"), "{e}");
    }
}
