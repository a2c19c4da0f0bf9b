//! Reading and rewriting a body without building a tree.
//!
//! A body is read in two passes over its bytes, neither of which builds a document:
//!
//! 1. [`scan`], when the body has arrived ([`Policy::plan_body`]): checks the bytes the
//!    way a strict parser would (grammar, UTF-8, escapes and surrogate pairs, number
//!    range, nesting, a key repeated in one object once escapes are decoded, anything
//!    after the value) and follows the binding's records selector to find the records,
//!    and in each record its subject id and consent object. It keeps the records' byte
//!    spans with their subjects and consent objects (O(records), bounded by
//!    `limits.max_records`) and, while it reads, the open containers and the keys of the
//!    open objects (O(depth), plus the keys of one object for the duplicate check).
//! 2. [`rewrite`], once the consent answers are in ([`Policy::judge_body`]): walks the
//!    bytes of each record with the binding's field automaton, decides every node a
//!    selector selects, and writes only what an action changes; every other byte (key
//!    order, whitespace, the spelling of numbers and strings) is copied through as it
//!    came. A subtree no selector can reach is skipped without being decoded. The output
//!    is built only when something changes.
//!
//! Why two passes and not one: a record's consent may come after the fields it governs
//! (`{"email": ..., "consents": {...}}`), and the consent store must be asked about every
//! subject of the message before any field can be judged. The first pass learns both;
//! the second needs nothing but the body and the answers.
//!
//! Where a value must be seen as JSON and not as bytes, the tree comes back, bounded by
//! that one value: hashing a container or a number hashes its compact JSON as serde_json
//! writes it, and a record's consent object is parsed to be looked up.
//!
//! `null` carries no personal data: `redact`, `hash` and `mask` leave a `null` as it is
//! (only `strip` removes it, and `block` still blocks), so the recipient cannot learn from
//! a marker that a value existed.

use super::actions::{keyed_digest, mask_text};
use super::compile::{Action, CBinding, Policy};
use super::decision::Reason;
use super::eval::{push_index, FieldKey, Judge, Report, UNDECLARED};
use super::matcher::Cursor;
use super::policy::{MaskSpec, Undeclared};
use super::selector::{push_edge, Atom, Edge, Selector};
use serde_json::Value;
use std::borrow::Cow;

/// Containers open at once beyond which a body is refused whatever the policy says: the
/// nesting serde_json accepts, so the tree path (the oracle) and this one agree.
const NESTING_LIMIT: usize = 127;

/// Why the bytes could not be read as one JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// Not JSON: what is wrong, and at which byte.
    Malformed(String),
    /// Nested past `limits.max_depth` (or past what any parser here accepts).
    TooDeep,
    /// A key appears twice in one object (compared after escapes are decoded); the key,
    /// cut short for the log.
    Duplicate(String),
}

/// A record found by the first pass.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// Byte span of the record's value.
    pub start: usize,
    pub end: usize,
    /// Normalized JSONPath of the record (`$.customers[3]`), for errors.
    pub path: String,
    /// Its path template for the decision record (`$.customers[*]`; with
    /// `Policy::exact_paths`, the path itself).
    pub template: String,
    pub subject: Option<String>,
    /// Where the record's consent object is, when its consent selector finds an object.
    pub consent_span: Option<(usize, usize)>,
    /// That object, parsed (by `Policy::plan_body`, and only for a recipient that has
    /// a consent purpose: no other decision looks at it).
    pub consent: Option<Value>,
    kind: Kind,
}

/// What the first pass learnt of a body.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// The records, in document order, at most `limits.max_records`.
    pub records: Vec<Record>,
    /// Set when there are more records than `limits.max_records`: how many were seen.
    pub too_many: Option<usize>,
    /// Some container nests deeper than `limits.max_depth`.
    pub too_deep: bool,
    /// For a body with no records: whether it is an empty batch rather than another
    /// shape (see [`Policy::plan_body`]).
    pub empty_batch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Scalar,
    Object { empty: bool },
    Array { empty: bool },
}

impl Kind {
    /// `null`, `[]` or `{}`.
    fn is_empty(self) -> bool {
        matches!(
            self,
            Kind::Null | Kind::Object { empty: true } | Kind::Array { empty: true }
        )
    }
}

/// A string as it is in the body: the bytes between its quotes.
#[derive(Debug, Clone, Copy)]
struct Raw {
    start: usize,
    end: usize,
    escaped: bool,
}

// ---------------------------------------------------------------------------------------
// Bytes

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let digits = b.get(at..at + 4)?;
    let mut v = 0u32;
    for &d in digits {
        v = v << 4 | u32::from(super::route::hex_digit(d)?);
    }
    Some(v)
}

/// The text of a string the first pass has checked (`raw` lies within `b`).
fn decode<'b>(b: &'b [u8], raw: Raw) -> Cow<'b, str> {
    let bytes = b.get(raw.start..raw.end).unwrap_or(&[]);
    if !raw.escaped {
        // Checked UTF-8 by the scan: borrowed, never replaced.
        return match std::str::from_utf8(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(bytes),
        };
    }
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c != b'\\' {
            // Copy the run up to the next escape as it is.
            let run_end = bytes[i..]
                .iter()
                .position(|&x| x == b'\\')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&String::from_utf8_lossy(&bytes[i..run_end]));
            i = run_end;
            continue;
        }
        let e = bytes.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        let ch = match e {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(bytes, i).unwrap_or(0xfffd);
                i += 4;
                if (0xD800..0xDC00).contains(&hi) {
                    let lo = hex4(bytes, i + 2).unwrap_or(0xDC00);
                    i += 6;
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                        .unwrap_or('\u{fffd}')
                } else {
                    char::from_u32(hi).unwrap_or('\u{fffd}')
                }
            }
            other => char::from(other),
        };
        out.push(ch);
    }
    Cow::Owned(out)
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut run = 0;
    let bytes = s.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Where the value starting at `i` of a checked body ends. Never reads past `b`; on bytes
/// that are not JSON it stops somewhere, and the caller's checks have refused those.
fn skip_value(b: &[u8], mut i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => skip_string(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            while let Some(&c) = b.get(i) {
                match c {
                    b'"' => {
                        i = skip_string(b, i);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            i
        }
        _ => {
            while let Some(&c) = b.get(i) {
                if is_ws(c) || matches!(c, b',' | b']' | b'}') {
                    break;
                }
                i += 1;
            }
            i
        }
    }
}

/// Past the closing quote of the string whose opening quote is at `i`.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => return i + 1,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    i
}

/// The number of elements of the array whose `[` is at `i` (for negative indexes).
fn count_elements(b: &[u8], mut i: usize) -> usize {
    i += 1;
    let mut n = 0;
    loop {
        while b.get(i).is_some_and(|&c| is_ws(c) || c == b',') {
            i += 1;
        }
        match b.get(i) {
            None | Some(b']') => return n,
            Some(_) => {
                n += 1;
                let next = skip_value(b, i);
                if next <= i {
                    return n;
                }
                i = next;
            }
        }
    }
}

/// Whether any step of `sel` selects by a negative index (which needs the array's length).
fn has_negative_index(sel: &Selector) -> bool {
    sel.steps.iter().any(|s| {
        s.atoms
            .iter()
            .any(|a| matches!(a, Atom::Index(i) if *i < 0))
    })
}

/// A cheap fingerprint of a key for the duplicate check: its length and its first and
/// last eight bytes. Equal fingerprints are compared in full, so a collision costs a
/// comparison, never a wrong answer.
fn fingerprint(bytes: &[u8]) -> u64 {
    let word = |b: &[u8]| b.iter().fold(0u64, |w, &x| w << 8 | u64::from(x));
    let n = bytes.len();
    let head = word(&bytes[..n.min(8)]);
    let tail = word(&bytes[n.saturating_sub(8)..]);
    head ^ tail.rotate_left(29) ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

// ---------------------------------------------------------------------------------------
// Pass 1: check and locate

/// Where a node is in the selectors the first pass follows.
#[derive(Default)]
struct At {
    /// Positions of the records selector (empty: no record can be below).
    rec: Vec<usize>,
    /// Inside a record: the position of the subject and consent selectors, if the node
    /// is on their path.
    sub: Option<usize>,
    con: Option<usize>,
    /// (prefix, position) of the records path's prefixes, for a `..` records path.
    pre: Vec<(usize, usize)>,
}

impl At {
    /// No selector the scan follows can select this node or anything below it.
    fn is_off(&self) -> bool {
        self.rec.is_empty() && self.sub.is_none() && self.con.is_none() && self.pre.is_empty()
    }
}

/// What a node tells its parent.
struct Node {
    kind: Kind,
    /// Span of the node the subject (consent) selector finds below or at this node.
    sub: Option<(usize, usize)>,
    con: Option<(usize, usize)>,
    /// On the records path: the records path finds only empty containers below.
    batch_empty: bool,
}

/// One key of an open object, for the duplicate check.
struct SeenKey {
    hash: u64,
    raw: Raw,
}

/// The singular-selector rule of a member name: the exact name wins; without it, the
/// one member whose name matches ignoring ASCII case (two such: neither).
#[derive(Default)]
struct Singular {
    exact: Option<Option<(usize, usize)>>,
    loose: usize,
    loose_found: Option<(usize, usize)>,
}

impl Singular {
    fn add(&mut self, exact: bool, found: Option<(usize, usize)>) {
        if exact {
            self.exact = Some(found);
        } else {
            self.loose += 1;
            if self.loose == 1 {
                self.loose_found = found;
            }
        }
    }

    fn result(self) -> Option<(usize, usize)> {
        match self.exact {
            Some(found) => found,
            None if self.loose == 1 => self.loose_found,
            None => None,
        }
    }
}

struct Scanner<'b, 'p> {
    b: &'b [u8],
    i: usize,
    binding: &'p CBinding,
    max_depth: usize,
    max_records: usize,
    /// Some selector of the binding uses a negative index: arrays are counted first.
    count_arrays: bool,
    /// Record paths are written with their indexes (`Policy::exact_paths`).
    exact_paths: bool,
    /// Whether the records path has a `..` step (then its prefixes decide an empty batch).
    descendant: bool,
    out: Scanned,
    seen: usize,
    keys: Vec<SeenKey>,
    /// The path from the root to the current node, for the records' paths.
    path: Vec<PathEdge>,
    /// Per prefix of the records path: nodes found (not descending into one), and
    /// whether all of them are empty.
    prefix_found: Vec<(usize, bool)>,
    /// Scratch for decoded keys.
    scratch: String,
}

#[derive(Clone, Copy)]
enum PathEdge {
    Key(Raw),
    Index(usize),
}

/// Checks `body` and finds the records of `binding` in it.
pub(crate) fn scan(
    body: &[u8],
    binding: &CBinding,
    max_depth: usize,
    max_records: usize,
    exact_paths: bool,
) -> Result<Scanned, ScanError> {
    let count_arrays = has_negative_index(&binding.records)
        || binding.subject.as_ref().is_some_and(has_negative_index)
        || binding.consent.as_ref().is_some_and(has_negative_index)
        || binding.records_prefixes.iter().any(has_negative_index);
    let descendant = binding.records.steps.iter().any(|s| s.descendant);
    let mut s = Scanner {
        b: body,
        i: 0,
        binding,
        max_depth,
        max_records,
        count_arrays,
        exact_paths,
        descendant,
        out: Scanned::default(),
        seen: 0,
        keys: Vec::new(),
        path: Vec::new(),
        prefix_found: vec![(0, true); binding.records_prefixes.len()],
        scratch: String::new(),
    };
    let at = At {
        rec: vec![0],
        pre: if descendant {
            (0..binding.records_prefixes.len())
                .map(|k| (k, 0))
                .collect()
        } else {
            Vec::new()
        },
        ..At::default()
    };
    s.ws();
    let root = s.value(0, &at)?;
    s.ws();
    if s.i < body.len() {
        return Err(s.malformed("trailing characters after the JSON value"));
    }
    s.out.empty_batch = if s.descendant {
        // The first prefix found in the body decides (see `Policy::plan_body`).
        s.prefix_found
            .iter()
            .find(|(n, _)| *n > 0 && *n <= max_records)
            .is_none_or(|(_, all_empty)| *all_empty)
    } else {
        root.batch_empty
    };
    Ok(s.out)
}

impl<'b> Scanner<'b, '_> {
    fn malformed(&self, what: &str) -> ScanError {
        ScanError::Malformed(format!("{what} at byte {}", self.i))
    }

    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|&c| is_ws(c)) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize, at: &At) -> Result<Node, ScanError> {
        if at.is_off() {
            // Off every selector's path (most of a record): only checked.
            let kind = self.plain(depth)?;
            return Ok(self.leaf(kind));
        }
        let start = self.i;
        let binding = self.binding;
        let is_record = at.rec.iter().any(|&p| binding.records.is_complete(p));
        // A prefix node is found, and not looked below for that prefix.
        let pre_here: Vec<usize> = at
            .pre
            .iter()
            .filter(|(k, p)| binding.records_prefixes[*k].is_complete(*p))
            .map(|(k, _)| *k)
            .collect();
        let record_at = if is_record {
            Some(At {
                rec: Vec::new(),
                sub: binding.subject.as_ref().map(|_| 0),
                con: binding.consent.as_ref().map(|_| 0),
                pre: Vec::new(),
            })
        } else {
            None
        };
        let here = record_at.as_ref().unwrap_or(at);
        let mut node = match self.b.get(self.i) {
            Some(b'{') => self.object(depth, here, &pre_here)?,
            Some(b'[') => self.array(depth, here, &pre_here)?,
            Some(b'"') => {
                self.string()?;
                self.leaf(Kind::Scalar)
            }
            Some(b't') => self.literal(b"true", Kind::Scalar)?,
            Some(b'f') => self.literal(b"false", Kind::Scalar)?,
            Some(b'n') => self.literal(b"null", Kind::Null)?,
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                self.leaf(Kind::Scalar)
            }
            Some(_) => return Err(self.malformed("expected a JSON value")),
            None => return Err(self.malformed("the body ends where a value was expected")),
        };
        let end = self.i;
        for k in pre_here {
            let (n, all_empty) = &mut self.prefix_found[k];
            *n += 1;
            *all_empty &= node.kind.is_empty();
        }
        // The node a singular selector ends at.
        let target = |sel: &Option<Selector>, pos: Option<usize>| {
            sel.as_ref()
                .is_some_and(|s| pos == Some(s.steps.len()))
                .then_some((start, end))
        };
        if let Some(span) = target(&binding.subject, here.sub) {
            node.sub = Some(span);
        }
        if let Some(span) = target(&binding.consent, here.con) {
            node.con = Some(span);
        }
        if is_record {
            self.found_record(start, end, &node);
            node.batch_empty = true;
        }
        Ok(node)
    }

    /// Checks the value at `self.i` and says what kind it is; follows no selector.
    fn plain(&mut self, depth: usize) -> Result<Kind, ScanError> {
        match self.b.get(self.i) {
            Some(b'{') => {
                let n = self.members(depth, |s, _| s.plain(depth + 1).map(drop))?;
                Ok(Kind::Object { empty: n == 0 })
            }
            Some(b'[') => {
                let n = self.elements(depth, |s, _| s.plain(depth + 1).map(drop))?;
                Ok(Kind::Array { empty: n == 0 })
            }
            Some(b'"') => self.string().map(|_| Kind::Scalar),
            Some(b't') => self.literal(b"true", Kind::Scalar).map(|n| n.kind),
            Some(b'f') => self.literal(b"false", Kind::Scalar).map(|n| n.kind),
            Some(b'n') => self.literal(b"null", Kind::Null).map(|n| n.kind),
            Some(b'-' | b'0'..=b'9') => self.number().map(|()| Kind::Scalar),
            Some(_) => Err(self.malformed("expected a JSON value")),
            None => Err(self.malformed("the body ends where a value was expected")),
        }
    }

    /// Reads the object at `self.i` (its `{`): checks the punctuation and that no key
    /// repeats, and hands each key to `member`, which must read the value that follows.
    /// Returns the number of members.
    fn members(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Raw) -> Result<(), ScanError>,
    ) -> Result<usize, ScanError> {
        self.open(depth)?;
        let keys_from = self.keys.len();
        let mut n = 0usize;
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                if self.b.get(self.i) != Some(&b'"') {
                    return Err(self.malformed("expected a string as an object key"));
                }
                let raw = self.string()?;
                self.check_duplicate(keys_from, raw)?;
                self.ws();
                if self.b.get(self.i) != Some(&b':') {
                    return Err(self.malformed("expected `:` after an object key"));
                }
                self.i += 1;
                self.ws();
                n += 1;
                member(self, raw)?;
                self.ws();
                match self.b.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        break;
                    }
                    _ => return Err(self.malformed("expected `,` or `}` in an object")),
                }
            }
        }
        self.keys.truncate(keys_from);
        Ok(n)
    }

    /// Reads the array at `self.i` (its `[`): checks the punctuation and hands each
    /// element's index to `element`, which must read it. Returns the number of elements.
    fn elements(
        &mut self,
        depth: usize,
        mut element: impl FnMut(&mut Self, usize) -> Result<(), ScanError>,
    ) -> Result<usize, ScanError> {
        self.open(depth)?;
        let mut n = 0usize;
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                element(self, n)?;
                n += 1;
                self.ws();
                match self.b.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        break;
                    }
                    _ => return Err(self.malformed("expected `,` or `]` in an array")),
                }
            }
        }
        Ok(n)
    }

    fn leaf(&self, kind: Kind) -> Node {
        Node {
            kind,
            sub: None,
            con: None,
            batch_empty: kind == Kind::Null,
        }
    }

    fn found_record(&mut self, start: usize, end: usize, node: &Node) {
        self.seen += 1;
        if self.out.too_many.is_some() {
            return;
        }
        if self.seen > self.max_records {
            self.out.too_many = Some(self.seen);
            self.out.records.clear();
            return;
        }
        let b = self.b;
        let subject = node.sub.and_then(|(s, e)| subject_text(&b[s..e]));
        // An object only: anything else answers no consent key.
        let consent_span = node.con.filter(|&(s, _)| b.get(s) == Some(&b'{'));
        let mut path = String::from("$");
        let mut template = String::from("$");
        for edge in &self.path {
            match *edge {
                PathEdge::Key(raw) => {
                    let key = decode(b, raw);
                    push_edge(&mut path, Edge::Key(&key));
                    push_edge(&mut template, Edge::Key(&key));
                }
                PathEdge::Index(i) => {
                    push_edge(&mut path, Edge::Index(i, 0));
                    push_index(&mut template, i, self.exact_paths);
                }
            }
        }
        self.out.records.push(Record {
            start,
            end,
            path,
            template,
            subject,
            consent_span,
            consent: None,
            kind: node.kind,
        });
    }

    fn open(&mut self, depth: usize) -> Result<(), ScanError> {
        if depth >= NESTING_LIMIT {
            return Err(ScanError::TooDeep);
        }
        if depth >= self.max_depth {
            self.out.too_deep = true;
        }
        self.i += 1;
        Ok(())
    }

    /// The selector positions of a child reached by `edge`.
    fn child_at(&self, at: &At, edge: Edge<'_>, key: Option<&str>, pre_here: &[usize]) -> At {
        let b = self.binding;
        let mut rec = Vec::new();
        for &p in &at.rec {
            b.records.advance(p, edge, &mut |q| {
                if !rec.contains(&q) {
                    rec.push(q)
                }
            });
        }
        let mut pre = Vec::new();
        for &(k, p) in &at.pre {
            if pre_here.contains(&k) {
                continue;
            }
            b.records_prefixes[k].advance(p, edge, &mut |q| {
                if !pre.contains(&(k, q)) {
                    pre.push((k, q))
                }
            });
        }
        At {
            rec,
            sub: singular_step(b.subject.as_ref(), at.sub, edge, key),
            con: singular_step(b.consent.as_ref(), at.con, edge, key),
            pre,
        }
    }

    fn object(&mut self, depth: usize, at: &At, pre_here: &[usize]) -> Result<Node, ScanError> {
        let on_records_path = !at.rec.is_empty();
        let (mut sub, mut con) = (Singular::default(), Singular::default());
        let (mut selected, mut all_empty) = (0usize, true);
        let members = self.members(depth, |s, raw| {
            let b = s.b;
            let key = decode(b, raw);
            let child_at = s.child_at(at, Edge::Key(&key), Some(&key), pre_here);
            let exact = |sel: &Option<Selector>, pos: Option<usize>| {
                matches!(singular_atom(sel.as_ref(), pos), Some(Atom::Name(n)) if *n == *key)
            };
            let sub_exact = exact(&s.binding.subject, at.sub);
            let con_exact = exact(&s.binding.consent, at.con);
            let (has_sub, has_con) = (child_at.sub.is_some(), child_at.con.is_some());
            let child_on_path = !child_at.rec.is_empty();
            s.path.push(PathEdge::Key(raw));
            let child = s.value(depth + 1, &child_at)?;
            s.path.pop();
            if has_sub {
                sub.add(sub_exact, child.sub);
            }
            if has_con {
                con.add(con_exact, child.con);
            }
            if child_on_path {
                selected += 1;
                all_empty &= child.batch_empty;
            }
            Ok(())
        })?;
        Ok(Node {
            kind: Kind::Object {
                empty: members == 0,
            },
            sub: sub.result(),
            con: con.result(),
            batch_empty: on_records_path && (members == 0 || (selected > 0 && all_empty)),
        })
    }

    fn array(&mut self, depth: usize, at: &At, pre_here: &[usize]) -> Result<Node, ScanError> {
        let len = if self.count_arrays {
            count_elements(self.b, self.i)
        } else {
            0
        };
        let on_records_path = !at.rec.is_empty();
        let (mut sub, mut con) = (None, None);
        let (mut selected, mut all_empty) = (0usize, true);
        let n = self.elements(depth, |s, i| {
            let child_at = s.child_at(at, Edge::Index(i, len), None, pre_here);
            let (has_sub, has_con) = (child_at.sub.is_some(), child_at.con.is_some());
            let child_on_path = !child_at.rec.is_empty();
            s.path.push(PathEdge::Index(i));
            let child = s.value(depth + 1, &child_at)?;
            s.path.pop();
            if has_sub {
                sub = child.sub;
            }
            if has_con {
                con = child.con;
            }
            if child_on_path {
                selected += 1;
                all_empty &= child.batch_empty;
            }
            Ok(())
        })?;
        Ok(Node {
            kind: Kind::Array { empty: n == 0 },
            sub,
            con,
            batch_empty: on_records_path && (n == 0 || (selected > 0 && all_empty)),
        })
    }

    fn check_duplicate(&mut self, from: usize, raw: Raw) -> Result<(), ScanError> {
        let b = self.b;
        let hash = if raw.escaped {
            self.scratch.clear();
            self.scratch.push_str(&decode(b, raw));
            fingerprint(self.scratch.as_bytes())
        } else {
            fingerprint(&b[raw.start..raw.end])
        };
        for k in &self.keys[from..] {
            if k.hash == hash && decode(b, k.raw) == decode(b, raw) {
                return Err(ScanError::Duplicate(
                    decode(b, raw).chars().take(40).collect(),
                ));
            }
        }
        self.keys.push(SeenKey { hash, raw });
        Ok(())
    }

    fn literal(&mut self, word: &[u8], kind: Kind) -> Result<Node, ScanError> {
        if self.b.get(self.i..self.i + word.len()) != Some(word) {
            return Err(self.malformed("expected a JSON value"));
        }
        self.i += word.len();
        Ok(self.leaf(kind))
    }

    /// A string, its opening quote at `self.i`; leaves `self.i` past the closing one.
    fn string(&mut self) -> Result<Raw, ScanError> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        let mut non_ascii = false;
        loop {
            let Some(&c) = b.get(i) else {
                self.i = i;
                return Err(self.malformed("a string is not closed"));
            };
            match c {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    match b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => {
                            let bad = |s: &mut Self, at: usize, what: &str| {
                                s.i = at;
                                Err(s.malformed(what))
                            };
                            let Some(hi) = hex4(b, i + 2) else {
                                return bad(self, i, "an invalid \\u escape");
                            };
                            if (0xDC00..0xE000).contains(&hi) {
                                return bad(self, i, "a lone surrogate in a \\u escape");
                            }
                            if (0xD800..0xDC00).contains(&hi) {
                                let pair = b.get(i + 6) == Some(&b'\\')
                                    && b.get(i + 7) == Some(&b'u')
                                    && hex4(b, i + 8)
                                        .is_some_and(|lo| (0xDC00..0xE000).contains(&lo));
                                if !pair {
                                    return bad(self, i, "a lone surrogate in a \\u escape");
                                }
                                i += 6;
                            }
                            i += 6;
                        }
                        _ => {
                            self.i = i;
                            return Err(self.malformed("an invalid escape in a string"));
                        }
                    }
                }
                0..=0x1f => {
                    self.i = i;
                    return Err(self.malformed("a control character in a string"));
                }
                0x80.. => {
                    non_ascii = true;
                    i += 1;
                }
                _ => i += 1,
            }
        }
        if non_ascii && std::str::from_utf8(&b[start..i]).is_err() {
            self.i = start;
            return Err(self.malformed("a string that is not valid UTF-8"));
        }
        self.i = i + 1;
        Ok(Raw {
            start,
            end: i,
            escaped,
        })
    }

    fn number(&mut self) -> Result<(), ScanError> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > from
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => {
                self.i = i;
                return Err(self.malformed("an invalid number"));
            }
        }
        let mut plain = true;
        if b.get(i) == Some(&b'.') {
            i += 1;
            plain = false;
            if !digits(&mut i) {
                self.i = i;
                return Err(self.malformed("an invalid number"));
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            plain = false;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digits(&mut i) {
                self.i = i;
                return Err(self.malformed("an invalid number"));
            }
        }
        // Only a number that nears f64's range can overflow: below 10^(digits before the
        // point + exponent), so parse just those whose bound reaches 10^300 (an underflow
        // is 0, which serde_json accepts too).
        let text = &b[start..i];
        let int_digits = text
            .iter()
            .take_while(|c| !matches!(c, b'.' | b'e' | b'E'))
            .filter(|c| c.is_ascii_digit())
            .count() as i64;
        let exponent = match text.iter().position(|&c| c == b'e' || c == b'E') {
            None => 0,
            Some(e) => {
                let digits = &text[e + 1..];
                let (neg, digits) = match digits.first() {
                    Some(b'-') => (true, &digits[1..]),
                    Some(b'+') => (false, &digits[1..]),
                    _ => (false, digits),
                };
                // More than six digits: treat as huge and let the parse decide.
                let v = if digits.len() > 6 {
                    i64::MAX / 2
                } else {
                    digits
                        .iter()
                        .fold(0i64, |v, d| v * 10 + i64::from(d - b'0'))
                };
                if neg {
                    -v
                } else {
                    v
                }
            }
        };
        if !plain && int_digits + exponent >= 300 || plain && int_digits >= 300 {
            let text = std::str::from_utf8(&b[start..i]).unwrap_or("x");
            if !text.parse::<f64>().is_ok_and(f64::is_finite) {
                self.i = start;
                return Err(self.malformed("a number out of range"));
            }
        }
        self.i = i;
        Ok(())
    }
}

/// The atom a singular selector expects at `pos` (singular selectors have one per step).
fn singular_atom(sel: Option<&Selector>, pos: Option<usize>) -> Option<&Atom> {
    sel?.steps.get(pos?)?.atoms.first()
}

/// The position of a singular selector at a child: one further if the edge is the one it
/// names (a name in any ASCII case, for [`Singular`] to choose among; an index counted
/// from either end), else off its path.
fn singular_step(
    sel: Option<&Selector>,
    pos: Option<usize>,
    edge: Edge<'_>,
    key: Option<&str>,
) -> Option<usize> {
    let next = pos? + 1;
    match (singular_atom(sel, pos)?, edge) {
        (Atom::Name(n), Edge::Key(_)) => key.filter(|k| n.eq_ignore_ascii_case(k)).map(|_| next),
        (Atom::Index(_), Edge::Index(..)) => singular_atom(sel, pos)?.matches(edge).then_some(next),
        _ => None,
    }
}

/// A record's subject id from its JSON: a non-empty string, or a number as serde_json
/// writes it.
fn subject_text(json: &[u8]) -> Option<String> {
    match json.first()? {
        b'"' => {
            let raw = Raw {
                start: 1,
                end: json.len().checked_sub(1)?,
                escaped: json.contains(&b'\\'),
            };
            let s = decode(json, raw);
            (!s.is_empty()).then(|| s.into_owned())
        }
        b'-' | b'0'..=b'9' => serde_json::from_slice::<serde_json::Number>(json)
            .ok()
            .map(|n| n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Pass 2: decide and rewrite

/// The output, built only when something changes: what is not edited is copied from the
/// body as it is.
struct Writer<'b> {
    b: &'b [u8],
    out: Vec<u8>,
    copied: usize,
    edited: bool,
    /// A `block` fired: the message will not be sent, so nothing more is written.
    stopped: bool,
}

impl Writer<'_> {
    /// Replaces `b[start..end]` by `with`. Edits come in order and never overlap.
    fn edit(&mut self, start: usize, end: usize, with: &[u8]) {
        if self.stopped {
            return;
        }
        if !self.edited {
            self.out.reserve(self.b.len());
            self.edited = true;
        }
        debug_assert!(start >= self.copied, "edits out of order");
        let start = start.max(self.copied);
        let end = end.max(start);
        self.out
            .extend_from_slice(self.b.get(self.copied..start).unwrap_or(&[]));
        self.out.extend_from_slice(with);
        self.copied = end;
    }

    fn finish(mut self) -> Option<Vec<u8>> {
        if !self.edited || self.stopped {
            return None;
        }
        self.out
            .extend_from_slice(self.b.get(self.copied..).unwrap_or(&[]));
        Some(self.out)
    }
}

/// Removing members of one container, commas included, as the walk decides them. Edits
/// must come in order, and a kept member may have edits inside it: so what is removed
/// before the first kept member is cut at the start of each next member, before the walk
/// looks into it.
#[derive(Default)]
struct Removals {
    /// A member was kept; `tail` is where the kept content ends so far.
    kept_any: bool,
    tail: usize,
    /// No member kept yet: the last member was removed and ran from here to `drop_end`.
    drop_from: Option<usize>,
    drop_end: usize,
}

impl Removals {
    /// The walk is about to look into the member starting at `start`.
    fn next(&mut self, w: &mut Writer<'_>, start: usize) {
        if let Some(from) = self.drop_from.take() {
            // The removed members before it, with their commas.
            w.edit(from, start, b"");
        }
    }

    /// The member `b[start..end]` (key and value, or element) is kept or removed.
    fn member(&mut self, w: &mut Writer<'_>, start: usize, end: usize, keep: bool) {
        if keep {
            self.kept_any = true;
            self.tail = end;
        } else if self.kept_any {
            // `, member` after the last kept one.
            w.edit(self.tail, end, b"");
            self.tail = end;
        } else {
            self.drop_from = Some(start);
            self.drop_end = end;
        }
    }

    fn close(&mut self, w: &mut Writer<'_>) {
        if let Some(from) = self.drop_from.take() {
            w.edit(from, self.drop_end, b"");
        }
    }
}

/// Decides and rewrites the records of a scanned body. Returns the new body when some
/// value changed.
pub(crate) fn rewrite<'a>(
    policy: &'a Policy,
    binding: &'a CBinding,
    body: &[u8],
    records: &'a [Record],
    mut judge_for: impl FnMut(&'a Record) -> Judge<'a>,
    report: &mut Report,
) -> Option<Vec<u8>> {
    let mut w = Writer {
        b: body,
        out: Vec::new(),
        copied: 0,
        edited: false,
        stopped: false,
    };
    let count_arrays = binding
        .fields
        .iter()
        .any(|f| has_negative_index(&f.selector));
    let initial = binding.matcher.start();
    for rec in records {
        let mut walk = Walk {
            b: body,
            i: rec.start,
            judge: judge_for(rec),
            policy,
            binding,
            report: &mut *report,
            w: &mut w,
            count_arrays,
        };
        walk.report.records += 1;
        let mut path = rec.template.clone();
        let keep = walk.visit(&initial, false, &mut path);
        if !keep {
            // The record itself was removed: it stays in place as `null`, so the
            // positions of the other records do not shift.
            w.edit(rec.start, rec.end, b"null");
        }
    }
    w.finish()
}

struct Walk<'a, 'b, 'w, 'r> {
    b: &'b [u8],
    i: usize,
    judge: Judge<'a>,
    policy: &'a Policy,
    binding: &'a CBinding,
    report: &'r mut Report,
    w: &'w mut Writer<'b>,
    count_arrays: bool,
}

impl Walk<'_, '_, '_, '_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|&c| is_ws(c)) {
            self.i += 1;
        }
    }

    fn skip(&mut self) {
        self.i = skip_value(self.b, self.i);
    }

    /// Decides the node at `self.i` and what is below it, as the tree walk does (see
    /// `tree::RecordWalk::visit`, the oracle); leaves `self.i` past the node. Returns
    /// false when the node must be removed from its parent.
    fn visit(&mut self, state: &Cursor, mut covered: bool, path: &mut String) -> bool {
        let policy = self.policy;
        let matcher = &self.binding.matcher;
        let complete = matcher.complete(state);
        if !complete.is_empty() {
            let worst = self
                .judge
                .decide_node(self.binding, complete, path, self.report);
            if worst == Some(&Action::Block) {
                // The message will not be sent: nothing more need be written.
                self.w.stopped = true;
            }
            if let Some(action) = worst {
                return self.apply(action);
            }
            covered = true;
        }
        let undeclared_strip = policy.undeclared == Undeclared::Strip && !covered;
        let first = self.b.get(self.i).copied();
        let is_container = matches!(first, Some(b'{' | b'['));
        if undeclared_strip && (state.is_dead() || !is_container) {
            let key = FieldKey {
                category: UNDECLARED,
                action: "strip",
                reason: Some(Reason::Undeclared),
                purpose: None,
                evidence: None,
            };
            self.report.record(key, path, self.judge.subject);
            self.skip();
            return false;
        }
        if state.is_dead() {
            self.skip();
            return true;
        }
        match first {
            Some(b'{') => {
                self.i += 1;
                let mut removals = Removals::default();
                loop {
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => {
                            self.i += 1;
                            continue;
                        }
                        Some(b'"') => {}
                        _ => {
                            self.i += 1;
                            break;
                        }
                    }
                    let member = self.i;
                    removals.next(self.w, member);
                    let key_end = skip_string(self.b, self.i);
                    let raw = Raw {
                        start: member + 1,
                        end: key_end.saturating_sub(1),
                        escaped: self.b[member + 1..key_end.saturating_sub(1).max(member + 1)]
                            .contains(&b'\\'),
                    };
                    self.i = key_end;
                    self.ws();
                    self.i += 1; // `:`
                    self.ws();
                    let key = decode(self.b, raw);
                    let next = matcher.step(state, Edge::Key(&key));
                    let keep = if next.is_dead() && !undeclared_strip {
                        self.skip();
                        true
                    } else {
                        let len = path.len();
                        push_edge(path, Edge::Key(&key));
                        let keep = self.visit(&next, covered, path);
                        path.truncate(len);
                        keep
                    };
                    removals.member(self.w, member, self.i, keep);
                }
                removals.close(self.w);
            }
            Some(b'[') => {
                let len = if self.count_arrays {
                    count_elements(self.b, self.i)
                } else {
                    0
                };
                self.i += 1;
                let mut removals = Removals::default();
                let mut n = 0;
                loop {
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => {
                            self.i += 1;
                            continue;
                        }
                        Some(b']') | None => {
                            self.i += 1;
                            break;
                        }
                        Some(_) => {}
                    }
                    let element = self.i;
                    removals.next(self.w, element);
                    let next = matcher.step(state, Edge::Index(n, len));
                    let keep = if next.is_dead() && !undeclared_strip {
                        self.skip();
                        true
                    } else {
                        let at = path.len();
                        push_index(path, n, self.policy.exact_paths);
                        let keep = self.visit(&next, covered, path);
                        path.truncate(at);
                        keep
                    };
                    n += 1;
                    removals.member(self.w, element, self.i, keep);
                }
                removals.close(self.w);
            }
            _ => self.skip(),
        }
        true
    }

    /// Applies a denied field's action to the node at `self.i`; leaves `self.i` past it.
    /// Returns false when the node must be removed.
    fn apply(&mut self, action: &Action) -> bool {
        let start = self.i;
        let end = skip_value(self.b, start);
        let is_null = self.b.get(start) == Some(&b'n');
        match action {
            Action::Strip => {
                self.i = end;
                return false;
            }
            Action::Block => {}
            // `null` holds no personal data: it stays as it is.
            _ if is_null => {}
            Action::Redact => {
                let mut s = Vec::with_capacity(self.policy.redact_marker.len() + 2);
                push_json_str(&mut s, &self.policy.redact_marker);
                self.w.edit(start, end, &s);
            }
            Action::Hash => {
                // A policy with a hash action does not compile without the key.
                let Some(key) = &self.policy.hash_key else {
                    self.i = end;
                    return false;
                };
                let text = value_text(self.b, start, end);
                let mut s = Vec::with_capacity(40);
                push_json_str(&mut s, &keyed_digest("h1:", key, text.as_bytes()));
                self.w.edit(start, end, &s);
            }
            Action::Mask(spec) => {
                self.mask(spec);
            }
        }
        self.i = end;
        true
    }

    /// Masks the value at `self.i`: a scalar becomes its masked text; in a container every
    /// scalar is masked on its own and keys, structure and `null`s stay.
    fn mask(&mut self, spec: &MaskSpec) {
        self.ws();
        let start = self.i;
        match self.b.get(start) {
            Some(b'{' | b'[') => {
                self.i += 1;
                loop {
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}' | b']') | None => {
                            self.i += 1;
                            return;
                        }
                        Some(_) => {
                            if self.b[start] == b'{' {
                                self.i = skip_string(self.b, self.i);
                                self.ws();
                                self.i += 1; // `:`
                                self.ws();
                            }
                            self.mask(spec);
                        }
                    }
                }
            }
            Some(b'n') => self.skip(),
            Some(_) => {
                let end = skip_value(self.b, start);
                let text = value_text(self.b, start, end);
                let mut s = Vec::with_capacity(text.len() + 2);
                push_json_str(&mut s, &mask_text(spec, &text));
                self.w.edit(start, end, &s);
                self.i = end;
            }
            None => {}
        }
    }
}

/// The text a value is hashed or masked as (see `actions::value_text`): a string's own
/// text; a number or container as serde_json writes it compactly, which needs that value
/// parsed.
fn value_text<'b>(b: &'b [u8], start: usize, end: usize) -> Cow<'b, str> {
    let json = b.get(start..end).unwrap_or(&[]);
    match json.first() {
        Some(b'"') => decode(
            b,
            Raw {
                start: start + 1,
                end: end.saturating_sub(1).max(start + 1),
                escaped: json.contains(&b'\\'),
            },
        ),
        Some(b't' | b'f') => String::from_utf8_lossy(json),
        _ => Cow::Owned(
            serde_json::from_slice::<Value>(json)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| String::from_utf8_lossy(json).into_owned()),
        ),
    }
}

impl Record {
    /// Whether a binding can judge this record: an object or `null`, or an array that is
    /// empty or judged by selectors that do not start with a name.
    pub(crate) fn shape_ok(&self, records_are_objects: bool) -> bool {
        match self.kind {
            Kind::Null | Kind::Object { .. } => true,
            Kind::Array { empty } => empty || !records_are_objects,
            Kind::Scalar => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_err(text: &str) -> ScanError {
        let p = crate::engine::tests::policy();
        match scan(text.as_bytes(), &p.bindings[0], 64, 100, false) {
            Err(e) => e,
            Ok(_) => panic!("{text:?} was read"),
        }
    }

    #[test]
    fn refuses_what_a_strict_parser_refuses() {
        for bad in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "[01]",
            "[1.]",
            "[.5]",
            "[-]",
            "[1e]",
            "[+1]",
            "\u{feff}{}",
            "{} {}",
            "{\"a\" 1}",
            "[\"\\x\"]",
            "[\"\\ud800\"]",
            "[\"\\udc00\"]",
            "[\"\\ud800\\u0041\"]",
            "[\"a\u{1}\"]",
            "[1e400]",
            "[tru]",
            "nul",
            "[\"abc]",
        ] {
            assert!(
                matches!(scan_err(bad), ScanError::Malformed(_)),
                "{bad:?}: {:?}",
                scan_err(bad)
            );
        }
        assert_eq!(
            scan_err(r#"{"a":1,"\u0061":2}"#),
            ScanError::Duplicate("a".into())
        );
        assert!(matches!(
            scan_err(&format!("{}{}", "[".repeat(130), "]".repeat(130))),
            ScanError::TooDeep
        ));
    }

    #[test]
    fn numbers_are_refused_exactly_where_serde_json_refuses_them() {
        let p = crate::engine::tests::policy();
        let long = "9".repeat(400);
        for n in [
            "1e308",
            "9e308",
            "1.7976931348623157e308",
            "1.8e308",
            "1e-400",
            "0e400",
            "-1e309",
            "1E+308",
            "1e+309",
            "123456789e300",
            "0.000001e310",
            &long,
            "1e-99999999999",
            "1e99999999999",
            "-0",
            "0.5e-5",
        ] {
            let doc = format!("[{n}]");
            let serde_ok = serde_json::from_str::<Value>(&doc).is_ok();
            let ours = scan(doc.as_bytes(), &p.bindings[0], 64, 10, false).is_ok();
            assert_eq!(ours, serde_ok, "{n}");
        }
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let p = crate::engine::tests::policy();
        assert!(matches!(
            scan(b"[\"\xff\"]", &p.bindings[0], 64, 10, false),
            Err(ScanError::Malformed(_))
        ));
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_does() {
        for s in ["plain", "q\"b\\", "\n\r\t\u{8}\u{c}\u{1}\u{1f}", "ünï/"] {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn escaped_strings_decode() {
        let text = br#""a\u00e9\ud83d\ude00\n\/\"""#;
        let raw = Raw {
            start: 1,
            end: text.len() - 1,
            escaped: true,
        };
        let want: String = serde_json::from_slice(text).unwrap();
        assert_eq!(decode(text, raw), want);
    }
}
