//! The HCM's path normalization, applied before routing so that a route
//! (and later an authorization rule) sees the path the upstream will act
//! on: `/public/../admin` and `//admin` are `/admin`.
//!
//! - `normalize_path`: RFC 3986 section 6.2.2 — percent-encoded unreserved
//!   characters are decoded (so `%2E%2E` is a dot segment), other escapes
//!   get upper-case hex, and dot segments are removed (section 5.2.4). A
//!   malformed escape is refused with a 400, as Envoy refuses a path it
//!   cannot canonicalize.
//! - `merge_slashes`: runs of `/` become one.
//!
//! The query is left as it is. The rewritten path is what the upstream
//! gets, as in Envoy.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the path has a malformed percent-encoding")]
pub(super) struct BadPath;

/// The normalized `path?query`, or `None` when it is unchanged.
pub(super) fn normalize(
    path_and_query: &str,
    normalize: bool,
    merge_slashes: bool,
) -> Result<Option<String>, BadPath> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut out = if normalize {
        remove_dot_segments(&decode_unreserved(path)?)
    } else {
        path.to_string()
    };
    if merge_slashes && out.contains("//") {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    if out == path {
        return Ok(None);
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(Some(out))
}

/// Decodes escapes of unreserved characters; upper-cases the hex of the
/// others.
fn decode_unreserved(path: &str) -> Result<String, BadPath> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
            return Err(BadPath);
        };
        let c = (h * 16 + l) as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push('%');
            out.push_str(&format!("{c:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 section 5.2.4, on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut rest = path.strip_prefix('/').unwrap_or(path);
    loop {
        let (seg, next) = match rest.split_once('/') {
            Some((s, n)) => (s, Some(n)),
            None => (rest, None),
        };
        match seg {
            "." => {
                if next.is_none() {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if next.is_none() {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p, true, false)
            .expect("valid")
            .unwrap_or_else(|| p.to_string())
    }

    #[test]
    fn dot_segments_and_escapes() {
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/p/%2E%2E/admin"), "/admin");
        assert_eq!(n("/%7Euser/%41bc"), "/~user/Abc");
        assert_eq!(n("/a%2fb/%3f"), "/a%2Fb/%3F");
        assert_eq!(n("/x?q=/../y"), "/x?q=/../y");
        assert_eq!(n("/a/..?q"), "/?q");
        assert_eq!(n("/"), "/");
        assert_eq!(normalize("/plain/path?x=1", true, false), Ok(None));
        assert_eq!(normalize("/bad%zz", true, false), Err(BadPath));
        assert_eq!(normalize("/bad%4", true, false), Err(BadPath));
    }

    #[test]
    fn merged_slashes() {
        let m = |p: &str| normalize(p, false, true).expect("valid");
        assert_eq!(m("//admin///x?a=//b").as_deref(), Some("/admin/x?a=//b"));
        assert_eq!(m("/a/b"), None);
        assert_eq!(
            normalize("//a/../b", true, true).expect("valid").as_deref(),
            Some("/b")
        );
    }
}
