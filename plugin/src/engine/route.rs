//! Which spelling of a request's path and parameters the policy judges.
//!
//! A covered route must not be reachable by spelling its path differently. Envoy
//! forwards many spellings unchanged (unless its own path normalisation is on), and the
//! recipient's framework may read several of them as the same route: `//v1/customers`,
//! `/v1/./customers`, `/v1/%63ustomers`, `/V1/Customers`, `/v1/customers;jsessionid=1`,
//! `/v1/x/../customers`. So bindings are chosen from a *canonical* path, never from the
//! bytes as sent:
//!
//! 1. the query (`?…`) and a fragment (`#…`) are not part of the path;
//! 2. percent-escapes of unreserved characters (RFC 3986 §2.3: letters, digits, `-._~`)
//!    are decoded; every other escape is kept with upper-case hex digits;
//! 3. in each segment, a path parameter (from `;`, also spelled `%3B`, to the segment's
//!    end) is dropped, as Tomcat, Spring and Jetty do before routing (the parameters
//!    themselves are not judged: see SECURITY.md, "Known limits");
//! 4. empty segments are dropped (merged slashes), `.` segments removed and `..`
//!    segments remove their parent (RFC 3986 §5.2.4), after steps 2 and 3, so `%2e%2e`
//!    and `..;x` are dot segments too;
//! 5. paths compare case-insensitively unless the recipient's service declares its
//!    paths case-sensitive ([`fold_case`]: ASCII case, and the four letters outside
//!    ASCII whose case mapping is an ASCII letter).
//!
//! A path that has no single safe reading is refused (reason `unsafe_path`) when any
//! reading of it could be covered: an encoded `/` or `\` (`%2F`, `%5C`), an encoded `?`
//! or `#` (`%3F`, `%23`), a raw `\`, an invalid escape (`%zz`, `%u002e`), a NUL or
//! another control character, or a `..` above the root. The readings tried for that are
//! the most covering ones: `%2F`, `%5C` and `\` as `/`, IIS's `%uHHHH` as its (ASCII)
//! character, the path cut at an encoded `?` or `#`, a NUL or an invalid escape, and a
//! `..` above the root ignored.
//!
//! Query parameters are read the way web frameworks read them: `&` and `;` both
//! separate parameters, names are percent-decoded (`+` is a space), compared
//! case-insensitively by default, and `name[]`, `name[0]`, `name[key]` are `name`.

use std::fmt;

/// Why a path has no single safe reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// `%2F` or `%5C`: a recipient that decodes it sees another path than Envoy routed.
    EscapedSlash,
    /// A raw `\`, which some servers read as `/`.
    Backslash,
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// A NUL (raw or `%00`) or another control character.
    ControlCharacter,
    /// A `..` segment with no parent left to remove.
    AboveRoot,
    /// `%3F` or `%23`: a recipient that decodes before it splits reads a query or a
    /// fragment there, which the filter would not judge as one.
    EscapedDelimiter,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathProblem::EscapedSlash => "the path holds an encoded slash or backslash (%2F or %5C), which the recipient may read as a path separator; send the segment unencoded or change the API",
            PathProblem::Backslash => "the path holds a backslash, which some servers read as a path separator; send it percent-encoded as part of a value, not in the path",
            PathProblem::InvalidEscape => "the path holds a `%` that does not start a two-digit hex escape; encode a literal % as %25",
            PathProblem::ControlCharacter => "the path holds a NUL or another control character",
            PathProblem::AboveRoot => "a `..` segment climbs above the root of the path",
            PathProblem::EscapedDelimiter => "the path holds an encoded `?` or `#` (%3F, %23), which a recipient that decodes the path before it splits it reads as the start of a query or fragment; send a real `?` for a query",
        })
    }
}

/// The value of one hex digit.
pub fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path part of a `:path` value: before the query and the fragment.
pub fn path_part(raw: &str) -> &str {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    &raw[..end]
}

/// What the byte scan of one path found, before segments are resolved.
enum Scan {
    /// A byte of the path as it must be compared.
    Byte(u8),
    /// The start of a path parameter (`;` or `%3B`): the rest of the segment is dropped.
    Param,
    /// A segment boundary.
    Slash,
    /// Leniently, the path ends here: at an encoded `?` or `#` (where a recipient that
    /// decodes before it splits starts the query), a NUL or an invalid escape.
    End,
}

/// Canonicalises one path (query and fragment already cut off, see [`path_part`]).
/// `strict` refuses what has no single safe reading; lenient reads it the most
/// covering way instead (see the module documentation) and never fails.
fn resolve(path: &str, strict: bool) -> Result<String, PathProblem> {
    let b = path.as_bytes();
    let mut scanned: Vec<Scan> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let (item, step) = match c {
            b'%' => match (
                b.get(i + 1).copied().and_then(hex_digit),
                b.get(i + 2).copied().and_then(hex_digit),
            ) {
                (Some(h), Some(l)) => {
                    let d = (h << 4) | l;
                    let item = match d {
                        b'/' | b'\\' if strict => return Err(PathProblem::EscapedSlash),
                        b'/' | b'\\' => Scan::Slash,
                        0 if strict => return Err(PathProblem::ControlCharacter),
                        0 => Scan::End,
                        d if d < 0x20 || d == 0x7f => {
                            if strict {
                                return Err(PathProblem::ControlCharacter);
                            }
                            Scan::Byte(d)
                        }
                        b';' => Scan::Param,
                        b'?' | b'#' if strict => return Err(PathProblem::EscapedDelimiter),
                        b'?' | b'#' => Scan::End,
                        d if is_unreserved(d) => Scan::Byte(d),
                        // Kept encoded, with upper-case hex: one spelling per byte.
                        _ => {
                            scanned.push(Scan::Byte(b'%'));
                            scanned.push(Scan::Byte(HEX_UPPER[usize::from(h)]));
                            Scan::Byte(HEX_UPPER[usize::from(l)])
                        }
                    };
                    (item, 3)
                }
                _ if strict => return Err(PathProblem::InvalidEscape),
                // A decoder may stop at it: the path up to it is the covering reading.
                _ => (Scan::End, 1),
            },
            b'\\' if strict => return Err(PathProblem::Backslash),
            b'\\' | b'/' => (Scan::Slash, 1),
            0 if strict => return Err(PathProblem::ControlCharacter),
            0 => (Scan::End, 1),
            c if (c < 0x20 || c == 0x7f) && strict => return Err(PathProblem::ControlCharacter),
            b';' => (Scan::Param, 1),
            c => (Scan::Byte(c), 1),
        };
        let end = matches!(item, Scan::End);
        scanned.push(item);
        if end {
            break;
        }
        i += step;
    }

    // Segments, each without its path parameter; then dot segments and empty ones.
    let mut segments: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut in_param = false;
    let flush = |current: &mut Vec<u8>, segments: &mut Vec<Vec<u8>>| -> Result<(), PathProblem> {
        match current.as_slice() {
            b"" | b"." => {}
            b".." => {
                if segments.pop().is_none() && strict {
                    return Err(PathProblem::AboveRoot);
                }
            }
            _ => segments.push(std::mem::take(current)),
        }
        current.clear();
        Ok(())
    };
    for item in scanned {
        match item {
            Scan::Slash => {
                flush(&mut current, &mut segments)?;
                in_param = false;
            }
            Scan::End => break,
            Scan::Param => in_param = true,
            Scan::Byte(c) if !in_param => current.push(c),
            Scan::Byte(_) => {}
        }
    }
    flush(&mut current, &mut segments)?;
    let mut out = String::with_capacity(path.len() + 1);
    if segments.is_empty() {
        out.push('/');
    }
    for s in segments {
        out.push('/');
        // Every byte came from a `&str` or is ASCII: the segments are valid UTF-8.
        out.push_str(&String::from_utf8_lossy(&s));
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// `%uHHHH` at the start of `b` naming an ASCII character: that character.
fn iis_escape(b: &[u8]) -> Option<u8> {
    if b.len() < 6 || b[0] != b'%' || !b[1].eq_ignore_ascii_case(&b'u') {
        return None;
    }
    let mut v: u32 = 0;
    for &c in &b[2..6] {
        v = v * 16 + u32::from(hex_digit(c)?);
    }
    u8::try_from(v).ok().filter(u8::is_ascii)
}

/// The canonical form of a path (query and fragment are cut off here), or why it has no
/// single safe reading.
pub fn canonical_path(raw: &str) -> Result<String, PathProblem> {
    resolve(path_part(raw), true)
}

/// The most covering reading of a path that [`canonical_path`] refuses: what decides
/// whether such a path could be covered, and so is refused rather than passed.
pub fn lenient_path(raw: &str) -> String {
    // IIS reads `%uHHHH` as the character U+HHHH: an ASCII one is read the same way
    // here, through the rules for `%HH`.
    let path = path_part(raw);
    let b = path.as_bytes();
    let mut spelled = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match iis_escape(&b[i..]) {
            Some(c) => {
                spelled.push('%');
                spelled.push(char::from(HEX_UPPER[usize::from(c >> 4)]));
                spelled.push(char::from(HEX_UPPER[usize::from(c & 0xf)]));
                i += 6;
            }
            None => {
                let next = (i + 1..=b.len())
                    .find(|&j| path.is_char_boundary(j))
                    .unwrap_or(b.len());
                spelled.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    // The lenient reading never fails.
    resolve(&spelled, false).unwrap_or_else(|_| "/".to_string())
}

/// A canonical path as compared case-insensitively: ASCII letters in lower case, and the
/// letters outside ASCII whose simple case mapping is an ASCII letter (which Java's
/// `equalsIgnoreCase` and .NET's `OrdinalIgnoreCase` match with it) read as that letter:
/// `ſ` (U+017F) and `ı` (U+0131) as `s` and `i`, the Kelvin sign (U+212A) as `k`, `İ`
/// (U+0130) as `i`, raw or percent-encoded.
pub fn fold_case(path: &str) -> String {
    const FOLDS: [(&str, &str, char); 4] = [
        ("\u{17f}", "%C5%BF", 's'),
        ("\u{131}", "%C4%B1", 'i'),
        ("\u{130}", "%C4%B0", 'i'),
        ("\u{212a}", "%E2%84%AA", 'k'),
    ];
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    'outer: while let Some(c) = rest.chars().next() {
        for (raw, encoded, ascii) in FOLDS {
            for spelled in [raw, encoded] {
                if rest.len() >= spelled.len()
                    && rest.as_bytes()[..spelled.len()].eq_ignore_ascii_case(spelled.as_bytes())
                {
                    out.push(ascii);
                    rest = &rest[spelled.len()..];
                    continue 'outer;
                }
            }
        }
        out.push(c.to_ascii_lowercase());
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The number of segments of a canonical path (`/` has none).
pub fn segment_count(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

/// Whether canonical `path` is canonical `prefix` or lies below it, segment-wise.
pub fn has_prefix(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if prefix == "/" {
        return true;
    }
    let (p, q) = (path.as_bytes(), prefix.as_bytes());
    if p.len() < q.len() {
        return false;
    }
    let head = &p[..q.len()];
    let same = if case_sensitive {
        head == q
    } else {
        head.eq_ignore_ascii_case(q)
    };
    same && matches!(p.get(q.len()), None | Some(b'/'))
}

/// The name a query parameter is matched by: percent-decoded (`+` is a space), and
/// `name[]`, `name[0]`, `name[key]` read as `name`, as PHP, Rails, Express (qs) and
/// others read them. Case is left to the comparison.
pub fn param_base_name(raw_name: &str) -> String {
    let mut name = super::actions::percent_decode(raw_name);
    if let Some(open) = name.find('[') {
        if open > 0 {
            name.truncate(open);
        }
    }
    name
}

/// One parameter of a query string: its raw text and the separator before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawParam<'a> {
    /// `&` or `;` before it; `None` for the first.
    pub sep: Option<char>,
    /// `name=value` or `name`, as sent.
    pub raw: &'a str,
}

impl<'a> RawParam<'a> {
    pub fn raw_name(&self) -> &'a str {
        self.raw.split_once('=').map(|(k, _)| k).unwrap_or(self.raw)
    }

    pub fn raw_value(&self) -> &'a str {
        self.raw.split_once('=').map(|(_, v)| v).unwrap_or("")
    }
}

/// The parameters of a query string (the part after `?`, without a fragment), split on
/// both `&` and `;`; empty ones are skipped.
pub fn query_params(query: &str) -> Vec<RawParam<'_>> {
    let query = query.split('#').next().unwrap_or("");
    let mut out = Vec::new();
    let mut sep = None;
    let mut start = 0;
    for (i, c) in query.char_indices() {
        if c == '&' || c == ';' {
            if i > start {
                out.push(RawParam {
                    sep,
                    raw: &query[start..i],
                });
            }
            sep = Some(c);
            start = i + 1;
        }
    }
    if query.len() > start {
        out.push(RawParam {
            sep,
            raw: &query[start..],
        });
    }
    out
}

/// Header names compare case-insensitively, and `_` as `-`: CGI-style servers (PHP,
/// WSGI, Rack) read `x_customer_email` as `x-customer-email`, and Envoy forwards both.
pub fn header_name_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let norm = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            norm(x) == norm(y)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> String {
        canonical_path(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn equivalent_spellings_have_one_canonical_form() {
        for p in [
            "/v1/customers",
            "/v1/customers/",
            "//v1//customers",
            "/v1/./customers",
            "/v1/x/../customers",
            "/v1/x/%2e%2E/customers",
            "/v1/%63ustomers",
            "/v1/customers;jsessionid=abc",
            "/v1;v=2/customers%3Bx",
            "/v1/customers?x=1",
            "/v1/customers#frag",
            "/v1/x/..;/customers",
            "/v1/customers/.",
        ] {
            assert_eq!(canon(p), "/v1/customers", "{p}");
        }
        assert_eq!(canon(""), "/");
        assert_eq!(canon("/"), "/");
        assert_eq!(canon("/a/.."), "/");
        assert_eq!(canon("/a%20b/%7e"), "/a%20b/~");
        assert_eq!(canon("/a%c3%a9"), "/a%C3%A9");
        assert_eq!(canon("/V1/Customers"), "/V1/Customers");
    }

    #[test]
    fn unsafe_paths_are_refused_and_read_leniently() {
        for (p, problem, lenient) in [
            (
                "/v1%2Fcustomers",
                PathProblem::EscapedSlash,
                "/v1/customers",
            ),
            (
                "/v1%5ccustomers",
                PathProblem::EscapedSlash,
                "/v1/customers",
            ),
            ("/v1\\customers", PathProblem::Backslash, "/v1/customers"),
            (
                "/v1/customers%zz",
                PathProblem::InvalidEscape,
                "/v1/customers",
            ),
            (
                "/v1/%u0063ustomers",
                PathProblem::InvalidEscape,
                "/v1/customers",
            ),
            (
                "/v1%u002fcustomers",
                PathProblem::InvalidEscape,
                "/v1/customers",
            ),
            ("/v1/x%u20acx", PathProblem::InvalidEscape, "/v1/x"),
            (
                "/v1/customers%3Femail=a",
                PathProblem::EscapedDelimiter,
                "/v1/customers",
            ),
            (
                "/v1/customers%23x",
                PathProblem::EscapedDelimiter,
                "/v1/customers",
            ),
            (
                "/v1/customers%00.json",
                PathProblem::ControlCharacter,
                "/v1/customers",
            ),
            (
                "/v1/customers\0x",
                PathProblem::ControlCharacter,
                "/v1/customers",
            ),
            (
                "/v1/cu\tstomers",
                PathProblem::ControlCharacter,
                "/v1/cu\tstomers",
            ),
            ("/../v1/customers", PathProblem::AboveRoot, "/v1/customers"),
            (
                "/v1/../../v1/customers",
                PathProblem::AboveRoot,
                "/v1/customers",
            ),
            (
                "/v1/customers/%",
                PathProblem::InvalidEscape,
                "/v1/customers",
            ),
            (
                "/v1/customers/%4",
                PathProblem::InvalidEscape,
                "/v1/customers",
            ),
        ] {
            assert_eq!(canonical_path(p), Err(problem), "{p:?}");
            assert_eq!(lenient_path(p), lenient, "{p:?}");
        }
    }

    #[test]
    fn case_folds_to_ascii_where_a_letter_maps_to_one() {
        assert_eq!(fold_case("/V1/CUSTOMERS"), "/v1/customers");
        assert_eq!(fold_case("/v1/cu\u{17f}tomers"), "/v1/customers");
        assert_eq!(fold_case("/v1/cu%C5%BFtomers"), "/v1/customers");
        assert_eq!(fold_case("/v1/cu%c5%bftomers"), "/v1/customers");
        assert_eq!(fold_case("/\u{212a}ey/L\u{131}st/\u{130}d"), "/key/list/id");
        assert_eq!(fold_case("/caf%C3%A9/\u{e9}"), "/caf%c3%a9/\u{e9}");
        assert_eq!(segment_count("/"), 0);
        assert_eq!(segment_count("/v1/customers"), 2);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(has_prefix("/v1/customers", "/v1/customers", true));
        assert!(has_prefix("/v1/customers/42", "/v1/customers", true));
        assert!(!has_prefix("/v1/customersx", "/v1/customers", false));
        assert!(!has_prefix("/v1/Customers", "/v1/customers", true));
        assert!(has_prefix("/V1/CUSTOMERS/a", "/v1/customers", false));
        assert!(has_prefix("/anything", "/", true));
        assert!(!has_prefix("/v1", "/v1/customers", false));
    }

    #[test]
    fn query_parameters_split_on_both_separators() {
        let ps = query_params("a=1&b=2;c&&d=x=y#frag");
        let raws: Vec<_> = ps.iter().map(|p| (p.sep, p.raw)).collect();
        assert_eq!(
            raws,
            vec![
                (None, "a=1"),
                (Some('&'), "b=2"),
                (Some(';'), "c"),
                (Some('&'), "d=x=y")
            ]
        );
        assert_eq!(ps[3].raw_name(), "d");
        assert_eq!(ps[3].raw_value(), "x=y");
        assert_eq!(ps[2].raw_value(), "");
    }

    #[test]
    fn parameter_names_are_read_as_frameworks_read_them() {
        assert_eq!(param_base_name("email"), "email");
        assert_eq!(param_base_name("email[]"), "email");
        assert_eq!(param_base_name("email[0]"), "email");
        assert_eq!(param_base_name("email[work]"), "email");
        assert_eq!(param_base_name("%65mail%5B%5D"), "email");
        assert_eq!(param_base_name("e+mail"), "e mail");
        assert_eq!(param_base_name("[x]"), "[x]");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 1000, failure_persistence: None, ..Default::default() })]

        /// Any text, however hostile: no panic (a panic traps the VM), the lenient reading
        /// of a path with a single safe reading is that reading, and canonical forms are
        /// fixed points.
        #[test]
        fn any_path_is_read_without_panic_and_consistently(
            path in "(/|%|[0-9a-fA-F]|u|;|\\.|\\?|#|\\\\|\u{0}|\u{17f}|é|[a-z]){0,40}",
            any in "\\PC{0,40}",
        ) {
            for p in [&path, &any] {
                let lenient = lenient_path(p);
                match canonical_path(p) {
                    Ok(c) => {
                        proptest::prop_assert_eq!(&lenient, &c, "{:?}", p);
                        proptest::prop_assert_eq!(canonical_path(&c), Ok(c.clone()));
                    }
                    Err(_) => proptest::prop_assert!(lenient.starts_with('/')),
                }
                let _ = fold_case(p);
                let _ = segment_count(&lenient);
                for q in query_params(p) {
                    let _ = param_base_name(q.raw_name());
                    let _ = q.raw_value();
                }
                let _ = header_name_eq(p, "x-customer-email");
            }
        }
    }

    #[test]
    fn header_names_treat_underscore_as_dash() {
        assert!(header_name_eq("x_customer_email", "x-customer-email"));
        assert!(header_name_eq("X-Customer-Email", "x-customer-email"));
        assert!(!header_name_eq("x-customer-emails", "x-customer-email"));
    }
}
