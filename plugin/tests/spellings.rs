//! Spellings: another spelling of a covered route, query parameter or header gets the
//! decision its canonical spelling gets, and a path with no single safe reading is
//! refused where it could be covered.
//!
//! The rules are those of `plugin/src/engine/route.rs` (its module documentation):
//! the query and the fragment are not part of the path; escapes of unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`) are decoded, in either hex case; a path parameter (`;…` or
//! `%3B…`) is dropped to the end of its segment; empty segments merge; `.` and `..`
//! resolve after that (so `%2e%2E` and `..;x` are dot segments); paths compare
//! case-insensitively unless the recipient declares `case_sensitive_paths`. `%2F`, `%5C`,
//! a raw `\`, an invalid or truncated escape, a NUL or another control character, and a
//! `..` above the root make a path unsafe. Query parameters split on `&` and `;`, their
//! names are percent-decoded and compared in any case, `name[]`, `name[0]`, `name[k]`
//! are `name`. Header names compare in any case with `_` as `-`.
//!
//! The generators spell a known canonical form under exactly those rules (the expected
//! canonical path is computed here, never by the engine's canonicaliser):
//! - (1) every spelling of a path routes as its canonical form, a covered body loses the
//!   same protected value and is logged under the same path; an uncovered path stays
//!   uncovered (prefixes compare segment-wise: `/v1/customersx` is another route);
//! - (2) an unsafe token inserted into a covered spelling, where its most covering reading
//!   is still covered, is refused with `unsafe_path`, never routed; inserted under a prefix
//!   no binding covers it is uncovered traffic, not refused; in the query it changes
//!   nothing;
//! - (3) for a service with `case_sensitive_paths`, a spelling that changes the letter case
//!   of the bound prefix is not covered, every other equivalence still is;
//! - (4) every occurrence of the bound query parameter, in any spelling of its name, is
//!   judged once and its value removed; other parameters survive byte for byte;
//! - (5) every instance of the bound header, in any spelling of its name, is judged.
//!
//! `PROPTEST_CASES` scales every property.

use consentry::engine::{
    DecisionLog, Direction, Exchange, Outcome, Policy, Report, RouteMatch, ServiceId, StoreAnswers,
    UninspectableKind,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
mod common;
use common::config;
use serde_json::{json, Value};
use std::fmt;

// ---------------------------------------------------------------------------------------
// The policy: `crm` may have every category, `stats` no e-mail and no name.

fn policy(case_sensitive_stats: bool) -> Policy {
    let v = json!({
        "consentry": 1,
        "name": "spellings",
        "services": {
            "crm": { "clusters": ["crm"], "principals": ["spiffe://t/crm"], "purposes": ["account"] },
            "stats": {
                "clusters": ["stats"],
                "principals": ["spiffe://t/stats"],
                "purposes": ["reporting"],
                "case_sensitive_paths": case_sensitive_stats
            }
        },
        "purposes": {
            "account": { "basis": "contract", "allows": ["user"] },
            "reporting": { "basis": "legitimate_interests", "allows": ["user.demographic"] }
        },
        "messages": [
            {
                "name": "customers",
                "paths": ["/v1/customers"],
                "records": "$.customers[*]",
                "fields": [
                    { "path": "$.email", "category": "user.contact.email" },
                    { "path": "$.name", "category": "user.name", "action": "redact" }
                ],
                "headers": [{ "name": "X-Email", "category": "user.contact.email" }],
                "query": [{ "name": "email", "category": "user.contact.email", "action": "redact" }]
            },
            {
                "name": "orders",
                "paths": ["/api/Orders"],
                "records": "$.orders[*]",
                "fields": [{ "path": "$.email", "category": "user.contact.email" }]
            }
        ]
    });
    let env = |name: &str| match name {
        "CONSENTRY_HASH_KEY" => Some("spellings-hash-key-0123456789abcdef".to_string()),
        "CONSENTRY_SUBJECT_KEY" => Some("spellings-subject-key-0123456789abcdef".to_string()),
        _ => None,
    };
    Policy::compile(v.to_string().as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
}

/// The protected value of each binding's records; the body carries both.
const CUSTOMER_EMAIL: &str = "ann@example.com";
const ORDER_EMAIL: &str = "bob@example.org";

fn body() -> Value {
    json!({
        "customers": [{ "id": "c-1", "email": CUSTOMER_EMAIL, "name": "Ann", "age": 41 }],
        "orders": [{ "id": "o-7", "email": ORDER_EMAIL, "total": 12 }]
    })
}

fn service(p: &Policy, name: &str) -> Option<ServiceId> {
    p.identify_upstream(Some(name), None).service
}

/// An exchange from `caller` (by its mTLS principal) to the service behind `upstream`.
fn exchange(
    p: &Policy,
    caller: &str,
    upstream: &str,
    path: &str,
    headers: &[(String, String)],
) -> Exchange {
    p.exchange(
        Some("req-1".into()),
        "POST",
        path,
        p.identify_caller(Some(&format!("spiffe://t/{caller}")), None),
        p.identify_upstream(Some(upstream), None),
        headers,
    )
}

/// The exchange in which `recipient` receives the message of `direction`.
fn exchange_to(
    p: &Policy,
    recipient: &str,
    direction: Direction,
    path: &str,
    headers: &[(String, String)],
) -> Exchange {
    let other = if recipient == "crm" { "stats" } else { "crm" };
    match direction {
        Direction::Request => exchange(p, other, recipient, path, headers),
        Direction::Response => exchange(p, recipient, other, path, headers),
    }
}

/// What `stats` receives of [`body`] sent to `path` in `direction`, and the log entry.
fn body_to_stats(p: &Policy, path: &str, direction: Direction) -> (Value, DecisionLog) {
    let ex = exchange_to(p, "stats", direction, path, &[]);
    let sent = body().to_string();
    let plan = p
        .plan_body(
            &ex,
            direction,
            Some("application/json"),
            None,
            sent.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{path:?}: {e:?}"));
    let v = p.judge_body(&ex, direction, plan, &StoreAnswers::new());
    let out = match &v.body {
        Some(b) => serde_json::from_slice(b).expect("the engine writes JSON"),
        None => body(),
    };
    (out, p.decision_log(&ex, direction, &v.report, None, 0))
}

// ---------------------------------------------------------------------------------------
// Canonical routes and their spellings

/// A canonical path of the tests, by its segments.
#[derive(Debug, Clone, Copy)]
struct Route {
    segs: &'static [&'static str],
    /// The binding that covers it, and how many leading segments its prefix spans.
    covered_by: Option<(&'static str, usize)>,
}

impl Route {
    fn path(&self) -> String {
        format!("/{}", self.segs.join("/"))
    }

    fn prefix_len(&self) -> usize {
        self.covered_by.map_or(0, |(_, n)| n)
    }
}

const fn covered(segs: &'static [&'static str], binding: &'static str) -> Route {
    Route {
        segs,
        covered_by: Some((binding, 2)),
    }
}

const fn uncovered(segs: &'static [&'static str]) -> Route {
    Route {
        segs,
        covered_by: None,
    }
}

const COVERED: &[Route] = &[
    covered(&["v1", "customers"], "customers"),
    covered(&["v1", "customers", "c-42"], "customers"),
    covered(&["api", "Orders"], "orders"),
    covered(&["api", "Orders", "7", "lines"], "orders"),
];

/// Neighbours of the covered routes: no spelling of them may be covered.
const NEIGHBOURS: &[Route] = &[
    uncovered(&["v1", "customersx"]),
    uncovered(&["v1", "other"]),
    uncovered(&["v1"]),
    uncovered(&["v2", "customers"]),
    uncovered(&["v1customers"]),
    uncovered(&["api", "Orders.json"]),
    uncovered(&["api", "Order"]),
    uncovered(&["static", "v1", "customers"]),
];

/// Below a first segment no binding has: no reading of them could be covered.
const STATIC: &[Route] = &[
    uncovered(&["static", "v1", "customers"]),
    uncovered(&["static", "api", "Orders"]),
    uncovered(&["assets", "x"]),
];

/// What happens to one character of a segment.
#[derive(Debug, Clone, Copy)]
struct CharOp {
    /// Change the letter's case.
    flip: bool,
    /// Percent-encode it, with upper-case (`true`) or lower-case hex digits.
    escape: Option<bool>,
}

fn char_op() -> impl Strategy<Value = CharOp> {
    (
        prop::bool::weighted(0.15),
        prop::option::weighted(0.15, any::<bool>()),
    )
        .prop_map(|(flip, escape)| CharOp { flip, escape })
}

/// Path parameters appended to a segment: dropped to the end of it.
const PARAMS: &[&str] = &[
    ";jsessionid=1",
    ";v=2",
    ";",
    "%3Bx",
    "%3b",
    ";a=%20b",
    ";..",
    ";x;y=%7E",
];
/// Spellings of a `.` segment.
const DOTS: &[&str] = &[".", "%2e", "%2E", ".;x", "%2e;"];
/// Segments a detour enters before its `..` leaves them (never empty, never a dot).
const DETOURS: &[&str] = &["x", "abc", "%78y", "customers", "V1", "a;b=c", "..."];
/// Spellings of a `..` segment.
const DOTDOTS: &[&str] = &["..", "%2e%2e", "%2E.", ".%2e", "..;p", "%2E%2E%3Bq"];
/// After the last segment.
const TRAILING: &[&str] = &["", "/", "//", "/.", "/./", "/x/..", "/%2E", "/abc/%2e%2e/"];
/// The query and fragment: never part of the path, whatever they hold.
const TAILS: &[&str] = &[
    "",
    "?a=1",
    "?email=x&b=%2F",
    "#frag",
    "?x=..%5C#y",
    "?",
    "#",
    "?p=%zz\\%00",
];

/// Between two segments (after the `/` that ends the previous one): nothing more, another
/// `/`, a dot segment, or a detour `x/../`.
fn sep_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        select(DOTS).prop_map(|d| format!("{d}/")),
        (select(DETOURS), select(DOTDOTS)).prop_map(|(x, dd)| format!("{x}/{dd}/")),
    ]
}

/// One spelling of a canonical route.
#[derive(Clone)]
struct Spelled {
    route: Route,
    /// `[sep, segment, sep, segment, ..., trailing]`, as sent.
    parts: Vec<String>,
    /// Query and fragment.
    tail: &'static str,
    /// The canonical form of this spelling: the route's segments in the letter case sent.
    canonical: String,
    /// A letter of the bound prefix changed case.
    prefix_case_changed: bool,
}

impl Spelled {
    fn path(&self) -> String {
        format!("{}{}", self.parts.concat(), self.tail)
    }
}

impl fmt::Debug for Spelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} (canonical {:?})", self.path(), self.canonical)
    }
}

fn swap_case(c: char) -> char {
    if c.is_ascii_uppercase() {
        c.to_ascii_lowercase()
    } else {
        c.to_ascii_uppercase()
    }
}

fn escape(c: char, upper: bool) -> String {
    if upper {
        format!("%{:02X}", c as u32)
    } else {
        format!("%{:02x}", c as u32)
    }
}

type SegGen = (Vec<CharOp>, Option<&'static str>);

fn spell(
    route: Route,
    segs: &[SegGen],
    seps: &[Vec<String>],
    trailing: &str,
    tail: &'static str,
) -> Spelled {
    let mut parts = Vec::new();
    let mut canonical = String::new();
    let mut prefix_case_changed = false;
    for (i, seg) in route.segs.iter().enumerate() {
        parts.push(format!("/{}", seps[i].concat()));
        let (ops, param) = &segs[i];
        let mut spelled = String::new();
        canonical.push('/');
        for (j, c) in seg.chars().enumerate() {
            let op = ops[j % ops.len()];
            let cased = if op.flip { swap_case(c) } else { c };
            prefix_case_changed |= cased != c && i < route.prefix_len();
            canonical.push(cased);
            match op.escape {
                Some(upper) => spelled.push_str(&escape(cased, upper)),
                None => spelled.push(cased),
            }
        }
        spelled.push_str(param.unwrap_or(""));
        parts.push(spelled);
    }
    parts.push(trailing.to_string());
    Spelled {
        route,
        parts,
        tail,
        canonical,
        prefix_case_changed,
    }
}

/// A spelling of one of `routes`: every rule of the module documentation at random.
fn spelled(routes: &'static [Route]) -> impl Strategy<Value = Spelled> {
    (
        select(routes),
        vec(
            (
                vec(char_op(), 12),
                prop::option::weighted(0.2, select(PARAMS)),
            ),
            4,
        ),
        vec(vec(sep_piece(), 0..3), 4),
        select(TRAILING),
        select(TAILS),
    )
        .prop_map(|(route, segs, seps, trailing, tail)| spell(route, &segs, &seps, trailing, tail))
}

// ---------------------------------------------------------------------------------------
// (1) equivalent spellings of a path

fn check_equivalent(p: &Policy, s: &Spelled) -> Result<(), TestCaseError> {
    let path = s.path();
    let canonical = s.route.path();
    let want = p
        .route("POST", &canonical, None)
        .expect("a canonical path is safe");
    let names = want
        .bindings
        .map(|b| b.map(|b| p.binding_name(b).to_string()));
    let expected_name = s.route.covered_by.map(|(n, _)| n.to_string());
    prop_assert_eq!(&names, &[expected_name.clone(), expected_name.clone()]);
    for upstream in [None, service(p, "stats"), service(p, "crm")] {
        prop_assert_eq!(
            p.route("POST", &path, upstream),
            Ok(RouteMatch {
                path: s.canonical.clone(),
                bindings: want.bindings,
            }),
            "{:?} to {:?}",
            path,
            upstream
        );
    }
    prop_assert_eq!(p.may_cover("POST", &path), s.route.covered_by.is_some());
    for d in [Direction::Request, Direction::Response] {
        prop_assert_eq!(
            exchange_to(p, "stats", d, &path, &[]).route_refusal,
            None,
            "{:?}",
            path
        );
        let (want_out, want_log) = body_to_stats(p, &canonical, d);
        let (out, log) = body_to_stats(p, &path, d);
        // The same bytes reach the recipient as for the canonical spelling ...
        prop_assert_eq!(&out, &want_out, "{:?} {:?}", path, d);
        // ... and the protected value of the covering binding is not among them.
        let text = out.to_string();
        match s.route.covered_by {
            Some(("customers", _)) => {
                prop_assert!(!text.contains(CUSTOMER_EMAIL) && text.contains(ORDER_EMAIL))
            }
            Some(_) => prop_assert!(text.contains(CUSTOMER_EMAIL) && !text.contains(ORDER_EMAIL)),
            None => prop_assert_eq!(&out, &body()),
        }
        prop_assert_eq!(&log.binding, &expected_name);
        // The log names the canonical path (in the letter case sent) and is otherwise
        // the canonical spelling's entry.
        let (_, cased_log) = body_to_stats(p, &s.canonical, d);
        prop_assert_eq!(log.to_json(), cased_log.to_json(), "{:?} {:?}", path, d);
        let same_path = match (&log.path, &want_log.path) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        };
        prop_assert!(
            same_path,
            "{:?}: logged {:?}, canonical {:?}",
            path,
            log.path,
            want_log.path
        );
        if s.canonical == canonical {
            prop_assert_eq!(&log.path, &want_log.path);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (2) unsafe paths

/// What an unsafe token does to the most covering reading of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `%2F`, `%5C`, `\`: read as `/`.
    Slash,
    /// An invalid or truncated escape, a NUL: the path is read up to it.
    Cut,
    /// A control character: kept, so it goes in a segment of its own or a parameter.
    Control,
    /// A `..` above the root: goes at the start, and is ignored.
    AboveRoot,
}

const UNSAFE: &[(&str, Class)] = &[
    ("%2F", Class::Slash),
    ("%2f", Class::Slash),
    ("%5C", Class::Slash),
    ("%5c", Class::Slash),
    ("\\", Class::Slash),
    ("%zz", Class::Cut),
    ("%G1", Class::Cut),
    ("%%41", Class::Cut),
    ("%u", Class::Cut),
    ("%", Class::Cut),
    ("%4", Class::Cut),
    ("%a", Class::Cut),
    ("%00", Class::Cut),
    ("\0", Class::Cut),
    ("\t", Class::Control),
    ("\u{1}", Class::Control),
    ("\u{7f}", Class::Control),
    ("\r", Class::Control),
    ("%01", Class::Control),
    ("%1f", Class::Control),
    ("%7F", Class::Control),
    ("/..", Class::AboveRoot),
    ("/%2e%2e", Class::AboveRoot),
    ("/..;x", Class::AboveRoot),
    ("/a/../..", Class::AboveRoot),
    ("/.%2E", Class::AboveRoot),
];

/// Where a token goes, relative to a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Right after the segment (and its parameter).
    SegEnd,
    /// Right before the segment.
    SegStart,
    /// As a segment of its own after the segment: `/TOKEN`.
    NewSegment,
    /// In a path parameter after the segment: `;TOKEN`.
    Param,
}

/// A covered (or static) spelling with one unsafe token in it.
#[derive(Clone)]
struct Unsafe {
    spelled: Spelled,
    token: &'static str,
    class: Class,
    path: String,
}

impl fmt::Debug for Unsafe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} ({:?} {:?} in {:?})",
            self.path, self.class, self.token, self.spelled
        )
    }
}

/// Inserts the token where its most covering reading keeps the route's prefix: a slash
/// anywhere between segments; a cut and a control character only after the prefix (a
/// control character also in any parameter); a `..` above the root at the start.
fn insert(s: Spelled, (token, class): (&'static str, Class), seg: usize, at: At) -> Unsafe {
    let n = s.route.segs.len();
    let after_prefix = seg.max(s.route.prefix_len().saturating_sub(1)).min(n - 1);
    let (at, i) = match (class, at) {
        (Class::Slash, at) => (at, seg % n),
        (Class::Cut, At::SegStart) => (At::SegEnd, after_prefix),
        (Class::Cut, at) => (at, after_prefix),
        (Class::Control, At::Param | At::SegStart) => (At::Param, seg % n),
        (Class::Control, _) => (At::NewSegment, after_prefix),
        (Class::AboveRoot, _) => (At::SegStart, 0),
    };
    let mut parts = s.parts.clone();
    if class == Class::AboveRoot {
        parts.insert(0, token.to_string());
    } else {
        // parts[2i + 1] is segment i.
        let (index, text) = match at {
            At::SegStart => (2 * i + 1, token.to_string()),
            At::SegEnd => (2 * i + 2, token.to_string()),
            At::NewSegment => (2 * i + 2, format!("/{token}")),
            At::Param => (2 * i + 2, format!(";{token}")),
        };
        parts.insert(index, text);
    }
    let path = format!("{}{}", parts.concat(), s.tail);
    Unsafe {
        spelled: s,
        token,
        class,
        path,
    }
}

fn unsafe_spelling(routes: &'static [Route]) -> impl Strategy<Value = Unsafe> {
    (
        spelled(routes),
        select(UNSAFE),
        0usize..4,
        select(&[At::SegEnd, At::SegStart, At::NewSegment, At::Param][..]),
    )
        .prop_map(|(s, token, seg, at)| insert(s, token, seg, at))
}

fn check_refused(p: &Policy, u: &Unsafe) -> Result<(), TestCaseError> {
    let path = &u.path;
    prop_assert!(p.may_cover("POST", path), "{:?}", path);
    for upstream in [None, service(p, "stats"), service(p, "crm")] {
        prop_assert!(
            p.route("POST", path, upstream).is_err(),
            "{:?} was routed",
            path
        );
    }
    for d in [Direction::Request, Direction::Response] {
        let ex = exchange_to(p, "stats", d, path, &[]);
        let Some(refusal) = ex.route_refusal.clone() else {
            return Err(TestCaseError::fail(format!(
                "{path:?} was not refused: binding {:?}",
                ex.binding(d)
            )));
        };
        prop_assert_eq!(refusal.kind, UninspectableKind::UnsafePath);
        prop_assert_eq!(refusal.code(), "unsafe_path");
        prop_assert_eq!(ex.binding(Direction::Request), None);
        prop_assert_eq!(ex.binding(Direction::Response), None);
        let log = p.decision_log(
            &ex,
            Direction::Request,
            &Report::default(),
            Some(&refusal),
            0,
        );
        prop_assert_eq!(log.outcome, Outcome::Uninspectable);
        prop_assert!(log.enforced && log.status == Some(400), "{:?}", log);
    }
    Ok(())
}

fn check_not_refused(p: &Policy, u: &Unsafe) -> Result<(), TestCaseError> {
    let path = &u.path;
    prop_assert!(!p.may_cover("POST", path), "{:?}", path);
    let routed = p.route("POST", path, service(p, "stats"));
    prop_assert!(
        matches!(&routed, Ok(m) if m.bindings == [None, None]),
        "{:?}: {:?}",
        path,
        routed
    );
    let ex = exchange_to(p, "stats", Direction::Request, path, &[]);
    prop_assert_eq!(&ex.route_refusal, &None, "{:?}", path);
    prop_assert_eq!(ex.binding(Direction::Request), None);
    Ok(())
}

/// The token in the query of the safe spelling: routed as the spelling is.
fn check_in_query(p: &Policy, u: &Unsafe) -> Result<(), TestCaseError> {
    let s = &u.spelled;
    let path = format!("{}?t={}", s.parts.concat(), u.token);
    let want = p.route("POST", &s.route.path(), None).expect("safe");
    prop_assert_eq!(
        p.route("POST", &path, None),
        Ok(RouteMatch {
            path: s.canonical.clone(),
            bindings: want.bindings,
        }),
        "{:?}",
        path
    );
    let ex = exchange_to(p, "stats", Direction::Request, &path, &[]);
    prop_assert_eq!(ex.route_refusal, None, "{:?}", path);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (3) case-sensitive paths

fn check_case_sensitive(p: &Policy, s: &Spelled) -> Result<(), TestCaseError> {
    let path = s.path();
    let want = p
        .route("POST", &s.route.path(), None)
        .expect("safe")
        .bindings;
    let stats = p.route("POST", &path, service(p, "stats"));
    let expected = if s.prefix_case_changed {
        [None, None]
    } else {
        want
    };
    prop_assert_eq!(
        stats,
        Ok(RouteMatch {
            path: s.canonical.clone(),
            bindings: expected,
        }),
        "{:?} to stats",
        path
    );
    // Another recipient, and the pre-check that knows no recipient, read any case.
    for upstream in [None, service(p, "crm")] {
        let m = p.route("POST", &path, upstream);
        prop_assert_eq!(
            m.map(|m| m.bindings),
            Ok(want),
            "{:?} to {:?}",
            path,
            upstream
        );
    }
    prop_assert_eq!(p.may_cover("POST", &path), s.route.covered_by.is_some());
    let ex = exchange_to(p, "stats", Direction::Request, &path, &[]);
    prop_assert_eq!(ex.binding(Direction::Request), expected[0]);
    prop_assert_eq!(ex.route_refusal, None);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (4) query parameters

const EMAILS: &[&str] = &["ann@example.com", "bob.smith@example.org", "c_d-e@x.io"];
/// `name[]`, `name[0]`, `name[k]` are `name`, also with encoded brackets.
const SUFFIXES: &[&str] = &["", "", "[]", "[0]", "[work]", "%5B%5D", "%5b0%5d"];
/// Other parameters: names that are not `email`, values that look like it.
const OTHERS: &[&str] = &[
    "page=2",
    "x=1",
    "emails=keep1%40q.io",
    "e_mail=keep2@q.io",
    "xemail=keep3@q.io",
    "mail=keep4",
    "e+mail=keep5",
    "emai=keep6",
    "email2=keep7",
    "%5Bemail%5D=keep8",
    "emails[]=keep9",
    "sort=email",
    "q=email%3Dann",
    "flag",
];

#[derive(Debug, Clone)]
enum Param {
    /// An occurrence of `email`: its name and value as sent, and the e-mail.
    Email {
        name: String,
        value: String,
        email: &'static str,
    },
    Other(&'static str),
    /// Nothing between two separators.
    Empty,
}

impl Param {
    fn text(&self) -> String {
        match self {
            Param::Email { name, value, .. } => format!("{name}={value}"),
            Param::Other(raw) => raw.to_string(),
            Param::Empty => String::new(),
        }
    }
}

/// How a value is sent: as is, with `@` encoded, or every byte encoded.
fn spell_value(email: &str, how: u8) -> String {
    match how {
        0 => email.to_string(),
        1 => email.replace('@', "%40"),
        _ => email.chars().map(|c| escape(c, how == 2)).collect(),
    }
}

fn email_param() -> impl Strategy<Value = Param> {
    (vec(char_op(), 5), select(SUFFIXES), select(EMAILS), 0u8..4).prop_map(
        |(ops, suffix, email, how)| {
            let mut name = String::new();
            for (c, op) in "email".chars().zip(ops) {
                let cased = if op.flip { swap_case(c) } else { c };
                match op.escape {
                    Some(upper) => name.push_str(&escape(cased, upper)),
                    None => name.push(cased),
                }
            }
            name.push_str(suffix);
            Param::Email {
                name,
                value: spell_value(email, how),
                email,
            }
        },
    )
}

/// A query with 0 to 3 occurrences of `email` among other and empty parameters.
#[derive(Clone)]
struct Query {
    base: &'static str,
    params: Vec<Param>,
    seps: Vec<&'static str>,
}

impl Query {
    fn text(&self) -> String {
        let mut q = String::new();
        for (i, p) in self.params.iter().enumerate() {
            if i > 0 {
                q.push_str(self.seps[i]);
            }
            q.push_str(&p.text());
        }
        q
    }

    fn path(&self) -> String {
        format!("{}?{}", self.base, self.text())
    }

    fn occurrences(&self) -> usize {
        self.params
            .iter()
            .filter(|p| matches!(p, Param::Email { .. }))
            .count()
    }
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.path())
    }
}

fn query() -> impl Strategy<Value = Query> {
    let param = prop_oneof![
        3 => email_param(),
        4 => select(OTHERS).prop_map(Param::Other),
        1 => Just(Param::Empty),
    ];
    (
        select(
            &[
                "/v1/customers",
                "//V1/./customers;j=1",
                "/v1/%63ustomers/c-42",
            ][..],
        ),
        vec(param, 1..7),
        vec(select(&["&", ";"][..]), 7),
    )
        .prop_map(|(base, mut params, seps)| {
            // At most 3 occurrences: later ones become another parameter.
            let mut seen = 0;
            for p in &mut params {
                if matches!(p, Param::Email { .. }) {
                    seen += 1;
                    if seen > 3 {
                        *p = Param::Other("page=2");
                    }
                }
            }
            Query { base, params, seps }
        })
}

fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_query(p: &Policy, q: &Query) -> Result<(), TestCaseError> {
    let path = q.path();
    let n = q.occurrences();
    let judge = |recipient: &str| {
        let ex = exchange_to(p, recipient, Direction::Request, &path, &[]);
        assert!(ex.route_refusal.is_none() && ex.binding(Direction::Request).is_some());
        let v = p.judge_headers(&ex, Direction::Request, &[], &StoreAnswers::new());
        let log = p.decision_log(&ex, Direction::Request, &v.report, None, 0);
        (v, log)
    };

    // A recipient that may have the e-mail gets every occurrence unchanged.
    let (v, _) = judge("crm");
    prop_assert_eq!(&v.new_path, &None, "{:?}", path);
    prop_assert!(v.set_headers.is_empty());
    prop_assert_eq!(v.report.decisions(), n);
    prop_assert_eq!(v.report.counts().get("allow").copied().unwrap_or(0), n);

    let (v, log) = judge("stats");
    let decisions: usize = log
        .decisions
        .iter()
        .filter(|g| g.paths == ["query:email"] && g.action == "redact")
        .map(|g| g.n)
        .sum();
    prop_assert_eq!(decisions, n, "{:?}: {:?}", path, log.decisions);
    prop_assert_eq!(v.report.decisions(), n);
    if n == 0 {
        prop_assert_eq!(&v.new_path, &None, "{:?}", path);
        return Ok(());
    }
    let new_path = v.new_path.clone().unwrap_or_default();
    let prefix = format!("{}?", q.base);
    prop_assert!(
        new_path.starts_with(&prefix),
        "{:?} -> {:?}",
        path,
        new_path
    );
    let decoded = percent_decoded(&new_path);
    for prm in &q.params {
        if let Param::Email { value, email, .. } = prm {
            prop_assert!(
                !new_path.contains(value.as_str()) && !decoded.contains(email),
                "{:?} -> {:?} still holds {:?}",
                path,
                new_path,
                email
            );
        }
    }
    // Parameter by parameter, in order: others byte for byte, each occurrence under its
    // own name with another value.
    let out: Vec<&str> = new_path[prefix.len()..]
        .split(['&', ';'])
        .filter(|s| !s.is_empty())
        .collect();
    let sent: Vec<&Param> = q
        .params
        .iter()
        .filter(|p| !matches!(p, Param::Empty))
        .collect();
    prop_assert_eq!(out.len(), sent.len(), "{:?} -> {:?}", path, new_path);
    for (got, prm) in out.iter().zip(sent) {
        match prm {
            Param::Other(raw) => prop_assert_eq!(*got, *raw, "{:?} -> {:?}", path, new_path),
            Param::Email { name, value, .. } => {
                let kept_name = got
                    .strip_prefix(name.as_str())
                    .and_then(|r| r.strip_prefix('='));
                prop_assert!(
                    kept_name.is_some_and(|v| v != value),
                    "{:?} -> {:?}: {:?}",
                    path,
                    new_path,
                    got
                );
            }
            Param::Empty => unreachable!(),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (5) headers

/// Headers that are not `x-email`.
const OTHER_HEADERS: &[&str] = &[
    "x-emails",
    "x-e-mail",
    "xemail",
    "x-email-2",
    "x_emai",
    "x--email",
    "content-type",
];

fn header_name() -> impl Strategy<Value = String> {
    vec((prop::bool::weighted(0.3), prop::bool::weighted(0.4)), 7).prop_map(|ops| {
        "x-email"
            .chars()
            .zip(ops)
            .map(|(c, (flip, underscore))| match c {
                '-' if underscore => '_',
                c if flip => swap_case(c),
                c => c,
            })
            .collect()
    })
}

/// 1 to 3 instances of `x-email` in any spelling among other headers, in any order.
fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    (vec(header_name(), 1..=3), vec(select(OTHER_HEADERS), 0..3)).prop_flat_map(
        |(bound, others)| {
            let mut hs: Vec<(String, String)> = bound
                .into_iter()
                .enumerate()
                .map(|(i, k)| (k, format!("v{i}@example.com")))
                .collect();
            hs.extend(
                others
                    .into_iter()
                    .map(|k| (k.to_string(), "keep".to_string())),
            );
            Just(hs).prop_shuffle()
        },
    )
}

fn is_bound(name: &str) -> bool {
    name.len() == 7 && name.replace('_', "-").eq_ignore_ascii_case("x-email")
}

fn check_headers(p: &Policy, headers: &[(String, String)]) -> Result<(), TestCaseError> {
    let mut spellings: Vec<&str> = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| is_bound(k))
        .collect();
    spellings.sort_unstable();
    spellings.dedup();
    for d in [Direction::Request, Direction::Response] {
        let judge = |recipient: &str| {
            let ex = exchange_to(p, recipient, d, "/v1/customers", headers);
            let v = p.judge_headers(&ex, d, headers, &StoreAnswers::new());
            let log = p.decision_log(&ex, d, &v.report, None, 0);
            (v, log)
        };
        let (v, _) = judge("crm");
        prop_assert!(v.set_headers.is_empty(), "{:?}", v.set_headers);
        prop_assert_eq!(v.report.counts().get("allow").copied(), Some(1));

        let (v, log) = judge("stats");
        // Every spelling is named, with no value left: every instance is stripped.
        let mut named: Vec<&str> = v.set_headers.iter().map(|(k, _)| k.as_str()).collect();
        named.sort_unstable();
        prop_assert_eq!(&named, &spellings, "{:?}: {:?}", d, v.set_headers);
        prop_assert!(
            v.set_headers.iter().all(|(_, vals)| vals.is_empty()),
            "{:?}",
            v.set_headers
        );
        prop_assert_eq!(v.report.counts().get("strip").copied(), Some(1));
        prop_assert_eq!(v.report.decisions(), 1);
        prop_assert_eq!(log.decisions.len(), 1);
        prop_assert_eq!(&log.decisions[0].paths, &["header:x-email".to_string()]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn a_covered_path_in_any_equivalent_spelling_is_decided_as_its_canonical_form(
        s in spelled(COVERED),
    ) {
        check_equivalent(&policy(false), &s)?;
    }

    #[test]
    fn a_neighbour_of_a_covered_path_stays_uncovered_in_any_spelling(
        s in spelled(NEIGHBOURS),
    ) {
        check_equivalent(&policy(false), &s)?;
    }

    #[test]
    fn an_unsafe_spelling_of_a_covered_path_is_refused(u in unsafe_spelling(COVERED)) {
        let p = policy(false);
        check_refused(&p, &u)?;
        check_in_query(&p, &u)?;
    }

    #[test]
    fn an_unsafe_path_no_reading_of_which_is_covered_is_not_refused(
        u in unsafe_spelling(STATIC),
    ) {
        let p = policy(false);
        check_not_refused(&p, &u)?;
        check_in_query(&p, &u)?;
    }

    #[test]
    fn a_case_sensitive_service_is_covered_only_in_the_case_of_its_prefix(
        s in prop_oneof![spelled(COVERED), spelled(NEIGHBOURS)],
    ) {
        check_case_sensitive(&policy(true), &s)?;
    }

    #[test]
    fn every_occurrence_of_a_bound_query_parameter_is_judged_in_any_spelling(q in query()) {
        check_query(&policy(false), &q)?;
    }

    #[test]
    fn every_instance_of_a_bound_header_is_judged_in_any_spelling(hs in headers()) {
        check_headers(&policy(false), &hs)?;
    }
}
