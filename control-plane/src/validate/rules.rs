//! Checks of single values shared by every kind's validation.

use std::net::IpAddr;
use std::time::Duration;

/// Names of documents and of listeners and routes: DNS-1123 subdomain
/// style, so they are safe in URLs, xDS resource names and metrics labels.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("is {} characters long; at most 253", name.len()));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ok_ends = name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !ok_chars || !ok_ends {
        return Err(format!(
            "{name:?} is not a valid name: use lower-case letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A DNS host name, optionally with a leading `*.` wildcard label.
pub fn check_hostname(host: &str, allow_wildcard: bool) -> Result<(), String> {
    let bare = match host.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Err(format!("{host:?}: a wildcard is not allowed here")),
        None => host,
    };
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!(
            "{host:?} is not a valid host name (letters, digits and '-' in dot-separated labels{})",
            if allow_wildcard {
                ", optionally starting with '*.'"
            } else {
                ""
            }
        ));
    }
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{host:?} must be lower case"));
    }
    Ok(())
}

/// An endpoint address: an IP literal or a host name.
pub fn check_address(addr: &str) -> Result<(), String> {
    if addr.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    check_hostname(addr, false)
        .map_err(|_| format!("{addr:?} is neither an IP address nor a host name"))
}

/// A duration written as `250ms`, `5s`, `1m30s`. `allow_zero` admits `0s`.
pub fn check_duration(text: &str, allow_zero: bool) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 250ms, 5s, 1m"))?;
    if d.is_zero() && !allow_zero {
        return Err("must be longer than zero".into());
    }
    if d > Duration::from_secs(24 * 3600) {
        return Err(format!("{text:?} is longer than 24h"));
    }
    Ok(d)
}

/// An RFC 3339 time stamp such as `2027-01-31T00:00:00Z`.
pub fn check_timestamp(text: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{text:?} is not an RFC 3339 time ({e}); write e.g. 2027-01-31T00:00:00Z")
    })
}

/// An RE2-compatible regular expression, bounded in compiled size so a
/// hostile pattern cannot exhaust the data plane's memory.
pub fn check_regex(pattern: &str) -> Result<(), String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map(|_| ())
        .map_err(|e| {
            format!(
                "not a valid regular expression: {}",
                one_line(&e.to_string())
            )
        })
}

/// An HTTP header name (an RFC 9110 token), not a pseudo-header.
pub fn check_header_name(name: &str) -> Result<(), String> {
    if name.starts_with(':') {
        return Err(format!(
            "{name:?}: pseudo-headers cannot be matched or edited"
        ));
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok(())
}

/// The HTTP methods a route may name.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// A URL path used in a match or a rewrite.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if let Some(c) = path
        .chars()
        .find(|c| c.is_whitespace() || *c == '?' || *c == '#')
    {
        return Err(format!("must not contain {c:?}"));
    }
    if path.contains("//") {
        return Err("must not contain an empty segment ('//')".into());
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("pets-v1.internal").is_ok());
        assert!(check_name("Pets").is_err());
        assert!(check_name("-pets").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(check_hostname("api.example.com", false).is_ok());
        assert!(check_hostname("*.example.com", true).is_ok());
        assert!(check_hostname("*.example.com", false).is_err());
        assert!(check_hostname("bad_host", true).is_err());
        assert!(check_hostname("API.example.com", true).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            check_duration("250ms", false),
            Ok(Duration::from_millis(250))
        );
        assert!(check_duration("0s", false).is_err());
        assert!(check_duration("0s", true).is_ok());
        assert!(check_duration("soon", true).is_err());
    }

    #[test]
    fn paths_and_regexes() {
        assert!(check_path("/pets").is_ok());
        assert!(check_path("pets").is_err());
        assert!(check_path("/a b").is_err());
        assert!(check_regex("/items/[0-9]+").is_ok());
        assert!(check_regex("/items/[0-9+").is_err());
    }
}
