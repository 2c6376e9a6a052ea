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
//! - `path_with_escaped_slashes_action`: `%2F` and `%5C` (either case)
//!   are found, and unescaped when asked, before the two above, as Envoy
//!   orders them; what to do when there were some is the caller's call.
//!
//! The query is left as it is. The rewritten path is what the upstream
//! gets, as in Envoy.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the path has a malformed percent-encoding")]
pub(super) struct BadPath;

/// Which rewrites to apply.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Rewrites {
    /// RFC 3986 normalization.
    pub normalize: bool,
    /// Runs of `/` become one.
    pub merge_slashes: bool,
    /// `%2F` becomes `/`, and `%5C` a backslash.
    pub unescape_slashes: bool,
}

/// A rewritten request path.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Rewritten {
    /// The new `path?query`, or `None` when it is unchanged.
    pub path_and_query: Option<String>,
    /// The path had `%2F` or `%5C` in it.
    pub escaped_slashes: bool,
}

/// Rewrites `path?query` as `how` asks.
pub(super) fn normalize(path_and_query: &str, how: Rewrites) -> Result<Rewritten, BadPath> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let escaped_slashes = has_escaped_slash(path);
    let unescaped;
    let start = if escaped_slashes && how.unescape_slashes {
        unescaped = unescape_slashes(path);
        unescaped.as_str()
    } else {
        path
    };
    let mut out = if how.normalize {
        // A backslash is a slash to the canonicalizer (Envoy's, and
        // browsers'), so that `\..\` is a dot segment too.
        let decoded = decode_unreserved(start)?;
        if decoded.contains('\\') {
            remove_dot_segments(&decoded.replace('\\', "/"))
        } else {
            remove_dot_segments(&decoded)
        }
    } else {
        start.to_string()
    };
    let merge_slashes = how.merge_slashes;
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
        return Ok(Rewritten {
            path_and_query: None,
            escaped_slashes,
        });
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(Rewritten {
        path_and_query: Some(out),
        escaped_slashes,
    })
}

/// `%2F` or `%5C`, in either case.
fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2] | 0x20 == b'f') || (w[1] == b'5' && w[2] | 0x20 == b'c'))
    })
}

fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let pair = b.get(i + 1..i + 3).map(|p| (p[0], p[1] | 0x20));
        match (b[i], pair) {
            (b'%', Some((b'2', b'f'))) => out.push('/'),
            (b'%', Some((b'5', b'c'))) => out.push('\\'),
            (c, _) => {
                // Not a slash escape: copied as it is (a whole UTF-8
                // character at a time, so the result stays valid).
                let len = utf8_len(c);
                out.push_str(&path[i..i + len]);
                i += len;
                continue;
            }
        }
        i += 3;
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
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

    const NORMALIZE: Rewrites = Rewrites {
        normalize: true,
        merge_slashes: false,
        unescape_slashes: false,
    };
    const MERGE: Rewrites = Rewrites {
        normalize: false,
        merge_slashes: true,
        unescape_slashes: false,
    };

    fn n(p: &str) -> String {
        normalize(p, NORMALIZE)
            .expect("valid")
            .path_and_query
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
        assert_eq!(
            normalize("/plain/path?x=1", NORMALIZE).map(|r| r.path_and_query),
            Ok(None)
        );
        assert_eq!(normalize("/bad%zz", NORMALIZE), Err(BadPath));
        assert_eq!(normalize("/bad%4", NORMALIZE), Err(BadPath));
    }

    #[test]
    fn merged_slashes() {
        let m = |p: &str| normalize(p, MERGE).expect("valid").path_and_query;
        assert_eq!(m("//admin///x?a=//b").as_deref(), Some("/admin/x?a=//b"));
        assert_eq!(m("/a/b"), None);
        let both = Rewrites {
            normalize: true,
            ..MERGE
        };
        assert_eq!(
            normalize("//a/../b", both)
                .expect("valid")
                .path_and_query
                .as_deref(),
            Some("/b")
        );
    }

    /// Random paths from the characters that matter here: no panic, and
    /// a rewritten path rewrites to itself (what routing saw is what the
    /// upstream would see again).
    #[test]
    fn random_paths_are_stable_after_one_rewrite() {
        const PIECES: [&str; 14] = [
            "/", "//", ".", "..", "%2F", "%2f", "%5C", "%2E", "%2e%2E", "\\", "a", "%", "%4",
            "?q=/..",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut p = String::from("/");
            for _ in 0..(next() % 12) {
                p.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            let how = Rewrites {
                normalize: next() % 2 == 0,
                merge_slashes: next() % 2 == 0,
                unescape_slashes: next() % 2 == 0,
            };
            let Ok(once) = normalize(&p, how) else {
                continue; // a malformed escape: refused, fine
            };
            let once = once.path_and_query.unwrap_or(p.clone());
            let twice = normalize(&once, how).expect("a rewritten path is valid");
            assert_eq!(twice.path_and_query, None, "{p:?} -> {once:?} ({how:?})");
        }
    }

    #[test]
    fn escaped_slashes() {
        let found = |p: &str| normalize(p, Rewrites::default()).expect("valid");
        assert!(found("/a%2fb").escaped_slashes);
        assert!(found("/a%5Cb").escaped_slashes);
        assert!(
            !found("/a%2eb?x=%2F").escaped_slashes,
            "the query is not the path"
        );
        assert_eq!(found("/a%2Fb").path_and_query, None, "found, not rewritten");
        let unescape = Rewrites {
            unescape_slashes: true,
            ..Rewrites::default()
        };
        let u = |p: &str| normalize(p, unescape).expect("valid").path_and_query;
        assert_eq!(u("/a%2fb%5c%2Fé?q=%2F").as_deref(), Some("/a/b\\/é?q=%2F"));
        assert_eq!(u("/a%2"), None);
        // Unescaped first, then normalized and merged, as in Envoy: the
        // dot segments that appear are removed.
        let all = Rewrites {
            normalize: true,
            merge_slashes: true,
            unescape_slashes: true,
        };
        let r = normalize("/public%2F..%2F%2Fadmin", all).expect("valid");
        assert_eq!(r.path_and_query.as_deref(), Some("/admin"));
        assert!(r.escaped_slashes);
        // A backslash is a slash to the normalizer, escaped or not.
        let forward = Rewrites {
            merge_slashes: false,
            ..all
        };
        let r = normalize("/public%5C..%5Cadmin", forward).expect("valid");
        assert_eq!(r.path_and_query.as_deref(), Some("/admin"));
        let r = normalize("/public\\..\\admin", NORMALIZE).expect("valid");
        assert_eq!(r.path_and_query.as_deref(), Some("/admin"));
    }
}
