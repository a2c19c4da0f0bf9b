//! The per-message path: identify the parties, find the records, decide every field,
//! apply the actions. Nothing here parses the policy or a JSONPath again.

use super::actions::{hash_value, mask_value, percent_decode, percent_encode, subject_pseudonym};
use super::compile::{param_is, Action, CBinding, CNamed, Policy};
use super::consent::{granted, ConsentAnswer, HeaderConsent, StoreAnswers};
use super::decision::{
    DecisionGroup, DecisionLog, Grant, Outcome, Reason, MAX_LOGGED_PATHS, RECORD_VERSION,
};
use super::encoding;
use super::matcher::Cursor;
use super::policy::{FailMode, LegalBasis, MessageSubject, Mode, ShapeMismatch, Undeclared};
use super::route;
use super::selector::{push_edge, Edge, Selector};
use super::strict_json::StrictError;
use super::{BindingId, Direction, ServiceId};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Slots of the cross-VM consent cache (see [`Policy::cache_slot`]): at most this many
/// entries of about 200 bytes each live in Envoy's shared data.
pub const CONSENT_CACHE_SLOTS: u64 = 16_384;

/// One side of an exchange as the policy knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub service: Option<ServiceId>,
    /// The service name, or `unknown(...)` with the identity that was seen.
    pub label: String,
    /// What named it.
    pub source: IdentitySource,
}

/// What a party's identity was taken from; the decision log names it for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The mTLS peer principal (SPIFFE URI SAN).
    Principal,
    /// The caller header, sent by a principal the policy trusts to assert it.
    TrustedHeader,
    /// The caller header on a request without a principal, where the policy opts in.
    PlaintextHeader,
    /// Envoy's upstream cluster.
    Cluster,
    /// The `:authority`.
    Authority,
    /// Nothing the policy trusts named it: the party is unknown.
    None,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Principal => "principal",
            IdentitySource::TrustedHeader => "trusted_header",
            IdentitySource::PlaintextHeader => "plaintext_header",
            IdentitySource::Cluster => "cluster",
            IdentitySource::Authority => "authority",
            IdentitySource::None => "none",
        }
    }
}

/// What the filter knows about one request/response exchange.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request_id: Option<String>,
    pub method: String,
    /// `:path` of the request as the filter received it, query included.
    pub path: String,
    /// The path bindings were chosen by ([`route::canonical_path`]); when the path has
    /// no single safe reading, its most covering reading.
    pub canonical_path: String,
    /// Set when the path has no single safe reading and some reading of it could be
    /// covered: the request is refused with it.
    pub route_refusal: Option<Uninspectable>,
    pub caller: Party,
    pub upstream: Party,
    /// Consent from the trusted consent header, if present and trusted.
    pub header_consent: Option<HeaderConsent>,
    /// Why a consent header present on the request was not used.
    pub header_consent_note: Option<String>,
    /// Subject of header and query data, for the binding that covers the request.
    pub message_subject: Option<String>,
    /// The binding that covers the request and the one that covers the response, found
    /// once from the method and path.
    bindings: [Option<BindingId>; 2],
}

impl Exchange {
    /// The binding that covers the message in `direction`; `None`: it is not inspected.
    pub fn binding(&self, direction: Direction) -> Option<BindingId> {
        match direction {
            Direction::Request => self.bindings[0],
            Direction::Response => self.bindings[1],
        }
    }

    pub fn recipient(&self, direction: Direction) -> &Party {
        match direction {
            Direction::Request => &self.upstream,
            Direction::Response => &self.caller,
        }
    }
}

/// Why a message could not be inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UninspectableKind {
    TooLarge,
    UnsupportedMediaType,
    UnsupportedEncoding,
    Malformed,
    TooDeep,
    TooManyRecords,
    /// JSON that parsers read differently (a duplicate key).
    Ambiguous,
    ConsentStore,
    /// A path with no single safe reading (an encoded slash, an invalid escape, ...).
    UnsafePath,
    /// A covered body in which the binding's records path finds nothing, and that is not
    /// an empty batch: its data would go unjudged.
    ShapeMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninspectable {
    pub kind: UninspectableKind,
    /// What was wrong, for the client and the log; never a customer value.
    pub detail: String,
    /// The policy lets this message pass anyway (a binding's `shape_mismatch: pass`):
    /// it is logged as uninspectable and not enforced, like `fail: open`.
    pub tolerated: bool,
}

impl Uninspectable {
    pub fn new(kind: UninspectableKind, detail: impl Into<String>) -> Self {
        Uninspectable {
            kind,
            detail: detail.into(),
            tolerated: false,
        }
    }

    pub fn code(&self) -> &'static str {
        match self.kind {
            UninspectableKind::TooLarge => "body_too_large",
            UninspectableKind::UnsupportedMediaType => "unsupported_media_type",
            UninspectableKind::UnsupportedEncoding => "unsupported_content_encoding",
            UninspectableKind::Malformed => "malformed_json",
            UninspectableKind::TooDeep => "too_deep",
            UninspectableKind::TooManyRecords => "too_many_records",
            UninspectableKind::Ambiguous => "ambiguous_json",
            UninspectableKind::ConsentStore => "consent_store_unavailable",
            UninspectableKind::UnsafePath => "unsafe_path",
            UninspectableKind::ShapeMismatch => "shape_mismatch",
        }
    }

    /// The status a refused message gets. A response the filter cannot inspect is the
    /// upstream's fault, not the caller's: 502.
    pub fn status(&self, direction: Direction) -> u32 {
        match (direction, self.kind) {
            (_, UninspectableKind::ConsentStore) => 503,
            (Direction::Response, _) => 502,
            (Direction::Request, UninspectableKind::TooLarge) => 413,
            (
                Direction::Request,
                UninspectableKind::UnsupportedMediaType | UninspectableKind::UnsupportedEncoding,
            ) => 415,
            (Direction::Request, _) => 400,
        }
    }
}

/// The category index under which undeclared fields are recorded.
pub const UNDECLARED: usize = usize::MAX;

/// Where the consent behind a decision came from; rendered in [`Policy::decision_log`]
/// (`Record` as `record:` + the binding's consent path + `.` + the purpose's consent
/// key, `Header` as `header:` + the consent header's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Evidence {
    Record,
    Header,
    Store,
    StoreUnknown,
    None,
    NoSubject,
}

/// One field decision as small values: what its group is found by. `basis` is the
/// purpose's, so it is not part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FieldKey {
    /// Index into the policy's categories, or [`UNDECLARED`].
    pub category: usize,
    /// `allow`, or the action applied.
    pub action: &'static str,
    pub reason: Option<Reason>,
    /// Index into the policy's purposes.
    pub purpose: Option<usize>,
    pub evidence: Option<Evidence>,
}

/// The field decisions of one group, as recorded.
#[derive(Debug, Clone)]
struct Group {
    key: FieldKey,
    n: usize,
    /// (path template id, decisions at it), first-seen order.
    paths: Vec<(u32, usize)>,
    /// Decisions whose template was not interned (past [`MAX_LOGGED_PATHS`]).
    folded: usize,
    /// Subject ids, appended when they differ from the last one; sorted and deduplicated
    /// when the log is written.
    subjects: Vec<u32>,
}

/// The field decisions of one message, aggregated as they are recorded: groups by
/// [`FieldKey`], path templates and raw subjects interned. Nothing is built per field
/// beyond a few hash look-ups; names, evidence strings and subject pseudonyms are made
/// once per group or subject, in [`Policy::decision_log`]. Raw subjects live here only
/// and are never logged.
#[derive(Debug, Clone, Default)]
pub struct Report {
    groups: Vec<Group>,
    /// (key, path template id) -> (group, slot in the group's `paths`).
    slots: HashMap<(FieldKey, u32), (u32, u32)>,
    /// Group by key (for decisions whose path is folded, and for merges).
    by_key: HashMap<FieldKey, u32>,
    paths: Vec<String>,
    path_ids: HashMap<String, u32>,
    subjects: Vec<String>,
    subject_ids: HashMap<String, u32>,
    /// Records judged in the body.
    pub records: usize,
    /// Categories whose `block` action fired.
    pub blocked: BTreeSet<String>,
    /// The message was decided from its headers: its recipient may receive every
    /// category of its binding, for these purposes, whatever the consent.
    pub unread: Option<Vec<Grant>>,
}

impl Report {
    /// Records one field decision: `key` says what was decided, `path` is the field's
    /// path template (`$.customers[*].email`, `header:x-email`), `subject` the raw
    /// subject id of the record or message, if any.
    pub(crate) fn record(&mut self, key: FieldKey, path: &str, subject: Option<&str>) {
        let subject = subject.map(|s| self.subject_id(s));
        let g = match self.path_ids.get(path) {
            Some(&pid) => match self.slots.get(&(key, pid)) {
                Some(&(g, slot)) => {
                    self.groups[g as usize].paths[slot as usize].1 += 1;
                    g
                }
                None => {
                    let g = self.group(key);
                    self.add_slot(g, pid, 1);
                    g
                }
            },
            None => {
                let g = self.group(key);
                match self.intern_path(path) {
                    Some(pid) => self.add_slot(g, pid, 1),
                    None => self.groups[g as usize].folded += 1,
                }
                g
            }
        };
        let group = &mut self.groups[g as usize];
        group.n += 1;
        if let Some(s) = subject {
            if group.subjects.last() != Some(&s) {
                group.subjects.push(s);
            }
        }
    }

    fn subject_id(&mut self, s: &str) -> u32 {
        // Consecutive decisions are mostly about the same subject: check the last first.
        if let Some(last) = self.subjects.len().checked_sub(1) {
            if self.subjects[last] == s {
                return last as u32;
            }
        }
        if let Some(&id) = self.subject_ids.get(s) {
            return id;
        }
        let id = self.subjects.len() as u32;
        self.subjects.push(s.to_string());
        self.subject_ids.insert(s.to_string(), id);
        id
    }

    fn group(&mut self, key: FieldKey) -> u32 {
        if let Some(&g) = self.by_key.get(&key) {
            return g;
        }
        let g = self.groups.len() as u32;
        self.groups.push(Group {
            key,
            n: 0,
            paths: Vec::new(),
            folded: 0,
            subjects: Vec::new(),
        });
        self.by_key.insert(key, g);
        g
    }

    /// The id of a path template, `None` when the record already lists as many as it
    /// may.
    fn intern_path(&mut self, path: &str) -> Option<u32> {
        if let Some(&id) = self.path_ids.get(path) {
            return Some(id);
        }
        if self.paths.len() >= MAX_LOGGED_PATHS {
            return None;
        }
        let id = self.paths.len() as u32;
        self.paths.push(path.to_string());
        self.path_ids.insert(path.to_string(), id);
        Some(id)
    }

    fn add_slot(&mut self, g: u32, pid: u32, n: usize) {
        let key = self.groups[g as usize].key;
        match self.slots.get(&(key, pid)) {
            Some(&(_, slot)) => self.groups[g as usize].paths[slot as usize].1 += n,
            None => {
                let group = &mut self.groups[g as usize];
                self.slots.insert((key, pid), (g, group.paths.len() as u32));
                group.paths.push((pid, n));
            }
        }
    }

    /// Adds another report of the same message (its headers' to its body's, or the
    /// other way round): groups, paths and subjects are merged, in first-seen order.
    pub fn merge(&mut self, other: Report) {
        let subjects: Vec<u32> = other.subjects.iter().map(|s| self.subject_id(s)).collect();
        for og in other.groups {
            let g = self.group(og.key);
            for (pid, n) in og.paths {
                match self.intern_path(&other.paths[pid as usize]) {
                    Some(id) => self.add_slot(g, id, n),
                    None => self.groups[g as usize].folded += n,
                }
            }
            let group = &mut self.groups[g as usize];
            group.folded += og.folded;
            group.n += og.n;
            for s in og.subjects {
                let s = subjects[s as usize];
                if group.subjects.last() != Some(&s) {
                    group.subjects.push(s);
                }
            }
        }
        self.records += other.records;
        self.blocked.extend(other.blocked);
        if other.unread.is_some() {
            self.unread = other.unread;
        }
    }

    pub fn is_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    pub fn changed(&self) -> bool {
        self.groups.iter().any(|g| g.key.action != "allow")
    }

    /// Number of field decisions recorded.
    pub fn decisions(&self) -> usize {
        self.groups.iter().map(|g| g.n).sum()
    }

    /// Number of field decisions per action.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            *out.entry(g.key.action).or_default() += g.n;
        }
        out
    }

    /// Number of field decisions per (category index, action); an undeclared field
    /// counts under [`UNDECLARED`].
    pub fn by_category(&self) -> BTreeMap<(usize, &'static str), usize> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            *out.entry((g.key.category, g.key.action)).or_default() += g.n;
        }
        out
    }
}

/// What the header callback must fetch before it can judge.
#[derive(Debug, Clone, Default)]
pub struct HeaderPlan {
    /// Subjects whose consent must come from the consent store.
    pub store_subjects: Vec<String>,
}

/// Changes to a message's headers (and, for requests, its query).
#[derive(Debug, Clone, Default)]
pub struct HeaderVerdict {
    /// Header name and the values it must have from now on (empty: remove it).
    pub set_headers: Vec<(String, Vec<String>)>,
    /// The request's new `:path`, when a query parameter changed.
    pub new_path: Option<String>,
    pub report: Report,
}

#[derive(Debug, Clone)]
enum PathElem {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone)]
struct RecordInfo {
    path: Vec<PathElem>,
    subject: Option<String>,
    consent: Option<Value>,
}

/// A parsed body, its records located, waiting for consent answers.
#[derive(Debug, Clone)]
pub struct BodyPlan {
    doc: Option<Value>,
    binding: usize,
    /// The body's content codings, to encode a changed body again.
    codings: Vec<encoding::Coding>,
    records: Vec<RecordInfo>,
    /// Subjects whose consent must come from the consent store.
    pub store_subjects: Vec<String>,
}

/// The result for a body.
#[derive(Debug, Clone, Default)]
pub struct BodyVerdict {
    /// The new body, when any field changed.
    pub body: Option<Vec<u8>>,
    pub report: Report,
}

/// Whether a content type is JSON: `application/json`, `application/*+json`, with any
/// parameters, in any case.
fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn depth_exceeds(v: &Value, max: usize) -> bool {
    // serde_json bounds nesting at 128, so this recursion is bounded too.
    fn d(v: &Value, left: usize) -> bool {
        match v {
            Value::Array(a) => left == 0 || a.iter().any(|x| d(x, left - 1)),
            Value::Object(o) => left == 0 || o.values().any(|x| d(x, left - 1)),
            _ => false,
        }
    }
    d(v, max)
}

/// Follows a singular selector from `root`.
fn get_singular<'v>(sel: &Selector, root: &'v Value) -> Option<&'v Value> {
    use super::selector::Atom;
    let mut cur = root;
    for step in &sel.steps {
        cur = match (step.atoms.first()?, cur) {
            (Atom::Name(n), Value::Object(o)) => match o.get(n) {
                Some(v) => v,
                // Field names match in any case, so must the subject and consent paths:
                // `ID` is the subject when there is no `id` (one spelling only).
                None => {
                    let mut same = o.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n));
                    match (same.next(), same.next()) {
                        (Some((_, v)), None) => v,
                        _ => return None,
                    }
                }
            },
            (Atom::Index(i), Value::Array(a)) => {
                let idx = if *i >= 0 {
                    usize::try_from(*i).ok()?
                } else {
                    a.len()
                        .checked_sub(usize::try_from(i.unsigned_abs()).ok()?)?
                };
                a.get(idx)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

fn subject_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Finds every node `sel` selects from `root`, without descending into a found node.
fn find_all(sel: &Selector, root: &Value, limit: usize) -> Result<Vec<Vec<PathElem>>, usize> {
    fn go(
        sel: &Selector,
        v: &Value,
        states: &[usize],
        path: &mut Vec<PathElem>,
        out: &mut Vec<Vec<PathElem>>,
        limit: usize,
    ) -> Result<(), usize> {
        if states.iter().any(|&p| sel.is_complete(p)) {
            out.push(path.clone());
            if out.len() > limit {
                return Err(out.len());
            }
            return Ok(());
        }
        if states.is_empty() {
            return Ok(());
        }
        let mut next = Vec::new();
        match v {
            Value::Object(o) => {
                for (k, child) in o {
                    next.clear();
                    for &p in states {
                        sel.advance(p, Edge::Key(k), &mut |q| next.push(q));
                    }
                    if !next.is_empty() {
                        path.push(PathElem::Key(k.clone()));
                        let n = next.clone();
                        go(sel, child, &n, path, out, limit)?;
                        path.pop();
                    }
                }
            }
            Value::Array(a) => {
                let len = a.len();
                for (i, child) in a.iter().enumerate() {
                    next.clear();
                    for &p in states {
                        sel.advance(p, Edge::Index(i, len), &mut |q| next.push(q));
                    }
                    if !next.is_empty() {
                        path.push(PathElem::Index(i));
                        let n = next.clone();
                        go(sel, child, &n, path, out, limit)?;
                        path.pop();
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(sel, root, &[0], &mut Vec::new(), &mut out, limit)?;
    Ok(out)
}

fn get_path_mut<'v>(root: &'v mut Value, path: &[PathElem]) -> Option<&'v mut Value> {
    let mut cur = root;
    for e in path {
        cur = match (e, cur) {
            (PathElem::Key(k), Value::Object(o)) => o.get_mut(k)?,
            (PathElem::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn path_string(path: &[PathElem]) -> String {
    let mut s = String::from("$");
    for e in path {
        match e {
            PathElem::Key(k) => push_edge(&mut s, Edge::Key(k)),
            PathElem::Index(i) => push_edge(&mut s, Edge::Index(*i, 0)),
        }
    }
    s
}

/// The path template of a record: [`path_string`] with every index written `[*]`
/// (with [`Policy::exact_paths`], as written).
fn path_template(path: &[PathElem], exact: bool) -> String {
    let mut s = String::from("$");
    for e in path {
        match e {
            PathElem::Key(k) => push_edge(&mut s, Edge::Key(k)),
            PathElem::Index(i) => push_index(&mut s, *i, exact),
        }
    }
    s
}

/// Appends an array step to a path template: `[*]`, or `[i]` with
/// [`Policy::exact_paths`].
fn push_index(path: &mut String, i: usize, exact: bool) {
    if exact {
        push_edge(path, Edge::Index(i, 0));
    } else {
        path.push_str("[*]");
    }
}

/// Decides fields of one subject for one recipient.
struct Judge<'a> {
    policy: &'a Policy,
    recipient: Option<usize>,
    subject: Option<&'a str>,
    record_consent: Option<&'a Value>,
    header: Option<&'a HeaderConsent>,
    store: &'a StoreAnswers,
}

struct Verdict {
    allowed: bool,
    reason: Option<Reason>,
    purpose: Option<usize>,
    evidence: Option<Evidence>,
}

impl<'a> Judge<'a> {
    fn new(
        policy: &'a Policy,
        ex: &'a Exchange,
        direction: Direction,
        subject: Option<&'a str>,
        store: &'a StoreAnswers,
    ) -> Self {
        Judge {
            policy,
            recipient: ex.recipient(direction).service.map(|s| s.0),
            subject,
            record_consent: None,
            header: ex.header_consent.as_ref(),
            store,
        }
    }

    /// Whether the subject granted `key`, and the evidence for the answer.
    fn consent(&self, key: &str) -> (bool, Evidence) {
        if let Some(v) = self.record_consent.and_then(|c| c.get(key)) {
            return (granted(v) == Some(true), Evidence::Record);
        }
        let Some(subject) = self.subject else {
            return (false, Evidence::NoSubject);
        };
        if let Some(grants) = self.header.and_then(|h| h.grants(subject)) {
            return (grants.contains(key), Evidence::Header);
        }
        match self.store.get(subject) {
            Some(ConsentAnswer::Known(m)) => (m.get(key) == Some(&true), Evidence::Store),
            Some(ConsentAnswer::Unknown) => (false, Evidence::StoreUnknown),
            None => (false, Evidence::None),
        }
    }

    /// The rule: some purpose of the recipient allows the category, and its legal basis
    /// holds for this subject. Purposes are tried in the service's order.
    fn decide(&self, category: usize) -> Verdict {
        let Some(svc) = self.recipient else {
            return Verdict {
                allowed: false,
                reason: Some(Reason::NoPurpose),
                purpose: None,
                evidence: None,
            };
        };
        let candidates = &self.policy.services[svc].grants[category];
        let mut first_refusal: Option<(usize, Evidence)> = None;
        for &p in candidates {
            let purpose = &self.policy.purposes[p];
            match (&purpose.basis, &purpose.consent_key) {
                (LegalBasis::Consent, Some(key)) => {
                    let (ok, evidence) = self.consent(key);
                    if ok {
                        return Verdict {
                            allowed: true,
                            reason: None,
                            purpose: Some(p),
                            evidence: Some(evidence),
                        };
                    }
                    first_refusal.get_or_insert((p, evidence));
                }
                _ => {
                    return Verdict {
                        allowed: true,
                        reason: None,
                        purpose: Some(p),
                        evidence: None,
                    }
                }
            }
        }
        match first_refusal {
            Some((p, evidence)) => Verdict {
                allowed: false,
                reason: Some(Reason::NoConsent),
                purpose: Some(p),
                evidence: Some(evidence),
            },
            None => Verdict {
                allowed: false,
                reason: Some(Reason::NoPurpose),
                purpose: None,
                evidence: None,
            },
        }
    }

    /// The record key of a decision about `category`.
    fn decision(&self, category: usize, action: &'static str, v: &Verdict) -> FieldKey {
        FieldKey {
            category,
            action,
            reason: v.reason,
            purpose: v.purpose,
            evidence: v.evidence,
        }
    }

    /// Applies `action` to `node`; returns whether the node must be removed.
    fn apply(&self, node: &mut Value, action: &Action) -> bool {
        match action {
            Action::Strip => return true,
            Action::Redact => *node = Value::String(self.policy.redact_marker.clone()),
            Action::Hash => {
                // A policy with a hash action does not compile without the key.
                if let Some(k) = &self.policy.hash_key {
                    *node = hash_value(k, node);
                } else {
                    return true;
                }
            }
            Action::Mask(spec) => *node = mask_value(spec, node),
            Action::Block => {}
        }
        false
    }
}

/// Walks one record, deciding and applying as it goes.
struct RecordWalk<'a, 'r> {
    judge: Judge<'a>,
    binding: &'a CBinding,
    report: &'r mut Report,
    changed: bool,
}

impl RecordWalk<'_, '_> {
    /// Returns false when the node must be removed from its parent.
    fn visit(
        &mut self,
        node: &mut Value,
        state: &Cursor,
        mut covered: bool,
        path: &mut String,
    ) -> bool {
        let policy = self.judge.policy;
        let matcher = &self.binding.matcher;
        let mut worst: Option<&Action> = None;
        let mut matched_any = false;
        let mut pending: Vec<(usize, Verdict)> = Vec::new();
        // The fields whose selectors select this node, in field order, each once.
        for &f in matcher.complete(state) {
            let f = f as usize;
            let field = &self.binding.fields[f];
            matched_any = true;
            let v = self.judge.decide(field.category);
            if !v.allowed && worst.is_none_or(|w| field.action.severity() > w.severity()) {
                worst = Some(&field.action);
            }
            pending.push((f, v));
        }
        if matched_any {
            for (f, v) in &pending {
                let field = &self.binding.fields[*f];
                let action = if v.allowed {
                    "allow"
                } else {
                    worst.map(Action::as_str).unwrap_or("strip")
                };
                if !v.allowed && action == "block" {
                    let category = &policy.categories[field.category];
                    self.report.blocked.insert(category.clone());
                }
                let key = self.judge.decision(field.category, action, v);
                self.report.record(key, path, self.judge.subject);
            }
            if let Some(action) = worst {
                if *action != Action::Block {
                    self.changed = true;
                }
                return !self.judge.apply(node, action);
            }
            covered = true;
        }
        let undeclared_strip = policy.undeclared == Undeclared::Strip && !covered;
        let is_container = matches!(node, Value::Object(_) | Value::Array(_));
        if undeclared_strip && (state.is_dead() || !is_container) {
            let key = FieldKey {
                category: UNDECLARED,
                action: "strip",
                reason: Some(Reason::Undeclared),
                purpose: None,
                evidence: None,
            };
            self.report.record(key, path, self.judge.subject);
            self.changed = true;
            return false;
        }
        if state.is_dead() && !undeclared_strip && !covered {
            return true;
        }
        match node {
            Value::Object(map) => {
                map.retain(|k, child| {
                    let next = matcher.step(state, Edge::Key(k));
                    if next.is_dead() && !undeclared_strip {
                        return true;
                    }
                    let len = path.len();
                    push_edge(path, Edge::Key(k));
                    let keep = self.visit(child, &next, covered, path);
                    path.truncate(len);
                    keep
                });
            }
            Value::Array(items) => {
                let n = items.len();
                let mut i = 0;
                items.retain_mut(|child| {
                    let next = matcher.step(state, Edge::Index(i, n));
                    let keep = if next.is_dead() && !undeclared_strip {
                        true
                    } else {
                        let len = path.len();
                        push_index(path, i, policy.exact_paths);
                        let keep = self.visit(child, &next, covered, path);
                        path.truncate(len);
                        keep
                    };
                    i += 1;
                    keep
                });
            }
            _ => {}
        }
        true
    }
}

impl Policy {
    /// Names the upstream service from Envoy's cluster name, then the `:authority`.
    pub fn identify_upstream(&self, cluster: Option<&str>, authority: Option<&str>) -> Party {
        let by_cluster = cluster.and_then(|c| self.by_cluster.get(c));
        let by_authority = || {
            let a = authority?.to_ascii_lowercase();
            self.by_authority.get(&a).or_else(|| {
                let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(&a);
                self.by_authority.get(host)
            })
        };
        let found = match by_cluster {
            Some(&id) => Some((id, IdentitySource::Cluster)),
            None => by_authority().map(|&id| (id, IdentitySource::Authority)),
        };
        match found {
            Some((id, source)) => self.party(id, source),
            None => Party {
                service: None,
                label: format!(
                    "unknown(cluster={}, authority={})",
                    cluster.unwrap_or("-"),
                    authority.unwrap_or("-")
                ),
                source: IdentitySource::None,
            },
        }
    }

    /// Names the caller from its mTLS principal (SPIFFE URI SAN) and, with a single
    /// value, the caller header; see [`Policy::identify_caller_from`].
    pub fn identify_caller(&self, principal: Option<&str>, header: Option<&str>) -> Party {
        self.identify_caller_from(principal, header.as_slice())
    }

    /// Names the caller from its principal and the request's headers: every instance of
    /// the caller header, in any spelling of its name, is a claim
    /// ([`Policy::identify_caller_from`]).
    pub fn identify_caller_in(
        &self,
        principal: Option<&str>,
        headers: &[(String, String)],
    ) -> Party {
        let claims: Vec<&str> = match &self.caller_header {
            Some(h) => headers
                .iter()
                .filter(|(k, _)| route::header_name_eq(k, &h.name))
                .map(|(_, v)| v.as_str())
                .collect(),
            None => Vec::new(),
        };
        self.identify_caller_from(principal, &claims)
    }

    /// Names the caller. The mTLS principal decides: a known principal is its service,
    /// an unknown one is the unknown caller, whatever any header claims. Only a
    /// principal the policy lists in `identity.caller_header.trusted_from` (an edge
    /// gateway) may name another service with the caller header, and without a
    /// principal the header counts only where the policy sets `trust_plaintext`. A
    /// repeated header, or one naming no service of the policy, names nobody: the caller
    /// is then unknown, never the asserting gateway itself.
    pub fn identify_caller_from(&self, principal: Option<&str>, header: &[&str]) -> Party {
        let unknown = |label: String| Party {
            service: None,
            label,
            source: IdentitySource::None,
        };
        let claimed = |source: IdentitySource| -> Option<Party> {
            let (name, rest) = header.split_first()?;
            if !rest.is_empty() {
                return Some(unknown(format!(
                    "unknown(caller_header repeated {} times)",
                    header.len()
                )));
            }
            Some(match self.by_name.get(name.trim()) {
                Some(&id) => self.party(id, source),
                None => unknown(format!("unknown(caller_header={})", short(name.trim()))),
            })
        };
        let ch = self.caller_header.as_ref();
        match principal {
            Some(p) => match self.by_principal.get(p) {
                Some(&id) => {
                    let trusted = ch.is_some_and(|h| h.trusted_from.contains(&ServiceId(id)));
                    match trusted
                        .then(|| claimed(IdentitySource::TrustedHeader))
                        .flatten()
                    {
                        Some(party) => party,
                        None => self.party(id, IdentitySource::Principal),
                    }
                }
                None => unknown(format!("unknown(principal={})", short(p))),
            },
            None => match ch
                .filter(|h| h.trust_plaintext)
                .and_then(|_| claimed(IdentitySource::PlaintextHeader))
            {
                Some(party) => party,
                None => unknown("unknown(principal=-)".to_string()),
            },
        }
    }

    fn party(&self, id: usize, source: IdentitySource) -> Party {
        Party {
            service: Some(ServiceId(id)),
            label: self.services[id].name.clone(),
            source,
        }
    }

    /// Builds the exchange from the request's facts. `headers` are the request headers
    /// (names lower-case); the consent header is used only from a trusted caller, and
    /// ignored when it is repeated or malformed.
    pub fn exchange(
        &self,
        request_id: Option<String>,
        method: &str,
        path: &str,
        caller: Party,
        upstream: Party,
        headers: &[(String, String)],
    ) -> Exchange {
        let (canonical_path, bindings, route_refusal) =
            match self.route(method, path, upstream.service) {
                Ok(m) => (m.path, m.bindings, None),
                Err(problem) => (
                    route::lenient_path(path),
                    [None, None],
                    Some(Uninspectable::new(
                        UninspectableKind::UnsafePath,
                        format!("{problem}; the request path could not be matched safely against the policy's routes"),
                    )),
                ),
            };
        let mut ex = Exchange {
            request_id,
            method: method.to_string(),
            path: path.to_string(),
            canonical_path,
            route_refusal,
            caller,
            upstream,
            header_consent: None,
            header_consent_note: None,
            message_subject: None,
            bindings,
        };
        if let Some(h) = &self.consent_header {
            let values: Vec<&str> = headers
                .iter()
                .filter(|(k, _)| route::header_name_eq(k, &h.name))
                .map(|(_, v)| v.as_str())
                .collect();
            if !values.is_empty() {
                let trusted = ex.caller.service.is_some_and(|s| h.trusted.contains(&s));
                if !trusted {
                    ex.header_consent_note = Some(format!(
                        "{} ignored: caller {} is not trusted to send it",
                        h.name, ex.caller.label
                    ));
                } else if values.len() > 1 {
                    ex.header_consent_note = Some(format!(
                        "{} ignored: it appears {} times",
                        h.name,
                        values.len()
                    ));
                } else {
                    match HeaderConsent::parse(values[0]) {
                        Ok(c) => ex.header_consent = Some(c),
                        Err(e) => ex.header_consent_note = Some(format!("{} ignored: {e}", h.name)),
                    }
                }
            }
        }
        if let Some(b) = ex.binding(Direction::Request) {
            ex.message_subject = match self.message_subject(b) {
                Some(MessageSubject::Header(name)) => {
                    let mut vals = headers
                        .iter()
                        .filter(|(k, _)| route::header_name_eq(k, name))
                        .map(|(_, v)| v.trim());
                    match (vals.next(), vals.next()) {
                        // Two different subjects for one message: trust neither.
                        (Some(v), None) if !v.is_empty() => Some(v.to_string()),
                        _ => None,
                    }
                }
                Some(MessageSubject::Query(name)) => {
                    let mut vals = query_pairs(path)
                        .filter(|(k, _)| param_is(name, false, k))
                        .map(|(_, v)| v);
                    match (vals.next(), vals.next()) {
                        (Some(v), None) if !v.is_empty() => Some(v),
                        _ => None,
                    }
                }
                None => None,
            };
        }
        ex
    }

    fn needs_store(
        &self,
        ex: &Exchange,
        direction: Direction,
        subject: &str,
        record_consent: Option<&Value>,
    ) -> bool {
        if self.store.is_none() {
            return false;
        }
        let Some(svc) = ex.recipient(direction).service else {
            return false;
        };
        if !self.services[svc.0].has_consent_purpose {
            return false;
        }
        if ex
            .header_consent
            .as_ref()
            .is_some_and(|h| h.grants(subject).is_some())
        {
            return false;
        }
        // The record answers every consent key the recipient could use.
        let keys = self.services[svc.0]
            .grants
            .iter()
            .flatten()
            .filter_map(|&p| self.purposes[p].consent_key.as_deref());
        let mut all_answered = true;
        for k in keys {
            if record_consent.and_then(|c| c.get(k)).is_none() {
                all_answered = false;
                break;
            }
        }
        !all_answered
    }

    /// Where a subject's consent lives in the cross-VM cache: a slot key and the id the
    /// entry must carry. The cache is direct-mapped onto [`CONSENT_CACHE_SLOTS`] slots,
    /// because Envoy's shared data has no eviction: one key per subject would grow
    /// without bound. The id is a keyed pseudonym, so raw customer ids never sit in
    /// shared memory, and a slot taken over by another subject is simply a miss.
    pub fn cache_slot(&self, subject: &str) -> (String, String) {
        let id = match &self.subject_key {
            Some(k) => subject_pseudonym(k, subject),
            None => subject.to_string(),
        };
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let slot = hash % CONSENT_CACHE_SLOTS;
        (format!("consentry/consent/{}/{slot}", self.name), id)
    }

    /// Which consent-store answers the header phase needs.
    pub fn plan_headers(
        &self,
        ex: &Exchange,
        direction: Direction,
        headers: &[(String, String)],
    ) -> HeaderPlan {
        let mut plan = HeaderPlan::default();
        let Some(b) = ex.binding(direction) else {
            return plan;
        };
        let binding = &self.bindings[b.0];
        let has_header_data = binding
            .headers
            .iter()
            .any(|h| headers.iter().any(|(k, _)| h.is_header(k)));
        let has_query_data = direction == Direction::Request
            && binding
                .query
                .iter()
                .any(|q| query_pairs(&ex.path).any(|(k, _)| q.is_param(&k)));
        if has_header_data || has_query_data {
            if let Some(s) = &ex.message_subject {
                if self.needs_store(ex, direction, s, None) {
                    plan.store_subjects.push(s.clone());
                }
            }
        }
        plan
    }

    /// Decides the customer data in headers and query parameters.
    pub fn judge_headers(
        &self,
        ex: &Exchange,
        direction: Direction,
        headers: &[(String, String)],
        store: &StoreAnswers,
    ) -> HeaderVerdict {
        let mut verdict = HeaderVerdict::default();
        let Some(b) = ex.binding(direction) else {
            return verdict;
        };
        let binding = &self.bindings[b.0];
        let judge = Judge::new(self, ex, direction, ex.message_subject.as_deref(), store);
        for h in &binding.headers {
            // Every instance, in every spelling of the name (`x_customer_email` too).
            let found: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(k, _)| h.is_header(k))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if found.is_empty() {
                continue;
            }
            let values: Vec<&str> = found.iter().map(|(_, v)| *v).collect();
            let (new_values, changed) =
                self.judge_named(&judge, h, "header", &values, &mut verdict.report);
            if changed {
                // Each spelling, in order of first appearance, keeps its own instances'
                // new values. (Not sorted: a sort would cost the .wasm ~10 KB of code.)
                let mut spellings: Vec<&str> = Vec::new();
                for (k, _) in &found {
                    if !spellings.contains(k) {
                        spellings.push(k);
                    }
                }
                for spelling in spellings {
                    let mine = found
                        .iter()
                        .zip(&new_values)
                        .filter(|((k, _), _)| *k == spelling)
                        .filter_map(|(_, nv)| nv.clone())
                        .collect();
                    verdict.set_headers.push((spelling.to_string(), mine));
                }
            }
        }
        if direction == Direction::Request && !binding.query.is_empty() {
            let (base, query) = match ex.path.split_once('?') {
                Some((b, q)) => (b, q),
                None => (ex.path.as_str(), ""),
            };
            let mut out = String::new();
            let mut changed_any = false;
            let push = |out: &mut String, sep: Option<char>, text: &str| {
                if !out.is_empty() {
                    out.push(sep.unwrap_or('&'));
                }
                out.push_str(text);
            };
            for p in route::query_params(query) {
                match binding.query.iter().find(|q| q.is_param(p.raw_name())) {
                    Some(q) => {
                        let value = percent_decode(p.raw_value());
                        let (new, changed) = self.judge_named(
                            &judge,
                            q,
                            "query",
                            &[value.as_str()],
                            &mut verdict.report,
                        );
                        if changed {
                            changed_any = true;
                            if let Some(Some(nv)) = new.first() {
                                let text = format!("{}={}", p.raw_name(), percent_encode(nv));
                                push(&mut out, p.sep, &text);
                            }
                        } else {
                            push(&mut out, p.sep, p.raw);
                        }
                    }
                    None => push(&mut out, p.sep, p.raw),
                }
            }
            if changed_any {
                verdict.new_path = Some(if out.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{out}")
                });
            }
        }
        verdict
    }

    /// Decides one header or query parameter with all its values. When it changed, the
    /// new value of each (`None`: removed), in order.
    fn judge_named(
        &self,
        judge: &Judge<'_>,
        n: &CNamed,
        what: &str,
        values: &[&str],
        report: &mut Report,
    ) -> (Vec<Option<String>>, bool) {
        let v = judge.decide(n.category);
        let path = format!("{what}:{}", n.name);
        if v.allowed {
            report.record(
                judge.decision(n.category, "allow", &v),
                &path,
                judge.subject,
            );
            return (Vec::new(), false);
        }
        let action = n.action.as_str();
        report.record(judge.decision(n.category, action, &v), &path, judge.subject);
        if n.action == Action::Block {
            report.blocked.insert(self.categories[n.category].clone());
            return (Vec::new(), false);
        }
        let mut out = Vec::new();
        for value in values {
            let mut node = Value::String((*value).to_string());
            out.push((!judge.apply(&mut node, &n.action)).then(|| match node {
                Value::String(s) => s,
                other => other.to_string(),
            }));
        }
        (out, true)
    }

    /// Parses a body and locates its records. `Ok` with no records when there is
    /// nothing to inspect.
    pub fn plan_body(
        &self,
        ex: &Exchange,
        direction: Direction,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<BodyPlan, Uninspectable> {
        let Some(b) = ex.binding(direction) else {
            return Ok(BodyPlan {
                doc: None,
                binding: 0,
                codings: Vec::new(),
                records: Vec::new(),
                store_subjects: Vec::new(),
            });
        };
        let mut plan = BodyPlan {
            doc: None,
            binding: b.0,
            codings: Vec::new(),
            records: Vec::new(),
            store_subjects: Vec::new(),
        };
        if body.is_empty() {
            return Ok(plan);
        }
        if body.len() > self.max_body_bytes {
            return Err(Uninspectable::new(
                UninspectableKind::TooLarge,
                format!(
                    "body of {} bytes is over the policy's limit of {} bytes",
                    body.len(),
                    self.max_body_bytes
                ),
            ));
        }
        let codings = encoding::codings(content_encoding.unwrap_or("")).map_err(|e| match e {
            encoding::DecodeError::Unsupported(c) => Uninspectable::new(
                UninspectableKind::UnsupportedEncoding,
                format!("content-encoding `{c}` is not decoded by this filter (it reads gzip and deflate); send the body uncompressed or with one of those"),
            ),
            other => Uninspectable::new(UninspectableKind::UnsupportedEncoding, format!("{other:?}")),
        })?;
        let decoded;
        let body = if codings.is_empty() {
            body
        } else {
            decoded =
                encoding::decode(body, &codings, self.max_body_bytes).map_err(|e| match e {
                    encoding::DecodeError::TooLarge => Uninspectable::new(
                        UninspectableKind::TooLarge,
                        format!(
                            "the decompressed body is over the policy's limit of {} bytes",
                            self.max_body_bytes
                        ),
                    ),
                    encoding::DecodeError::Corrupt(m) => Uninspectable::new(
                        UninspectableKind::Malformed,
                        format!("the body does not decode as its content-encoding says: {m}"),
                    ),
                    encoding::DecodeError::Unsupported(c) => {
                        Uninspectable::new(UninspectableKind::UnsupportedEncoding, c)
                    }
                })?;
            plan.codings = codings;
            &decoded[..]
        };
        match content_type {
            Some(ct) if is_json_content_type(ct) => {}
            Some(ct) => {
                return Err(Uninspectable::new(
                    UninspectableKind::UnsupportedMediaType,
                    format!("content-type `{}` is not JSON; this path carries customer data and must be sent as application/json", short(ct)),
                ))
            }
            None => {
                return Err(Uninspectable::new(
                    UninspectableKind::UnsupportedMediaType,
                    "the body has no content-type; this path carries customer data and must be sent as application/json",
                ))
            }
        }
        let doc: Value = super::strict_json::parse(body).map_err(|e| match e {
            StrictError::Syntax { too_deep: true, .. } => Uninspectable::new(
                UninspectableKind::TooDeep,
                format!(
                    "JSON nests deeper than the policy's limit of {}",
                    self.max_depth
                ),
            ),
            StrictError::Syntax { message, .. } => Uninspectable::new(
                UninspectableKind::Malformed,
                format!("body is not valid JSON: {message}"),
            ),
            dup @ StrictError::DuplicateKey { .. } => Uninspectable::new(
                UninspectableKind::Ambiguous,
                format!(
                    "{dup}; parsers disagree on which value counts, so the body cannot be judged"
                ),
            ),
        })?;
        if depth_exceeds(&doc, self.max_depth) {
            return Err(Uninspectable::new(
                UninspectableKind::TooDeep,
                format!(
                    "JSON nests deeper than the policy's limit of {}",
                    self.max_depth
                ),
            ));
        }
        let binding = &self.bindings[b.0];
        let paths = find_all(&binding.records, &doc, self.max_records).map_err(|n| {
            Uninspectable::new(
                UninspectableKind::TooManyRecords,
                format!("more than {} records (found at least {n}); split the batch or raise limits.max_records", self.max_records),
            )
        })?;
        if let Some(why) = self.shape_problem(binding, &doc, &paths) {
            let mut refusal = Uninspectable::new(UninspectableKind::ShapeMismatch, why);
            refusal.tolerated = binding.shape_mismatch == ShapeMismatch::Pass;
            return Err(refusal);
        }
        for path in paths {
            let Some(record) = get_path_mut_ref(&doc, &path) else {
                continue;
            };
            let subject = binding
                .subject
                .as_ref()
                .and_then(|s| get_singular(s, record))
                .and_then(subject_of);
            let consent = binding
                .consent
                .as_ref()
                .and_then(|s| get_singular(s, record))
                .filter(|v| v.is_object())
                .cloned();
            if let Some(s) = &subject {
                if !plan.store_subjects.contains(s)
                    && self.needs_store(ex, direction, s, consent.as_ref())
                {
                    plan.store_subjects.push(s.clone());
                }
            }
            plan.records.push(RecordInfo {
                path,
                subject,
                consent,
            });
        }
        plan.doc = Some(doc);
        Ok(plan)
    }

    /// Why a body does not have its binding's shape, if it does not. A body has it when
    /// `records` finds records that can hold what the binding declares (objects, `null`
    /// or empty arrays; any array where a selector starts with an index or a wildcard;
    /// anything with `undeclared: strip`, which removes what it does not judge), or when
    /// it finds none because the batch is empty: the deepest part of the records path
    /// that exists in the body selects only empty containers (`{"customers": []}`, or
    /// `{}`, `[]`, `null` as the whole body). Anything else (a renamed envelope, a bare
    /// record, a top-level array, a list of strings) would carry its data past the
    /// policy unjudged.
    fn shape_problem(
        &self,
        binding: &CBinding,
        doc: &Value,
        records: &[Vec<PathElem>],
    ) -> Option<String> {
        let records_path = &binding.records.source;
        let mismatch = || {
            format!("the body has no records at `{records_path}` and is not an empty batch, so the data in it would pass unjudged; send the records where binding `{}` expects them, or have the policy bind this shape", binding.name)
        };
        if records.is_empty() && !binding.records.steps.iter().any(|s| s.descendant) {
            return (!empty_batch(doc, &binding.records.steps)).then(mismatch);
        }
        if records.is_empty() {
            // With a `..` step the records may be anywhere: the deepest part of the path
            // that is in the body must select only empty containers.
            for prefix in &binding.records_prefixes {
                let nodes = find_all(prefix, doc, self.max_records).unwrap_or_else(|_| vec![]);
                if nodes.is_empty() {
                    continue;
                }
                let empty = |v: &Value| match v {
                    Value::Null => true,
                    Value::Array(a) => a.is_empty(),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                let all_empty = nodes
                    .iter()
                    .all(|p| get_path_mut_ref(doc, p).is_some_and(empty));
                return (!all_empty).then(mismatch);
            }
            return None;
        }
        // With `undeclared: strip` whatever a record holds is judged or removed.
        if self.undeclared == Undeclared::Strip {
            return None;
        }
        for p in records {
            let ok = match get_path_mut_ref(doc, p) {
                None | Some(Value::Null | Value::Object(_)) => true,
                Some(Value::Array(a)) => a.is_empty() || !binding.records_are_objects,
                Some(_) => false,
            };
            if !ok {
                return Some(format!("a record at `{}` is not a JSON object, so binding `{}` cannot judge what it holds; send each record as an object", path_string(p), binding.name));
            }
        }
        None
    }

    /// Decides every record of a planned body and applies the actions.
    pub fn judge_body(
        &self,
        ex: &Exchange,
        direction: Direction,
        plan: BodyPlan,
        store: &StoreAnswers,
    ) -> BodyVerdict {
        let mut verdict = BodyVerdict::default();
        let Some(mut doc) = plan.doc else {
            return verdict;
        };
        let binding = &self.bindings[plan.binding];
        let mut changed = false;
        let initial = binding.matcher.start();
        for rec in &plan.records {
            let Some(node) = get_path_mut(&mut doc, &rec.path) else {
                continue;
            };
            let mut judge = Judge::new(self, ex, direction, rec.subject.as_deref(), store);
            judge.record_consent = rec.consent.as_ref();
            verdict.report.records += 1;
            let mut path = path_template(&rec.path, self.exact_paths);
            let mut walk = RecordWalk {
                judge,
                binding,
                report: &mut verdict.report,
                changed: false,
            };
            let keep = walk.visit(node, &initial, false, &mut path);
            changed |= walk.changed;
            if !keep {
                // The record itself was removed: it stays in place as `null`, so the
                // positions of the other records do not shift.
                *node = Value::Null;
            }
        }
        if changed {
            // A Value with string keys always serialises; the encoders write to memory.
            let json = serde_json::to_vec(&doc).unwrap_or_default();
            verdict.body = Some(encoding::encode(&json, &plan.codings).unwrap_or(json));
        }
        verdict
    }

    /// The log entry for one message. `failure` is set for an uninspectable message.
    pub fn decision_log(
        &self,
        ex: &Exchange,
        direction: Direction,
        report: &Report,
        failure: Option<&Uninspectable>,
        time_ms: u64,
    ) -> DecisionLog {
        let outcome = if failure.is_some() {
            Outcome::Uninspectable
        } else if report.is_blocked() {
            Outcome::Blocked
        } else if report.changed() {
            Outcome::Modified
        } else {
            Outcome::Allowed
        };
        let enforced = self.mode == Mode::Enforce
            && !failure.is_some_and(|f| f.tolerated || self.fail == FailMode::Open);
        let status = match (enforced, failure, outcome) {
            (true, Some(f), _) => Some(f.status(direction)),
            (true, None, Outcome::Blocked) => Some(403),
            _ => None,
        };
        let mut detail = failure.map(|f| format!("{}: {}", f.code(), f.detail));
        if let Some(note) = &ex.header_consent_note {
            detail = Some(match detail {
                Some(d) => format!("{d}; {note}"),
                None => note.clone(),
            });
        }
        let (subjects, decisions) = self.render_decisions(ex, direction, report);
        let category_counts = report
            .by_category()
            .into_iter()
            .map(|((c, action), n)| (self.category_name(c).to_string(), action, n))
            .collect();
        DecisionLog {
            v: RECORD_VERSION,
            time: super::decision::rfc3339_utc(time_ms),
            request_id: ex.request_id.clone(),
            policy: self.name.clone(),
            binding: ex
                .binding(direction)
                .map(|b| self.binding_name(b).to_string()),
            path: ex
                .binding(direction)
                .map(|b| self.logged_path(b, &ex.canonical_path)),
            caller: ex.caller.label.clone(),
            caller_identity: ex.caller.source.as_str(),
            recipient: ex.recipient(direction).label.clone(),
            direction: direction.as_str(),
            mode: match self.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            },
            outcome,
            enforced,
            status,
            detail,
            blocked_categories: report.blocked.iter().cloned().collect(),
            inspected: report.unread.is_none(),
            allowed_categories: report.unread.clone().unwrap_or_default(),
            records: report.records,
            subjects,
            decisions,
            counts: report.counts(),
            category_counts,
        }
    }

    fn category_name(&self, c: usize) -> &str {
        match self.categories.get(c) {
            Some(name) => name,
            None => "undeclared",
        }
    }

    /// The subjects (pseudonyms, each computed once) and the decision groups of a
    /// report, as the record writes them.
    fn render_decisions(
        &self,
        ex: &Exchange,
        direction: Direction,
        report: &Report,
    ) -> (Vec<String>, Vec<DecisionGroup>) {
        // Without a subject key no pseudonym can be made, and raw ids are never logged.
        let subjects: Vec<String> = match &self.subject_key {
            Some(k) => report
                .subjects
                .iter()
                .map(|s| subject_pseudonym(k, s))
                .collect(),
            None => Vec::new(),
        };
        let consent_path = ex
            .binding(direction)
            .and_then(|b| self.bindings[b.0].consent.as_ref())
            .map(|s| s.source.as_str())
            .unwrap_or("$");
        let header_name = self.consent_header().unwrap_or("consent-header");
        let groups = report
            .groups
            .iter()
            .map(|g| {
                let purpose = g.key.purpose.map(|p| &self.purposes[p]);
                let evidence = g.key.evidence.map(|e| match e {
                    Evidence::Record => format!(
                        "record:{consent_path}.{}",
                        purpose.and_then(|p| p.consent_key.as_deref()).unwrap_or("")
                    ),
                    Evidence::Header => format!("header:{header_name}"),
                    Evidence::Store => "store".to_string(),
                    Evidence::StoreUnknown => "store:unknown_subject".to_string(),
                    Evidence::None => "none".to_string(),
                    Evidence::NoSubject => "none:no_subject".to_string(),
                });
                let mut ids: Vec<usize> = if subjects.is_empty() {
                    Vec::new()
                } else {
                    g.subjects.iter().map(|&s| s as usize).collect()
                };
                ids.sort_unstable();
                ids.dedup();
                DecisionGroup {
                    category: self.category_name(g.key.category).to_string(),
                    action: g.key.action,
                    reason: g.key.reason,
                    purpose: purpose.map(|p| p.name.clone()),
                    basis: purpose.map(|p| p.basis.as_str()),
                    evidence,
                    paths: g
                        .paths
                        .iter()
                        .map(|&(pid, _)| report.paths[pid as usize].clone())
                        .collect(),
                    folded: g.folded,
                    n: g.n,
                    subjects: ids,
                }
            })
            .collect();
        (subjects, groups)
    }

    /// The JSON body of a 403 for a blocked message: names the policy and the
    /// categories, never a value.
    pub fn block_response(&self, ex: &Exchange, direction: Direction, report: &Report) -> Vec<u8> {
        serde_json::json!({
            "error": "consentry_blocked",
            "policy": self.name,
            "direction": direction.as_str(),
            "recipient": ex.recipient(direction).label,
            "categories": report.blocked,
            "request_id": ex.request_id,
        })
        .to_string()
        .into_bytes()
    }

    /// The JSON body of a refusal for an uninspectable message.
    pub fn uninspectable_response(
        &self,
        ex: &Exchange,
        direction: Direction,
        failure: &Uninspectable,
    ) -> Vec<u8> {
        serde_json::json!({
            "error": "consentry_uninspectable",
            "policy": self.name,
            "direction": direction.as_str(),
            "reason": failure.code(),
            "detail": failure.detail,
            "request_id": ex.request_id,
        })
        .to_string()
        .into_bytes()
    }
}

/// Whether `node`, in which the record path `steps` (no `..` among them) finds no record,
/// is an empty batch: every branch of the path ends in an empty container (or `null`)
/// before it ends, never at a member that is not there or at a scalar.
fn empty_batch(node: &Value, steps: &[super::selector::Step]) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return true;
    };
    let selects = |edge: Edge<'_>| step.atoms.iter().any(|a| a.matches(edge));
    let children: Vec<&Value> = match node {
        Value::Null => return true,
        Value::Array(a) if a.is_empty() => return true,
        Value::Object(o) if o.is_empty() => return true,
        Value::Array(a) => a
            .iter()
            .enumerate()
            .filter(|(i, _)| selects(Edge::Index(*i, a.len())))
            .map(|(_, v)| v)
            .collect(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| selects(Edge::Key(k)))
            .map(|(_, v)| v)
            .collect(),
        _ => return false,
    };
    !children.is_empty() && children.iter().all(|c| empty_batch(c, rest))
}

fn get_path_mut_ref<'v>(root: &'v Value, path: &[PathElem]) -> Option<&'v Value> {
    let mut cur = root;
    for e in path {
        cur = match (e, cur) {
            (PathElem::Key(k), Value::Object(o)) => o.get(k)?,
            (PathElem::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// `(raw name, decoded value)` of each parameter of a path's query, split on `&` and
/// `;` ([`route::query_params`]); names are compared with [`param_is`].
fn query_pairs(path: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let q = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    route::query_params(q)
        .into_iter()
        .map(|p| (p.raw_name().to_string(), percent_decode(p.raw_value())))
}

/// A header value quoted in an error, cut short.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
