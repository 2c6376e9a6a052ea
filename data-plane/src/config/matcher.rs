//! Envoy's string, header and query-parameter matchers, compiled once.

// Envoy's deprecated fields are still sent by control planes; honour them.
#![allow(deprecated)]

use http::HeaderMap;
use portico_proto::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    HeaderMatcher as PbHeaderMatcher, QueryParameterMatcher as PbQueryMatcher,
};
use portico_proto::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatchAndSubstitute, RegexMatcher, StringMatcher,
};
use std::sync::Arc;

use regex::Regex;

use super::ConfigError;

/// Compiled regexes by pattern. Route tables repeat patterns (a method
/// list becomes the same regex on thousands of routes) and are converted
/// again on every change; a compiled `Regex` is shared behind an `Arc` (a
/// `Regex` clone would get its own match-cache pool), so each
/// pattern is compiled and held once. Cleared when it grows past a bound.
static REGEX_CACHE: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<Regex>>>,
> = std::sync::LazyLock::new(Default::default);

const REGEX_CACHE_MAX: usize = 50_000;

/// Compiles `pattern`, or returns the copy compiled before.
pub fn cached_regex(pattern: &str) -> Result<Arc<Regex>, regex::Error> {
    let mut cache = REGEX_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = cache.get(pattern) {
        return Ok(r.clone());
    }
    let r = Arc::new(Regex::new(pattern)?);
    if cache.len() >= REGEX_CACHE_MAX {
        cache.clear();
    }
    cache.insert(pattern.to_string(), r.clone());
    Ok(r)
}

/// Compiles an Envoy `RegexMatcher` (RE2 syntax; Rust's `regex` accepts the
/// same language). Envoy matches a regex against the *whole* value, so the
/// pattern is anchored here.
pub fn full_regex(m: &RegexMatcher, at: &str) -> Result<Arc<Regex>, ConfigError> {
    cached_regex(&format!("^(?:{})$", m.regex))
        .map_err(|e| ConfigError::new(at, format!("bad regex {:?}: {e}", m.regex)))
}

/// A `RegexMatchAndSubstitute`: an unanchored pattern and its replacement,
/// with RE2's `\1` references turned into the `regex` crate's `${1}`.
#[derive(Debug, Clone)]
pub struct Substitution {
    pattern: Arc<Regex>,
    replacement: String,
}

impl Substitution {
    /// Compiles it.
    pub fn compile(m: &RegexMatchAndSubstitute, at: &str) -> Result<Self, ConfigError> {
        let Some(p) = &m.pattern else {
            return Err(ConfigError::new(at, "a regex substitution needs a pattern"));
        };
        let pattern = cached_regex(&p.regex)
            .map_err(|e| ConfigError::new(at, format!("bad regex {:?}: {e}", p.regex)))?;
        let mut replacement = String::with_capacity(m.substitution.len());
        let mut chars = m.substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                    replacement.push_str("${");
                    while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                        replacement.push(d);
                        chars.next();
                    }
                    replacement.push('}');
                }
                '$' => replacement.push_str("$$"),
                c => replacement.push(c),
            }
        }
        Ok(Substitution {
            pattern,
            replacement,
        })
    }

    /// Replaces every match in `input`.
    pub fn apply(&self, input: &str) -> String {
        self.pattern
            .replace_all(input, self.replacement.as_str())
            .into_owned()
    }
}

/// A compiled `StringMatcher`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    /// Equal (optionally ignoring ASCII case).
    Exact(String, bool),
    /// Starts with.
    Prefix(String, bool),
    /// Ends with.
    Suffix(String, bool),
    /// Contains.
    Contains(String, bool),
    /// The whole value matches the regex.
    Regex(Arc<Regex>),
}

impl StringMatch {
    /// Compiles a matcher; `at` names it in errors.
    pub fn compile(m: &StringMatcher, at: &str) -> Result<Self, ConfigError> {
        let ic = m.ignore_case;
        let low = |s: &String| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        Ok(match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => StringMatch::Exact(low(s), ic),
            Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(low(s), ic),
            Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(low(s), ic),
            Some(MatchPattern::Contains(s)) => StringMatch::Contains(low(s), ic),
            Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(full_regex(r, at)?),
            Some(MatchPattern::Custom(c)) => {
                return Err(ConfigError::new(
                    at,
                    format!("custom string matcher {:?} is not supported", c.name),
                ))
            }
            None => return Err(ConfigError::new(at, "string matcher without a pattern")),
        })
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        fn cmp(v: &str, ic: bool, f: impl Fn(&str) -> bool) -> bool {
            if ic {
                f(&v.to_ascii_lowercase())
            } else {
                f(v)
            }
        }
        match self {
            StringMatch::Exact(s, ic) => {
                if *ic {
                    v.eq_ignore_ascii_case(s)
                } else {
                    v == s
                }
            }
            StringMatch::Prefix(s, ic) => cmp(v, *ic, |v| v.starts_with(s.as_str())),
            StringMatch::Suffix(s, ic) => cmp(v, *ic, |v| v.ends_with(s.as_str())),
            StringMatch::Contains(s, ic) => cmp(v, *ic, |v| v.contains(s.as_str())),
            StringMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderTest {
    String(StringMatch),
    Present(bool),
    Range(i64, i64),
}

/// What header matchers see of a request, pseudo-headers included.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path` (with the query).
    pub path: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// Regular headers.
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone)]
enum HeaderSource {
    Regular(http::HeaderName),
    Method,
    Path,
    Authority,
    Scheme,
}

/// A compiled `HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    name: HeaderSource,
    test: HeaderTest,
    invert: bool,
    missing_as_empty: bool,
}

impl HeaderMatch {
    /// Compiles a header matcher.
    pub fn compile(m: &PbHeaderMatcher, at: &str) -> Result<Self, ConfigError> {
        let name = match m.name.to_ascii_lowercase().as_str() {
            ":method" => HeaderSource::Method,
            ":path" => HeaderSource::Path,
            ":authority" | "host" => HeaderSource::Authority,
            ":scheme" => HeaderSource::Scheme,
            n => HeaderSource::Regular(
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| ConfigError::new(at, format!("bad header name {:?}", m.name)))?,
            ),
        };
        let s = |pattern: MatchPattern| StringMatcher {
            ignore_case: false,
            match_pattern: Some(pattern),
        };
        let test =
            match &m.header_match_specifier {
                Some(HeaderMatchSpecifier::ExactMatch(v)) => HeaderTest::String(
                    StringMatch::compile(&s(MatchPattern::Exact(v.clone())), at)?,
                ),
                Some(HeaderMatchSpecifier::PrefixMatch(v)) => HeaderTest::String(
                    StringMatch::compile(&s(MatchPattern::Prefix(v.clone())), at)?,
                ),
                Some(HeaderMatchSpecifier::SuffixMatch(v)) => HeaderTest::String(
                    StringMatch::compile(&s(MatchPattern::Suffix(v.clone())), at)?,
                ),
                Some(HeaderMatchSpecifier::ContainsMatch(v)) => HeaderTest::String(
                    StringMatch::compile(&s(MatchPattern::Contains(v.clone())), at)?,
                ),
                Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                    HeaderTest::String(StringMatch::Regex(full_regex(r, at)?))
                }
                Some(HeaderMatchSpecifier::StringMatch(sm)) => {
                    HeaderTest::String(StringMatch::compile(sm, at)?)
                }
                Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderTest::Present(*p),
                Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderTest::Range(r.start, r.end),
                // No specifier: the header must be present.
                None => HeaderTest::Present(true),
            };
        Ok(HeaderMatch {
            name,
            test,
            invert: m.invert_match,
            missing_as_empty: m.treat_missing_header_as_empty,
        })
    }

    /// A matcher for a header's presence (as `x-envoy-retriable-header-names`
    /// lists them); `None` if `name` is not a header name.
    pub fn present(name: &str) -> Option<Self> {
        Some(HeaderMatch {
            name: HeaderSource::Regular(http::HeaderName::from_bytes(name.as_bytes()).ok()?),
            test: HeaderTest::Present(true),
            invert: false,
            missing_as_empty: false,
        })
    }

    /// Whether the request headers match. Several values of one header are
    /// joined with `,` as Envoy does.
    pub fn matches(&self, req: &RequestHead<'_>) -> bool {
        let name = match &self.name {
            HeaderSource::Regular(n) => n,
            HeaderSource::Method => return self.decide(Some(req.method)),
            HeaderSource::Path => return self.decide(Some(req.path)),
            HeaderSource::Authority => return self.decide(Some(req.authority)),
            HeaderSource::Scheme => return self.decide(Some(req.scheme)),
        };
        let headers = req.headers;
        let mut values = headers.get_all(name).iter();
        let joined;
        let value: Option<&str> = match (values.next(), values.next()) {
            (None, _) => None,
            (Some(v), None) => Some(v.to_str().unwrap_or("")),
            (Some(_), Some(_)) => {
                joined = headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(",");
                Some(joined.as_str())
            }
        };
        self.decide(value)
    }

    fn decide(&self, value: Option<&str>) -> bool {
        let value = value.or(if self.missing_as_empty {
            Some("")
        } else {
            None
        });
        let result = match (&self.test, value) {
            (HeaderTest::Present(p), v) => v.is_some() == *p,
            (_, None) => return false, // absent never matches, even inverted
            (HeaderTest::String(s), Some(v)) => s.matches(v),
            (HeaderTest::Range(lo, hi), Some(v)) => {
                v.parse::<i64>().is_ok_and(|n| n >= *lo && n < *hi)
            }
        };
        result != self.invert
    }
}

/// A compiled `CookieMatcher`: a cookie's value against a string
/// matcher; an absent cookie does not match (so it does, inverted).
#[derive(Debug, Clone)]
pub struct CookieMatch {
    name: String,
    test: StringMatch,
    invert: bool,
}

impl CookieMatch {
    /// Compiles a cookie matcher.
    pub fn compile(
        m: &portico_proto::envoy::config::route::v3::CookieMatcher,
        at: &str,
    ) -> Result<Self, ConfigError> {
        if m.name.is_empty() {
            return Err(ConfigError::new(at, "cookie matcher has no name"));
        }
        let s = m
            .string_match
            .as_ref()
            .ok_or_else(|| ConfigError::new(at, "cookie matcher has no string_match"))?;
        Ok(CookieMatch {
            name: m.name.clone(),
            test: StringMatch::compile(s, at)?,
            invert: m.invert_match,
        })
    }

    /// Whether the request's cookies match.
    pub fn matches(&self, h: &HeaderMap) -> bool {
        cookie_value(h, &self.name).is_some_and(|v| self.test.matches(v)) != self.invert
    }
}

/// A cookie's value in the request's `Cookie` headers (the first with the
/// name), without the quotes it may be sent in.
pub fn cookie_value<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let v = h
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))?;
    Some(
        v.strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v),
    )
}

/// A compiled `QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct QueryMatch {
    name: String,
    test: Option<StringMatch>,
}

impl QueryMatch {
    /// Compiles a query parameter matcher.
    pub fn compile(m: &PbQueryMatcher, at: &str) -> Result<Self, ConfigError> {
        let test = match &m.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => {
                Some(StringMatch::compile(s, at)?)
            }
            Some(QueryParameterMatchSpecifier::PresentMatch(_)) | None => None,
        };
        Ok(QueryMatch {
            name: m.name.clone(),
            test,
        })
    }

    /// Whether the query string (without `?`) matches: the first parameter
    /// with the name decides, as in Envoy.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let Some(q) = query else { return false };
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == self.name {
                return match &self.test {
                    None => true,
                    Some(t) => t.matches(&percent_decode(v)),
                };
            }
        }
        false
    }
}

/// Decodes `%XX` escapes and `+` (form encoding) for query values.
pub(crate) fn percent_decode(v: &str) -> String {
    if !v.contains(['%', '+']) {
        return v.to_string();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn rewrite_references_become_regex_crate_syntax() {
        let m = RegexMatchAndSubstitute {
            pattern: Some(RegexMatcher {
                regex: "^/v1/(.*)$".into(),
                ..Default::default()
            }),
            substitution: "/api/\\1?cost=$5".into(),
        };
        let s = Substitution::compile(&m, "t").expect("compiles");
        assert_eq!(s.apply("/v1/pets"), "/api/pets?cost=$5");
    }

    #[test]
    fn headers_join_values_and_invert() {
        let m = PbHeaderMatcher {
            name: "X-A".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("1,2".into())),
            ..Default::default()
        };
        let hm = HeaderMatch::compile(&m, "t").expect("compiles");
        let mut h = HeaderMap::new();
        fn head(h: &HeaderMap) -> RequestHead<'_> {
            RequestHead {
                method: "GET",
                path: "/",
                authority: "a",
                scheme: "http",
                headers: h,
            }
        }
        assert!(!hm.matches(&head(&h)));
        h.append("x-a", "1".parse().expect("value"));
        h.append("x-a", "2".parse().expect("value"));
        assert!(hm.matches(&head(&h)));
    }
}
