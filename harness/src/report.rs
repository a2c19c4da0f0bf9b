//! `consentry report`: summarises decision logs for security reviewers.
//!
//! Reads the decision entries the filter wrote, in any of the forms they reach a log
//! pipeline:
//!
//! - Envoy's log: lines holding `consentry.decision {json}`;
//! - Envoy's access log in the JSON-lines format of `envoy/bootstrap.template.yaml`: the
//!   key `consentry_decision` holds a JSON array (as a string) of the exchange's entries,
//!   or `-` / nothing when the policy did not touch it;
//! - plain JSON lines, one entry per line (or a JSON value holding entries, such as
//!   `consentry replay --format json` output, or a log shipper's wrapper around an Envoy
//!   log line).
//!
//! and groups the blocked, modified and uninspectable flows (and, on request, the allowed
//! ones) by caller → recipient → category. Entries are decision records v2
//! ([`crate::record`]); an entry of another version (a v1 line, without `"v": 2`) fails
//! the read with the file and line, rather than being read wrong or skipped. Entries hold
//! subjects only as keyed pseudonyms; the report counts distinct subjects and never shows
//! the pseudonyms.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anstyle::{AnsiColor, Style};
use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Map, Value};

/// What precedes an entry in Envoy's log (the filter's `LOG_PREFIX`, without its space).
const MARKER: &str = consentry::engine::LOG_PREFIX.trim_ascii_end();
/// The access log key holding the exchange's entries.
const ACCESS_LOG_KEY: &str = "consentry_decision";
/// Warnings listed per input; the rest are counted.
const MAX_WARNINGS: usize = 50;
/// How deep into a JSON value entries are looked for.
const MAX_DEPTH: usize = 8;
/// Longest caller, recipient or other name shown in the text report.
const MAX_TEXT: usize = 120;
/// Uninspectable reasons listed per flow in the text report.
const MAX_DETAILS: usize = 10;

const UNKNOWN: &str = "(unknown)";

/// What the report covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportOptions {
    /// Also list allowed flows, with the legal basis that let each category through.
    pub include_allowed: bool,
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// Reads the decision entries of one log file (`-` for standard input). Returns the
/// entries and warnings about lines that were skipped (`line 12: ...`). Fails when the
/// input cannot be read (or is compressed), and at the first entry of a decision-record
/// version this consentry does not read (`FILE:LINE: unsupported decision-record version
/// (v1 line LINE of FILE; this consentry reads v2)`); other bad lines never fail the
/// read.
pub fn read_entries(path: &Path) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    if path.as_os_str() == "-" {
        let stdin = std::io::stdin();
        match read_named(stdin.lock(), "standard input") {
            Err(ReadError::Io(e)) => {
                Err(e).context("cannot read decision logs from standard input")
            }
            other => other.map_err(|e| anyhow::anyhow!("{e}")),
        }
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open decision log {}", path.display()))?;
        let name = path.display().to_string();
        match read_named(BufReader::new(file), &name) {
            Err(ReadError::Io(e)) => {
                Err(e).with_context(|| format!("cannot read decision log {name}"))
            }
            other => other.map_err(|e| anyhow::anyhow!("{e}")),
        }
    }
}

/// Why an input could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The input could not be read, or is compressed.
    Io(anyhow::Error),
    /// An entry of a decision-record version this consentry does not read, with where.
    Version(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e:#}"),
            ReadError::Version(m) => f.write_str(m),
        }
    }
}

/// [`read_entries`] on any reader (named `input` in errors).
pub fn read_from<R: BufRead>(reader: R) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    read_named(reader, "input").map_err(|e| match e {
        ReadError::Io(e) => e,
        ReadError::Version(m) => anyhow::anyhow!(m),
    })
}

/// [`read_entries`] on any reader; `name` is the input's name in errors.
pub fn read_named<R: BufRead>(
    reader: R,
    name: &str,
) -> Result<(Vec<Value>, Vec<String>), ReadError> {
    let (entries, warnings, bad) = read_lines(reader).map_err(ReadError::Io)?;
    if let Some((line, entry)) = bad {
        let place = match line {
            Some(l) => format!("line {l} of {name}"),
            None => format!("entry {entry} of {name}"),
        };
        let msg = crate::record::unsupported(
            entries[entry - 1].as_object().unwrap_or(&Map::new()),
            &place,
        );
        return Err(ReadError::Version(match line {
            Some(l) => format!("{name}:{l}: {msg}"),
            None => format!("{name}: {msg}"),
        }));
    }
    Ok((entries, warnings))
}

/// The first entry of another version: (line, if known; 1-based entry number).
type BadVersion = Option<(Option<usize>, usize)>;

fn first_unsupported(entries: &[Value], from: usize) -> Option<usize> {
    entries[from..]
        .iter()
        .position(|e| {
            e.as_object()
                .is_some_and(|o| !crate::record::is_supported(o))
        })
        .map(|i| from + i + 1)
}

#[allow(clippy::type_complexity)]
fn read_lines<R: BufRead>(mut reader: R) -> anyhow::Result<(Vec<Value>, Vec<String>, BadVersion)> {
    let mut all = Vec::new();
    reader.read_to_end(&mut all)?;
    // One pretty-printed JSON document (`consentry replay --format json`): its first
    // line alone is not JSON, the whole is.
    let text = String::from_utf8_lossy(&all);
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    let first_line = trimmed.lines().next().unwrap_or("");
    if trimmed.starts_with(['{', '[']) && serde_json::from_str::<Value>(first_line).is_err() {
        if let Ok(doc) = serde_json::from_str::<Value>(trimmed) {
            let mut entries = Vec::new();
            let mut problems = Vec::new();
            let n = collect(&doc, 0, &mut entries, &mut problems);
            if n == 0 {
                problems.push("the JSON document holds no decision entries".into());
            }
            let bad = first_unsupported(&entries, 0).map(|i| (None, i));
            return Ok((entries, problems, bad));
        }
    }
    let mut reader = std::io::Cursor::new(all);
    let mut state = Reader::default();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        if line_no == 1 && buf.starts_with(&[0x1f, 0x8b]) {
            anyhow::bail!(
                "the input is gzip-compressed; decompress it first (e.g. `zcat FILE | consentry report -`)"
            );
        }
        let text = String::from_utf8_lossy(&buf);
        let mut line = text.trim();
        if line_no == 1 {
            line = line.trim_start_matches('\u{feff}');
        }
        let before = state.entries.len();
        state.line(line_no, line);
        if state.bad.is_none() {
            state.bad = first_unsupported(&state.entries, before).map(|i| (Some(line_no), i));
        }
    }
    let bad = state.bad;
    let (entries, warnings) = state.finish();
    Ok((entries, warnings, bad))
}

#[derive(Default)]
struct Reader {
    entries: Vec<Value>,
    warnings: Vec<String>,
    suppressed: usize,
    /// Lines that held no entry and were not worth a warning (Envoy's other log lines).
    ignored: usize,
    /// The first entry of a version this consentry does not read.
    bad: BadVersion,
}

impl Reader {
    fn warn(&mut self, line: usize, msg: &str) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(format!("line {line}: {msg}"));
        } else {
            self.suppressed += 1;
        }
    }

    fn line(&mut self, n: usize, line: &str) {
        if line.is_empty() {
            return;
        }
        if line.starts_with('{') || line.starts_with('[') {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => {
                    let mut problems = Vec::new();
                    let found = collect(&v, 0, &mut self.entries, &mut problems);
                    if found == 0 && problems.is_empty() {
                        self.ignored += 1;
                    }
                    for p in problems {
                        self.warn(n, &p);
                    }
                    return;
                }
                // A line of JSON that does not parse, and is not an Envoy log line
                // (those start with `[` too, and are handled below).
                Err(e) if line.starts_with('{') && !line.contains(MARKER) => {
                    self.warn(n, &format!("not valid JSON ({e}), skipped"));
                    return;
                }
                Err(_) => {}
            }
        }
        match after_marker(line) {
            Some(rest) => {
                let mut problems = Vec::new();
                let found = parse_after_marker(rest, 0, &mut self.entries, &mut problems);
                if found == 0 && problems.is_empty() {
                    problems.push(format!(
                        "the JSON after {MARKER} is not a decision entry, skipped"
                    ));
                }
                for p in problems {
                    self.warn(n, &p);
                }
            }
            None => self.ignored += 1,
        }
    }

    fn finish(mut self) -> (Vec<Value>, Vec<String>) {
        if self.suppressed > 0 {
            self.warnings.push(format!(
                "{} more lines skipped with warnings",
                self.suppressed
            ));
        }
        if self.entries.is_empty() && self.ignored > 0 {
            self.warnings.push(format!(
                "no decision entries found: {} lines held neither `{MARKER} {{...}}` nor a `{ACCESS_LOG_KEY}` field",
                self.ignored
            ));
        }
        (self.entries, self.warnings)
    }
}

/// The text after the first `consentry.decision` that is followed by a space or `{`.
fn after_marker(s: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(pos) = s.get(from..)?.find(MARKER) {
        let rest = s.get(from + pos + MARKER.len()..)?;
        if rest.is_empty() || rest.starts_with(|c: char| c.is_whitespace() || c == '{') {
            return Some(rest);
        }
        from += pos + MARKER.len();
    }
    None
}

/// Parses the JSON value after the marker (trailing text is ignored) and collects the
/// entries in it.
fn parse_after_marker(
    rest: &str,
    depth: usize,
    out: &mut Vec<Value>,
    problems: &mut Vec<String>,
) -> usize {
    let rest = rest.trim_start();
    if rest.is_empty() {
        problems.push(format!("nothing after {MARKER}, skipped"));
        return 0;
    }
    let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
    match stream.next() {
        Some(Ok(v)) => collect(&v, depth + 1, out, problems),
        Some(Err(e)) => {
            problems.push(format!("not JSON after {MARKER} ({e}), skipped"));
            0
        }
        None => {
            problems.push(format!("nothing after {MARKER}, skipped"));
            0
        }
    }
}

/// Whether an object is a decision entry (of any version of the format: v1 listed
/// `fields`, v2 `decisions`).
fn looks_like_entry(map: &Map<String, Value>) -> bool {
    map.get("outcome").is_some_and(Value::is_string)
        && [
            "v",
            "recipient",
            "caller",
            "policy",
            "decisions",
            "fields",
            "counts",
        ]
        .iter()
        .any(|k| map.contains_key(*k))
}

/// Collects the decision entries in a JSON value; returns how many it found.
fn collect(v: &Value, depth: usize, out: &mut Vec<Value>, problems: &mut Vec<String>) -> usize {
    if depth > MAX_DEPTH {
        return 0;
    }
    match v {
        Value::Object(map) if looks_like_entry(map) => {
            out.push(v.clone());
            1
        }
        Value::Object(map) => match map.get(ACCESS_LOG_KEY) {
            // An access log line: its other keys describe the request, not decisions.
            Some(d) => access_log_value(d, depth, out, problems),
            None => map
                .values()
                .map(|child| collect(child, depth + 1, out, problems))
                .sum(),
        },
        Value::Array(items) => items
            .iter()
            .map(|item| collect(item, depth + 1, out, problems))
            .sum(),
        // A log shipper's wrapper around an Envoy log line.
        Value::String(s) => match after_marker(s) {
            Some(rest) => parse_after_marker(rest, depth, out, problems),
            None => 0,
        },
        _ => 0,
    }
}

/// The `consentry_decision` field of an access log line.
fn access_log_value(
    d: &Value,
    depth: usize,
    out: &mut Vec<Value>,
    problems: &mut Vec<String>,
) -> usize {
    match d {
        Value::Null => 0,
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() || s == "-" {
                return 0;
            }
            match serde_json::from_str::<Value>(s) {
                Ok(v) => access_log_value_parsed(&v, depth, out, problems),
                Err(e) => {
                    problems.push(format!("{ACCESS_LOG_KEY} is not JSON ({e}), skipped"));
                    0
                }
            }
        }
        Value::Array(_) | Value::Object(_) => access_log_value_parsed(d, depth, out, problems),
        _ => {
            problems.push(format!(
                "{ACCESS_LOG_KEY} is neither a JSON array nor \"-\", skipped"
            ));
            0
        }
    }
}

fn access_log_value_parsed(
    v: &Value,
    depth: usize,
    out: &mut Vec<Value>,
    problems: &mut Vec<String>,
) -> usize {
    match v {
        Value::Array(items) => {
            let mut found = 0;
            for (i, item) in items.iter().enumerate() {
                let n = collect(item, depth + 1, out, problems);
                if n == 0 {
                    problems.push(format!(
                        "{ACCESS_LOG_KEY} item {}: not a decision entry, skipped",
                        i + 1
                    ));
                }
                found += n;
            }
            found
        }
        _ => {
            let n = collect(v, depth + 1, out, problems);
            if n == 0 {
                problems.push(format!("{ACCESS_LOG_KEY} holds no decision entry, skipped"));
            }
            n
        }
    }
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// Number of entries per outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    pub blocked: usize,
    pub modified: usize,
    pub uninspectable: usize,
    pub allowed: usize,
    /// Outcomes this version does not know (or a missing outcome, as `(unknown)`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub other: BTreeMap<String, usize>,
}

impl OutcomeCounts {
    fn add(&mut self, outcome: &str) {
        match outcome {
            "blocked" => self.blocked += 1,
            "modified" => self.modified += 1,
            "uninspectable" => self.uninspectable += 1,
            "allowed" => self.allowed += 1,
            other => *self.other.entry(other.to_owned()).or_default() += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.blocked
            + self.modified
            + self.uninspectable
            + self.allowed
            + self.other.values().sum::<usize>()
    }
}

/// The field decisions about one category in one flow.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CategorySummary {
    pub category: String,
    /// Field decisions counted (the `n` of the entries' decision groups).
    pub decisions: usize,
    /// Per action: `strip`, `redact`, `hash`, `mask`, `block` (and `allow` when allowed
    /// flows are included).
    pub actions: BTreeMap<String, usize>,
    /// Per reason: `no_purpose`, `no_consent`, `undeclared`.
    pub reasons: BTreeMap<String, usize>,
    /// Distinct data subjects (pseudonyms) affected; the pseudonyms are not reported.
    pub subjects: usize,
    /// Purposes named by the decisions that changed or blocked a field (for `no_consent`:
    /// the purpose that needed consent).
    pub purposes: BTreeMap<String, usize>,
    /// Legal bases named by the decisions that changed or blocked a field.
    pub bases: BTreeMap<String, usize>,
    /// Consent evidence used by the counted decisions.
    pub evidence: BTreeMap<String, usize>,
    /// For allowed fields (when allowed flows are included): the legal basis that let the
    /// data through, `(none)` when the entry names none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub allowed_bases: BTreeMap<String, usize>,
    /// For allowed fields: the purpose that allowed them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub allowed_purposes: BTreeMap<String, usize>,
    /// Messages that were not read because the recipient may have every category of
    /// their route (`inspected: false`): counted once per message in `allowed_bases` and
    /// `allowed_purposes`, never as field decisions; their subjects are unknown.
    #[serde(skip_serializing_if = "is_zero")]
    pub unread_messages: usize,
    /// Messages refused because of this category (`blocked_categories`).
    pub blocked_messages: usize,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
}

impl CategorySummary {
    /// Decisions that changed or blocked a field.
    pub fn changed(&self) -> usize {
        self.decisions
            .saturating_sub(self.actions.get("allow").copied().unwrap_or(0))
    }
}

/// Everything one caller sent to (or received from) one recipient.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Flow {
    pub caller: String,
    pub recipient: String,
    /// Entries (messages) counted in this flow.
    pub entries: usize,
    pub outcomes: OutcomeCounts,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<String>,
    /// Entries per direction (`request`, `response`).
    pub directions: BTreeMap<String, usize>,
    /// Entries that were not enforced (audit mode, or uninspectable let through by
    /// `fail: open`).
    pub not_enforced: usize,
    /// Status of refusals, per status.
    pub statuses: BTreeMap<String, usize>,
    /// Distinct data subjects affected across the flow's categories.
    pub subjects: usize,
    pub categories: Vec<CategorySummary>,
    /// Why messages were uninspectable (`detail`), with counts.
    pub uninspectable: BTreeMap<String, usize>,
    /// Field decisions per action, from each entry's `counts` (the groups' when an entry
    /// has none).
    pub action_totals: BTreeMap<String, usize>,
}

/// The report: totals, and the flows, most blocked first.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub include_allowed: bool,
    /// Distinct entries read (after duplicates were dropped).
    pub entries: usize,
    /// Entries dropped as duplicates (same request_id, direction and time).
    pub duplicates: usize,
    /// Values that were not JSON objects, ignored.
    pub invalid_entries: usize,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    /// Entries per outcome, allowed ones included even when they are not listed.
    pub totals: OutcomeCounts,
    pub flows: Vec<Flow>,
    /// What a reader should know about the input.
    pub notes: Vec<String>,
}

/// Earliest and latest time seen, by instant, keeping the text as written.
#[derive(Default)]
struct Span {
    first: Option<(i64, String)>,
    last: Option<(i64, String)>,
}

impl Span {
    fn see(&mut self, t: Option<&(i64, String)>) {
        let Some((k, s)) = t else { return };
        if self.first.as_ref().is_none_or(|(f, _)| k < f) {
            self.first = Some((*k, s.clone()));
        }
        if self.last.as_ref().is_none_or(|(l, _)| k > l) {
            self.last = Some((*k, s.clone()));
        }
    }

    fn into_pair(self) -> (Option<String>, Option<String>) {
        (self.first.map(|f| f.1), self.last.map(|l| l.1))
    }
}

#[derive(Default)]
struct CategoryAcc {
    sum: CategorySummary,
    subjects: HashSet<String>,
    span: Span,
}

#[derive(Default)]
struct FlowAcc {
    flow: Flow,
    policies: BTreeSet<String>,
    bindings: BTreeSet<String>,
    subjects: HashSet<String>,
    categories: BTreeMap<String, CategoryAcc>,
    span: Span,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn bump(map: &mut BTreeMap<String, usize>, key: &str, n: usize) {
    *map.entry(key.to_owned()).or_default() += n;
}

fn text<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// A string key, or a number/bool written as text; empty strings count as missing.
fn text_of(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

use crate::record::count_of;

/// Builds the report from decision entries (from any number of files, in any order).
pub fn build(entries: &[Value], opts: &ReportOptions) -> Report {
    let mut report = Report {
        include_allowed: opts.include_allowed,
        ..Report::default()
    };
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    let mut flows: HashMap<(String, String), FlowAcc> = HashMap::new();
    let mut span = Span::default();
    let mut untimed = 0usize;
    let mut bad_groups = 0usize;
    let mut no_groups = 0usize;

    for entry in entries {
        let Some(obj) = entry.as_object() else {
            report.invalid_entries += 1;
            continue;
        };
        let time_text = text(obj, "time");
        if let Some(rid) = text(obj, "request_id").filter(|r| !r.is_empty() && *r != "-") {
            let key = (
                rid.to_owned(),
                text(obj, "direction").unwrap_or_default().to_owned(),
                time_text.unwrap_or_default().to_owned(),
            );
            if !seen.insert(key) {
                report.duplicates += 1;
                continue;
            }
        }
        report.entries += 1;
        let time = time_text.and_then(|t| parse_time(t).map(|k| (k, t.to_owned())));
        if time.is_none() {
            untimed += 1;
        }
        span.see(time.as_ref());
        let outcome = text(obj, "outcome").unwrap_or(UNKNOWN);
        report.totals.add(outcome);
        if outcome == "allowed" && !opts.include_allowed {
            continue;
        }

        let caller = text_of(obj, "caller").unwrap_or_else(|| UNKNOWN.to_owned());
        let recipient = text_of(obj, "recipient").unwrap_or_else(|| UNKNOWN.to_owned());
        let acc = flows.entry((caller, recipient)).or_default();
        acc.flow.entries += 1;
        acc.flow.outcomes.add(outcome);
        acc.span.see(time.as_ref());
        if let Some(p) = text_of(obj, "policy") {
            acc.policies.insert(p);
        }
        if let Some(b) = text_of(obj, "binding") {
            acc.bindings.insert(b);
        }
        bump(
            &mut acc.flow.directions,
            text(obj, "direction").unwrap_or(UNKNOWN),
            1,
        );
        if obj.get("enforced").and_then(Value::as_bool) == Some(false) {
            acc.flow.not_enforced += 1;
        }
        if let Some(status) = text_of(obj, "status") {
            bump(&mut acc.flow.statuses, &status, 1);
        }
        if outcome == "uninspectable" {
            let detail = text_of(obj, "detail").unwrap_or_else(|| "(no detail given)".to_owned());
            bump(&mut acc.flow.uninspectable, &detail, 1);
        }
        if let Some(cats) = obj.get("blocked_categories").and_then(Value::as_array) {
            let cats: BTreeSet<&str> = cats.iter().filter_map(Value::as_str).collect();
            for c in cats {
                let cat = acc.categories.entry(c.to_owned()).or_default();
                cat.sum.blocked_messages += 1;
                cat.span.see(time.as_ref());
            }
        }

        // Field decisions, in groups: each counts `n` times.
        let mut from_groups: BTreeMap<String, usize> = BTreeMap::new();
        let groups = obj.get("decisions").and_then(Value::as_array);
        for group in groups.into_iter().flatten() {
            let Some(f) = group.as_object() else {
                bad_groups += 1;
                continue;
            };
            let n = crate::record::group_n(f);
            let action = text(f, "action").unwrap_or(UNKNOWN);
            let allowed = action == "allow";
            if allowed && !opts.include_allowed {
                continue;
            }
            bump(&mut from_groups, action, n);
            let category = text_of(f, "category").unwrap_or_else(|| "(uncategorised)".to_owned());
            let cat = acc.categories.entry(category).or_default();
            cat.span.see(time.as_ref());
            let s = &mut cat.sum;
            s.decisions += n;
            bump(&mut s.actions, action, n);
            if let Some(r) = text_of(f, "reason") {
                bump(&mut s.reasons, &r, n);
            }
            if let Some(e) = text_of(f, "evidence") {
                bump(&mut s.evidence, &e, n);
            }
            let purpose = text_of(f, "purpose");
            let basis = text_of(f, "basis");
            if allowed {
                bump(
                    &mut s.allowed_bases,
                    basis.as_deref().unwrap_or("(none)"),
                    n,
                );
                if let Some(p) = purpose {
                    bump(&mut s.allowed_purposes, &p, n);
                }
            } else {
                if let Some(p) = purpose {
                    bump(&mut s.purposes, &p, n);
                }
                if let Some(b) = basis {
                    bump(&mut s.bases, &b, n);
                }
            }
            for subject in crate::record::group_subjects(obj, f) {
                cat.subjects.insert(subject.to_owned());
                acc.subjects.insert(subject.to_owned());
            }
        }

        // A message decided from its headers: the grants of each category of its route.
        if opts.include_allowed {
            let grants = obj.get("allowed_categories").and_then(Value::as_array);
            for g in grants.into_iter().flatten() {
                let Some(c) = g.get("category").and_then(Value::as_str) else {
                    continue;
                };
                let cat = acc.categories.entry(c.to_owned()).or_default();
                cat.span.see(time.as_ref());
                let s = &mut cat.sum;
                s.unread_messages += 1;
                let basis = g.get("basis").and_then(Value::as_str).unwrap_or("(none)");
                bump(&mut s.allowed_bases, basis, 1);
                if let Some(p) = g.get("purpose").and_then(Value::as_str) {
                    bump(&mut s.allowed_purposes, p, 1);
                }
            }
        }

        // Per-action counts.
        match obj.get("counts").and_then(Value::as_object) {
            Some(counts) => {
                for (action, n) in counts {
                    let n = count_of(n).unwrap_or(0);
                    if action != "allow" || opts.include_allowed {
                        bump(&mut acc.flow.action_totals, action, n);
                    }
                }
            }
            None => {
                for (action, n) in &from_groups {
                    bump(&mut acc.flow.action_totals, action, *n);
                }
            }
        }
        if groups.is_none() {
            no_groups += 1;
        }
    }

    let mut out: Vec<Flow> = flows
        .into_iter()
        .map(|((caller, recipient), acc)| finish_flow(caller, recipient, acc))
        .collect();
    out.sort_by(|a, b| {
        b.outcomes
            .blocked
            .cmp(&a.outcomes.blocked)
            .then(b.outcomes.modified.cmp(&a.outcomes.modified))
            .then(b.outcomes.uninspectable.cmp(&a.outcomes.uninspectable))
            .then(b.entries.cmp(&a.entries))
            .then_with(|| a.caller.cmp(&b.caller))
            .then_with(|| a.recipient.cmp(&b.recipient))
    });
    report.flows = out;
    (report.first_seen, report.last_seen) = span.into_pair();

    // Notes for the reader.
    if report.duplicates > 0 {
        report.notes.push(format!(
            "{} skipped as duplicates (same request_id, direction and time, e.g. from both Envoy's log and the access log)",
            plural(report.duplicates, "entry", "entries")
        ));
    }
    if !opts.include_allowed && report.totals.allowed > 0 {
        report.notes.push(format!(
            "{} counted in the totals but not listed; include allowed flows to see them and their legal bases",
            plural(report.totals.allowed, "allowed entry is", "allowed entries are")
        ));
    }
    if no_groups > 0 {
        report.notes.push(format!(
            "{} no `decisions` list: its field decisions are in the per-action totals only",
            plural(no_groups, "entry has", "entries have")
        ));
    }
    if untimed > 0 {
        report.notes.push(format!(
            "{} no valid RFC 3339 time; first/last seen ignore them",
            plural(untimed, "entry has", "entries have")
        ));
    }
    if report.invalid_entries > 0 {
        report.notes.push(format!(
            "{} not JSON objects and ignored",
            plural(report.invalid_entries, "value was", "values were")
        ));
    }
    if bad_groups > 0 {
        report.notes.push(format!(
            "{} not JSON objects and ignored",
            plural(bad_groups, "decision group was", "decision groups were")
        ));
    }
    report
}

fn finish_flow(caller: String, recipient: String, acc: FlowAcc) -> Flow {
    let mut flow = acc.flow;
    flow.caller = caller;
    flow.recipient = recipient;
    flow.policies = acc.policies.into_iter().collect();
    flow.bindings = acc.bindings.into_iter().collect();
    flow.subjects = acc.subjects.len();
    (flow.first_seen, flow.last_seen) = acc.span.into_pair();
    let mut cats: Vec<CategorySummary> = acc
        .categories
        .into_iter()
        .map(|(name, c)| {
            let mut s = c.sum;
            s.category = name;
            s.subjects = c.subjects.len();
            (s.first_seen, s.last_seen) = c.span.into_pair();
            s
        })
        .collect();
    cats.sort_by(|a, b| {
        (b.changed() + b.blocked_messages)
            .cmp(&(a.changed() + a.blocked_messages))
            .then(b.decisions.cmp(&a.decisions))
            .then_with(|| a.category.cmp(&b.category))
    });
    flow.categories = cats;
    flow
}

/// Milliseconds since the Unix epoch of an RFC 3339 time
/// (`2026-11-22T10:34:21.260Z`, `2026-11-22T11:34:21+01:00`).
fn parse_time(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = b.get(from..to)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')),
        )
    };
    let sep = |i: usize, ok: &[u8]| b.get(i).is_some_and(|c| ok.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        for k in 0..3 {
            let d = b.get(start + k).filter(|_| start + k < i);
            millis = millis * 10 + d.map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let offset_minutes = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 60 + m;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian), epoch 1970-01-01.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(secs * 1000 + millis)
}

// ---------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------

struct Paint {
    color: bool,
}

impl Paint {
    fn paint(&self, s: &str, style: Style) -> String {
        if self.color {
            format!("{}{s}{}", style.render(), style.render_reset())
        } else {
            s.to_owned()
        }
    }

    fn bold(&self, s: &str) -> String {
        self.paint(s, Style::new().bold())
    }

    fn dim(&self, s: &str) -> String {
        self.paint(s, Style::new().dimmed())
    }

    /// `label n`, coloured by outcome when n > 0.
    fn outcome(&self, label: &str, n: usize) -> String {
        let color = match label {
            "blocked" => AnsiColor::Red,
            "modified" => AnsiColor::Yellow,
            "uninspectable" => AnsiColor::Magenta,
            "allowed" => AnsiColor::Green,
            _ => AnsiColor::White,
        };
        let s = format!("{label} {n}");
        if n == 0 {
            self.dim(&s)
        } else {
            self.paint(&s, color.on_default().bold())
        }
    }
}

/// A name from the logs, safe for a terminal: control characters escaped, long names cut.
fn clean(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= MAX_TEXT {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `strip 10, hash 2`: most frequent first.
fn counts_text(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "-".to_owned();
    }
    let mut items: Vec<(&String, &usize)> = map.iter().collect();
    items.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    items
        .iter()
        .map(|(k, n)| format!("{} {n}", clean(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn seen_text(first: &Option<String>, last: &Option<String>) -> String {
    match (first, last) {
        (Some(f), Some(l)) if f == l => format!("seen {}", clean(f)),
        (Some(f), Some(l)) => format!("first {}  last {}", clean(f), clean(l)),
        _ => "time unknown".to_owned(),
    }
}

/// The report as a table for people; no colour codes unless `color`.
pub fn render_text(r: &Report, color: bool) -> String {
    let p = Paint { color };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        p.bold(&format!(
            "consentry report: {}, {}",
            plural(r.entries, "decision entry", "decision entries"),
            match (&r.first_seen, &r.last_seen) {
                (Some(f), Some(l)) => format!("{} to {}", clean(f), clean(l)),
                _ => "no valid times".to_owned(),
            }
        ))
    );
    let t = &r.totals;
    let mut outcomes = vec![
        p.outcome("blocked", t.blocked),
        p.outcome("modified", t.modified),
        p.outcome("uninspectable", t.uninspectable),
        p.outcome("allowed", t.allowed),
    ];
    outcomes.extend(t.other.iter().map(|(k, n)| format!("{} {n}", clean(k))));
    let _ = writeln!(out, "outcomes: {}", outcomes.join("  "));
    for note in &r.notes {
        let _ = writeln!(out, "{}", p.dim(&format!("note: {note}")));
    }
    if r.flows.is_empty() {
        let _ = writeln!(
            out,
            "\n{}",
            if r.include_allowed {
                "No flows."
            } else {
                "No blocked, modified or uninspectable flows."
            }
        );
        return out;
    }
    for (i, flow) in r.flows.iter().enumerate() {
        out.push('\n');
        render_flow(&mut out, &p, i + 1, flow, r.include_allowed);
    }
    out
}

fn render_flow(out: &mut String, p: &Paint, index: usize, flow: &Flow, include_allowed: bool) {
    let _ = writeln!(
        out,
        "{}",
        p.bold(&format!(
            "[{index}] {} → {}",
            clean(&flow.caller),
            clean(&flow.recipient)
        ))
    );
    let o = &flow.outcomes;
    let mut counts = vec![
        p.outcome("blocked", o.blocked),
        p.outcome("modified", o.modified),
        p.outcome("uninspectable", o.uninspectable),
    ];
    if include_allowed {
        counts.push(p.outcome("allowed", o.allowed));
    }
    counts.extend(o.other.iter().map(|(k, n)| format!("{} {n}", clean(k))));
    let _ = writeln!(
        out,
        "    {}   {}",
        counts.join("  "),
        seen_text(&flow.first_seen, &flow.last_seen)
    );

    let mut facts = Vec::new();
    if !flow.policies.is_empty() {
        let names: Vec<String> = flow.policies.iter().map(|s| clean(s)).collect();
        facts.push(format!(
            "{} {}",
            if names.len() == 1 {
                "policy"
            } else {
                "policies"
            },
            names.join(", ")
        ));
    }
    if !flow.bindings.is_empty() {
        let names: Vec<String> = flow.bindings.iter().map(|s| clean(s)).collect();
        facts.push(format!("binding {}", names.join(", ")));
    }
    facts.push(counts_text(&flow.directions));
    facts.push(plural(flow.subjects, "subject", "subjects"));
    if flow.not_enforced > 0 {
        facts.push(format!(
            "{} not enforced (audit mode or fail: open)",
            plural(flow.not_enforced, "entry", "entries")
        ));
    }
    if !flow.statuses.is_empty() {
        let statuses: Vec<String> = flow
            .statuses
            .iter()
            .map(|(s, n)| format!("{} ×{n}", clean(s)))
            .collect();
        facts.push(format!("refused with status {}", statuses.join(", ")));
    }
    let _ = writeln!(out, "    {}", facts.join(" · "));

    if !flow.categories.is_empty() {
        let mut header = vec![
            "CATEGORY", "FIELDS", "ACTIONS", "REASONS", "SUBJECTS", "PURPOSES", "BASES",
        ];
        if include_allowed {
            header.push("ALLOWED BY");
        }
        header.push("BLOCKED MSGS");
        let mut rows: Vec<Vec<String>> = Vec::new();
        for c in &flow.categories {
            let mut row = vec![
                clean(&c.category),
                c.decisions.to_string(),
                counts_text(&c.actions),
                counts_text(&c.reasons),
                c.subjects.to_string(),
                counts_text(&c.purposes),
                counts_text(&c.bases),
            ];
            if include_allowed {
                row.push(counts_text(&c.allowed_bases));
            }
            row.push(c.blocked_messages.to_string());
            rows.push(row);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .chain(header.get(i).map(|h| h.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| -> String {
            let last = cells.len().saturating_sub(1);
            let mut s = String::from("    ");
            for (i, cell) in cells.into_iter().enumerate() {
                if i == last {
                    s.push_str(&cell);
                } else {
                    let w = widths.get(i).copied().unwrap_or(0);
                    let pad = w.saturating_sub(cell.chars().count());
                    s.push_str(&cell);
                    s.push_str(&" ".repeat(pad + 2));
                }
            }
            s.trim_end().to_owned()
        };
        let head = line(header.iter().map(|h| (*h).to_owned()).collect());
        let _ = writeln!(out, "{}", p.dim(&head));
        for row in rows {
            let _ = writeln!(out, "{}", line(row));
        }
    }

    if !flow.uninspectable.is_empty() {
        let _ = writeln!(out, "    uninspectable:");
        let mut details: Vec<(&String, &usize)> = flow.uninspectable.iter().collect();
        details.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (detail, n) in details.iter().take(MAX_DETAILS) {
            let _ = writeln!(out, "      {n:>5} × {}", clean(detail));
        }
        if details.len() > MAX_DETAILS {
            let rest: usize = details.iter().skip(MAX_DETAILS).map(|(_, n)| **n).sum();
            let _ = writeln!(
                out,
                "      {rest:>5} × ({} other reasons)",
                details.len() - MAX_DETAILS
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(input: &str) -> (Vec<Value>, Vec<String>) {
        read_from(input.as_bytes()).unwrap()
    }

    fn entry(rid: &str, time: &str, caller: &str, recipient: &str, outcome: &str) -> Value {
        json!({
            "v": 2, "time": time, "request_id": rid, "policy": "acme", "caller": caller,
            "recipient": recipient, "direction": "request", "mode": "enforce",
            "outcome": outcome, "enforced": true, "decisions": [], "counts": {}
        })
    }

    /// A decision group about `subjects` (pseudonyms), one decision each.
    fn group(category: &str, action: &str, reason: Option<&str>, subjects: &[&str]) -> Value {
        let mut g = json!({
            "category": category, "action": action,
            "purpose": "marketing.email", "basis": "consent", "evidence": "none",
            "paths": ["$.customers[*].x"], "n": subjects.len().max(1),
            "subjects": subjects,
        });
        if let Some(r) = reason {
            g["reason"] = json!(r);
        }
        g
    }

    /// Sets an entry's groups, listing their subjects once in `subjects` and writing
    /// each group's as index ranges, as the filter does.
    fn set_groups(e: &mut Value, groups: Vec<Value>) {
        let mut subjects: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for mut g in groups {
            let names: Vec<String> = g["subjects"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let mut idx: Vec<usize> = names
                .iter()
                .map(|n| match subjects.iter().position(|s| s == n) {
                    Some(i) => i,
                    None => {
                        subjects.push(n.clone());
                        subjects.len() - 1
                    }
                })
                .collect();
            idx.sort_unstable();
            let obj = g.as_object_mut().unwrap();
            if idx.is_empty() {
                obj.remove("subjects");
            } else {
                obj.insert(
                    "subjects".into(),
                    json!(consentry::engine::subject_ranges(&idx)),
                );
            }
            out.push(g);
        }
        e["subjects"] = json!(subjects);
        e["decisions"] = json!(out);
    }

    fn envoy_line(e: &Value) -> String {
        format!(
            "[2026-11-22 10:34:21.260][6348][warning][wasm] [source/extensions/common/wasm/context.cc:1154] wasm log consentry consentry: consentry.decision {e}"
        )
    }

    fn access_line(entries: &[Value]) -> String {
        let arr = serde_json::to_string(entries).unwrap();
        json!({
            "time": "2026-11-22T10:34:21.000Z", "request_id": "r", "method": "POST",
            "caller": "checkout", "response_code": "403", "consentry_decision": arr
        })
        .to_string()
    }

    #[test]
    fn reads_envoy_log_lines_and_ignores_others() {
        let e = entry(
            "r1",
            "2026-11-22T10:34:21.260Z",
            "checkout",
            "mailer",
            "blocked",
        );
        let input = format!(
            "[2026-11-22 10:34:20.000][1][info][main] starting main dispatch loop\n{}\n\n",
            envoy_line(&e)
        );
        let (entries, warnings) = read(&input);
        assert_eq!(entries, vec![e]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn reads_access_log_lines() {
        let a = entry(
            "r1",
            "2026-11-22T10:34:21.260Z",
            "checkout",
            "mailer",
            "modified",
        );
        let mut b = a.clone();
        b["direction"] = json!("response");
        let none_dash = json!({"request_id": "r2", "consentry_decision": "-"}).to_string();
        let none_empty = json!({"request_id": "r3", "consentry_decision": ""}).to_string();
        let input = format!(
            "{}\n{none_dash}\n{none_empty}\n",
            access_line(&[a.clone(), b.clone()])
        );
        let (entries, warnings) = read(&input);
        assert_eq!(entries, vec![a, b]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn reads_plain_json_lines_and_nested_forms() {
        let a = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        let b = entry("r2", "2026-11-22T10:00:01.000Z", "a", "b", "allowed");
        // A replay result holding entries, and a log shipper's wrapper of an Envoy line.
        let replay = json!({"source": "x.json", "request": {"fate": "replied", "decision": b}});
        let shipped = json!({"log": envoy_line(&a) + "\n", "stream": "stderr"});
        let input = format!("{a}\r\n{b}\n{replay}\n{shipped}\n");
        let (entries, warnings) = read(&input);
        assert_eq!(entries, vec![a.clone(), b.clone(), b, a]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn bad_lines_become_warnings() {
        let good = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        let input = [
            "wasm log consentry consentry: consentry.decision {\"time\": \"2026-11-22T1".to_owned(),
            "{this is not json".to_owned(),
            json!({"consentry_decision": "[{\"outcome\": "}).to_string(),
            json!({"consentry_decision": "[42]"}).to_string(),
            json!({"consentry_decision": 7}).to_string(),
            "x consentry.decision".to_owned(),
            "x consentry.decision {\"hello\": 1}".to_owned(),
            "x consentry.decision_total 5".to_owned(),
            "\u{0}\u{1}garbage \u{fffd}".to_owned(),
            good.to_string(),
        ]
        .join("\n");
        let mut bytes = input.into_bytes();
        bytes.extend_from_slice(b"\n\xff\xfe{ not utf8\n");
        let (entries, warnings) = read_from(&bytes[..]).unwrap();
        assert_eq!(entries, vec![good]);
        assert_eq!(warnings.len(), 7, "{warnings:#?}");
        assert!(warnings[0].starts_with("line 1: not JSON after consentry.decision"));
        assert!(warnings[1].starts_with("line 2: not valid JSON"));
        assert!(warnings[2].starts_with("line 3: consentry_decision is not JSON"));
        assert!(warnings[3].starts_with("line 4: consentry_decision item 1"));
        assert!(warnings[4].starts_with("line 5: consentry_decision is neither"));
        assert!(warnings[5].starts_with("line 6: nothing after consentry.decision"));
        assert!(warnings[6].starts_with("line 7: the JSON after consentry.decision"));
    }

    #[test]
    fn warnings_are_bounded_and_empty_input_is_explained() {
        let input = "{bad\n".repeat(MAX_WARNINGS + 5);
        let (_, warnings) = read(&input);
        assert_eq!(warnings.len(), MAX_WARNINGS + 1);
        assert_eq!(warnings[MAX_WARNINGS], "5 more lines skipped with warnings");

        let (entries, warnings) = read("just some log\nand another\n");
        assert!(entries.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no decision entries found: 2 lines"));
    }

    #[test]
    fn reads_files_and_refuses_gzip() {
        let dir = std::env::temp_dir().join(format!("consentry-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("decisions.log");
        let e = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        std::fs::write(&plain, format!("{e}\n")).unwrap();
        let (entries, warnings) = read_entries(&plain).unwrap();
        assert_eq!(entries, vec![e]);
        assert!(warnings.is_empty());

        let gz = dir.join("decisions.log.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        let err = format!("{:#}", read_entries(&gz).unwrap_err());
        assert!(err.contains("gzip"), "{err}");
        let missing = format!("{:#}", read_entries(&dir.join("nope")).unwrap_err());
        assert!(missing.contains("cannot open decision log"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn groups_by_caller_recipient_and_category() {
        let mut a1 = entry(
            "r1",
            "2026-11-22T10:00:00.000Z",
            "checkout",
            "mailer",
            "modified",
        );
        set_groups(
            &mut a1,
            vec![
                group("email", "strip", Some("no_consent"), &["s2:aaa", "s2:bbb"]),
                group("email", "allow", None, &["s2:ccc"]),
                group("phone", "mask", Some("no_purpose"), &["s2:aaa"]),
            ],
        );
        a1["counts"] = json!({"strip": 2, "mask": 1, "allow": 1});
        let mut a2 = entry(
            "r2",
            "2026-11-22T10:05:00.000Z",
            "checkout",
            "mailer",
            "blocked",
        );
        set_groups(
            &mut a2,
            vec![group("health", "block", Some("undeclared"), &["s2:aaa"])],
        );
        a2["blocked_categories"] = json!(["health"]);
        a2["status"] = json!(403);
        a2["counts"] = json!({"block": 1});
        let mut b1 = entry(
            "r3",
            "2026-11-22T10:01:00.000Z",
            "crm",
            "analytics",
            "modified",
        );
        set_groups(
            &mut b1,
            vec![group("email", "hash", Some("no_purpose"), &["s2:aaa"])],
        );
        let c1 = entry(
            "r4",
            "2026-11-22T10:02:00.000Z",
            "crm",
            "billing",
            "allowed",
        );
        let mut u1 = entry(
            "r5",
            "2026-11-22T10:03:00.000Z",
            "crm",
            "analytics",
            "uninspectable",
        );
        u1["detail"] = json!("body is not valid JSON");
        u1["enforced"] = json!(false);

        let r = build(&[a1, a2, b1, c1, u1], &ReportOptions::default());
        assert_eq!(r.entries, 5);
        assert_eq!(
            (
                r.totals.blocked,
                r.totals.modified,
                r.totals.uninspectable,
                r.totals.allowed
            ),
            (1, 2, 1, 1)
        );
        // The allowed-only flow is not listed; the most blocked flow comes first.
        assert_eq!(r.flows.len(), 2);
        let f = &r.flows[0];
        assert_eq!(
            (f.caller.as_str(), f.recipient.as_str()),
            ("checkout", "mailer")
        );
        assert_eq!(
            (f.outcomes.blocked, f.outcomes.modified, f.entries),
            (1, 1, 2)
        );
        assert_eq!(f.subjects, 2);
        assert_eq!(f.policies, vec!["acme"]);
        assert_eq!(f.statuses.get("403"), Some(&1));
        assert_eq!(f.action_totals.get("allow"), None);
        assert_eq!(f.action_totals.get("strip"), Some(&2));
        let names: Vec<&str> = f.categories.iter().map(|c| c.category.as_str()).collect();
        assert_eq!(names, vec!["email", "health", "phone"]);
        let email = &f.categories[0];
        assert_eq!(email.decisions, 2);
        assert_eq!(email.actions.get("strip"), Some(&2));
        assert_eq!(email.actions.get("allow"), None);
        assert_eq!(email.reasons.get("no_consent"), Some(&2));
        assert_eq!(email.subjects, 2);
        assert_eq!(email.purposes.get("marketing.email"), Some(&2));
        assert_eq!(email.bases.get("consent"), Some(&2));
        assert_eq!(email.evidence.get("none"), Some(&2));
        let health = &f.categories[1];
        assert_eq!((health.blocked_messages, health.decisions), (1, 1));
        assert_eq!(health.reasons.get("undeclared"), Some(&1));

        let g = &r.flows[1];
        assert_eq!(
            (g.caller.as_str(), g.recipient.as_str()),
            ("crm", "analytics")
        );
        assert_eq!((g.outcomes.modified, g.outcomes.uninspectable), (1, 1));
        assert_eq!(g.uninspectable.get("body is not valid JSON"), Some(&1));
        assert_eq!(g.not_enforced, 1);
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("1 allowed entry is counted")));

        let text = render_text(&r, false);
        assert!(text.contains("[1] checkout → mailer"), "{text}");
        assert!(text.contains("[2] crm → analytics"), "{text}");
        assert!(text.contains("body is not valid JSON"), "{text}");
        assert!(text.contains("strip 2"), "{text}");
        assert!(
            !text.contains("s2:"),
            "pseudonyms must not be printed:\n{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
        let colored = render_text(&r, true);
        assert!(colored.contains('\u{1b}'));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s2:"), "{json}");
    }

    #[test]
    fn first_and_last_seen_follow_instants_not_input_order() {
        let times = [
            "2026-11-22T10:30:00.500Z",
            "2026-11-22T09:00:00Z",
            // 10:45 UTC, written with an offset: the latest instant.
            "2026-11-22T11:45:00.000+01:00",
            "2026-11-22T10:40:00.123456Z",
            "not a time",
        ];
        let entries: Vec<Value> = times
            .iter()
            .enumerate()
            .map(|(i, t)| entry(&format!("r{i}"), t, "a", "b", "blocked"))
            .collect();
        let r = build(&entries, &ReportOptions::default());
        let f = &r.flows[0];
        assert_eq!(f.first_seen.as_deref(), Some("2026-11-22T09:00:00Z"));
        assert_eq!(
            f.last_seen.as_deref(),
            Some("2026-11-22T11:45:00.000+01:00")
        );
        assert_eq!(r.first_seen, f.first_seen);
        assert_eq!(r.last_seen, f.last_seen);
        assert!(r.notes.iter().any(|n| n.contains("1 entry has no valid")));
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_time("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_time("2026-11-22T10:34:21.260Z"),
            Some(1_795_343_661_260)
        );
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(
            parse_time("2000-02-29T01:00:00+01:00"),
            Some(951_782_400_000)
        );
        assert_eq!(parse_time("1969-12-31T23:59:59.9Z"), Some(-100));
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:34:21",
            "2026-11-22T10:34:21.Z",
            "２026-11-22T10:34:21Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn duplicates_from_both_logs_count_once() {
        let mut e = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        set_groups(
            &mut e,
            vec![group("email", "block", Some("no_purpose"), &["s2:x"])],
        );
        e["blocked_categories"] = json!(["email"]);
        let mut resp = e.clone();
        resp["direction"] = json!("response");
        let input = format!("{}\n{}\n", envoy_line(&e), access_line(&[e.clone(), resp]));
        let (entries, _) = read(&input);
        assert_eq!(entries.len(), 3);
        // Without a request id, identical entries are not assumed to be the same message.
        let mut anon = entry("", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        anon.as_object_mut().unwrap().remove("request_id");
        let mut all = entries;
        all.push(anon.clone());
        all.push(anon);
        let r = build(&all, &ReportOptions::default());
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.entries, 4);
        assert_eq!(r.totals.blocked, 4);
        let f = &r.flows[0];
        assert_eq!(f.directions.get("request"), Some(&3));
        assert_eq!(f.directions.get("response"), Some(&1));
        assert_eq!(f.categories[0].decisions, 2);
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("1 entry skipped as duplicates")));
    }

    #[test]
    fn a_group_counts_for_every_decision_it_stands_for() {
        let mut e = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "modified");
        let many: Vec<String> = (0..40).map(|i| format!("s2:{i:016}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        set_groups(
            &mut e,
            vec![
                group("email", "strip", Some("no_purpose"), &refs),
                group("age", "allow", None, &refs[..10]),
            ],
        );
        e["counts"] = json!({"strip": 40, "allow": 10});
        let r = build(&[e.clone()], &ReportOptions::default());
        let f = &r.flows[0];
        assert_eq!(f.categories.len(), 1, "allowed groups are not listed");
        let email = &f.categories[0];
        assert_eq!((email.decisions, email.subjects), (40, 40));
        assert_eq!(email.actions.get("strip"), Some(&40));
        assert_eq!(email.reasons.get("no_purpose"), Some(&40));
        assert_eq!(f.subjects, 40);
        assert_eq!(f.action_totals.get("strip"), Some(&40));
        assert!(render_text(&r, false).contains("strip 40"));
        let all = build(
            &[e],
            &ReportOptions {
                include_allowed: true,
            },
        );
        let age = all.flows[0]
            .categories
            .iter()
            .find(|c| c.category == "age")
            .unwrap();
        assert_eq!((age.decisions, age.subjects), (10, 10));
        assert_eq!(age.allowed_bases.get("consent"), Some(&10));
    }

    #[test]
    fn a_v1_line_is_refused_with_its_file_and_line() {
        let good = entry("r1", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        let mut v1 = good.clone();
        let o = v1.as_object_mut().unwrap();
        o.remove("v");
        o.remove("decisions");
        o.insert("fields".into(), json!([]));
        let input = format!("{}\n{}\n", envoy_line(&good), envoy_line(&v1));
        let err = read_named(input.as_bytes(), "envoy.log")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "envoy.log:2: unsupported decision-record version (v1 line 2 of envoy.log; this consentry reads v2)"
            ),
            "{err}"
        );
        // In an access log, a JSON line, or a JSON document (no line: the entry).
        for input in [access_line(&[v1.clone()]), v1.to_string()] {
            let err = read_named(input.as_bytes(), "x.log")
                .unwrap_err()
                .to_string();
            assert!(err.contains("(v1 line 1 of x.log;"), "{err}");
        }
        let doc = serde_json::to_string_pretty(&json!({"exchanges": [good, v1]})).unwrap();
        let err = read_named(doc.as_bytes(), "replay.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("(v1 entry 2 of replay.json;"), "{err}");
        // A later version too.
        let mut v3 = entry("r3", "2026-11-22T10:00:00.000Z", "a", "b", "blocked");
        v3["v"] = json!(3);
        let err = read_named(v3.to_string().as_bytes(), "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(v3 line 1 of x; this consentry reads v2)"),
            "{err}"
        );
        // Through read_entries, with the file's name.
        let dir = std::env::temp_dir().join(format!("consentry-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("old.log");
        std::fs::write(&file, format!("{}\n", envoy_line(&v1))).unwrap();
        let err = format!("{:#}", read_entries(&file).unwrap_err());
        assert!(
            err.contains(&format!(
                "{}:1: unsupported decision-record version (v1 line 1 of",
                file.display()
            )),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unread_messages_count_their_grants_once_per_category() {
        let mut e = entry(
            "r1",
            "2026-11-22T10:00:00.000Z",
            "support",
            "profile",
            "allowed",
        );
        e["inspected"] = json!(false);
        e["decisions"] = json!([]);
        e["counts"] = json!({});
        e["allowed_categories"] = json!([
            {"category": "user.name", "purpose": "essential.account", "basis": "contract"},
            {"category": "user.contact.email", "purpose": "essential.account", "basis": "contract"},
        ]);
        let mut e2 = e.clone();
        e2["request_id"] = json!("r2");
        let hidden = build(&[e.clone(), e2.clone()], &ReportOptions::default());
        assert!(
            hidden.flows.is_empty(),
            "allowed flows are listed only on request"
        );
        let r = build(
            &[e, e2],
            &ReportOptions {
                include_allowed: true,
            },
        );
        let f = &r.flows[0];
        assert_eq!(f.outcomes.allowed, 2);
        assert_eq!(f.categories.len(), 2);
        let name = f
            .categories
            .iter()
            .find(|c| c.category == "user.name")
            .unwrap();
        assert_eq!((name.unread_messages, name.decisions), (2, 0));
        assert_eq!(name.allowed_bases.get("contract"), Some(&2));
        assert_eq!(name.allowed_purposes.get("essential.account"), Some(&2));
        assert_eq!(name.subjects, 0);
    }

    #[test]
    fn allowed_flows_show_their_legal_basis() {
        let mut e = entry(
            "r1",
            "2026-11-22T10:00:00.000Z",
            "crm",
            "billing",
            "allowed",
        );
        let mut contract = group("address", "allow", None, &["s2:x"]);
        contract["basis"] = json!("contract");
        contract["purpose"] = json!("billing.invoice");
        let mut no_basis = group("address", "allow", None, &["s2:y"]);
        no_basis.as_object_mut().unwrap().remove("basis");
        set_groups(
            &mut e,
            vec![contract, no_basis, group("email", "allow", None, &["s2:x"])],
        );
        e["counts"] = json!({"allow": 3});
        let r = build(
            &[e.clone()],
            &ReportOptions {
                include_allowed: true,
            },
        );
        assert_eq!(r.flows.len(), 1);
        let f = &r.flows[0];
        assert_eq!(f.outcomes.allowed, 1);
        assert_eq!(f.action_totals.get("allow"), Some(&3));
        let address = f
            .categories
            .iter()
            .find(|c| c.category == "address")
            .unwrap();
        assert_eq!(address.allowed_bases.get("contract"), Some(&1));
        assert_eq!(address.allowed_bases.get("(none)"), Some(&1));
        assert_eq!(address.allowed_purposes.get("billing.invoice"), Some(&1));
        assert!(address.bases.is_empty());
        let text = render_text(&r, false);
        assert!(text.contains("ALLOWED BY"), "{text}");
        assert!(text.contains("contract 1"), "{text}");

        let hidden = build(&[e], &ReportOptions::default());
        assert!(hidden.flows.is_empty());
        assert!(
            render_text(&hidden, false).contains("No blocked, modified or uninspectable flows.")
        );
    }

    #[test]
    fn tolerates_missing_and_mistyped_keys() {
        let weird = vec![
            json!({"v": 2, "outcome": "blocked", "caller": 5, "decisions": "nope", "counts": [1], "time": 7}),
            json!({"v": 2, "outcome": "quarantined", "recipient": "x", "decisions": [1, {"action": "strip", "n": "3", "subjects": "0-9"}], "subjects": "x"}),
            json!({"v": 2, "outcome": "modified", "policy": "p", "counts": {"strip": "2", "hash": -1}}),
            json!("not an object"),
            json!(null),
        ];
        let r = build(&weird, &ReportOptions::default());
        assert_eq!(r.entries, 3);
        assert_eq!(r.invalid_entries, 2);
        assert_eq!(r.totals.other.get("quarantined"), Some(&1));
        assert_eq!(r.totals.total(), 3);
        let unknown = r.flows.iter().find(|f| f.caller == "5").unwrap();
        assert_eq!(unknown.recipient, UNKNOWN);
        let q = r.flows.iter().find(|f| f.recipient == "x").unwrap();
        assert_eq!(q.categories[0].category, "(uncategorised)");
        assert_eq!(q.categories[0].decisions, 3);
        assert_eq!(
            q.categories[0].subjects, 0,
            "no subjects list: none resolved"
        );
        let p = r.flows.iter().find(|f| f.policies == ["p"]).unwrap();
        assert_eq!(p.action_totals.get("strip"), Some(&2));
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("1 decision group was not")));
        assert!(r
            .notes
            .iter()
            .any(|n| n.contains("2 entries have no `decisions` list")));
        let text = render_text(&r, false);
        assert!(text.contains("quarantined 1"), "{text}");
        assert!(serde_json::to_string(&r).is_ok());
        let empty = build(&[], &ReportOptions::default());
        assert!(render_text(&empty, true).contains("no valid times"));
    }

    #[test]
    fn names_from_logs_cannot_drive_the_terminal() {
        let e = entry(
            "r1",
            "2026-11-22T10:00:00.000Z",
            "evil\u{1b}[2J",
            &"x".repeat(500),
            "blocked",
        );
        let text = render_text(&build(&[e], &ReportOptions::default()), false);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("evil\\u{1b}[2J"), "{text}");
        assert!(text.contains('…'));
    }
}
