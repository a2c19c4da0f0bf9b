//! The per-message path: identify the parties, find the records, decide every field,
//! apply the actions. Nothing here parses the policy or a JSONPath again.

use super::actions::{hash_value, mask_value, percent_decode, percent_encode, pseudonym};
use super::compile::{param_is, Action, CBinding, CNamed, Policy};
use super::consent::{granted, ConsentAnswer, HeaderConsent, StoreAnswers};
use super::decision::{
    DecisionGroup, DecisionLog, Grant, Outcome, Reason, MAX_LOGGED_PATHS, RECORD_VERSION,
};
use super::encoding;
use super::policy::{FailMode, LegalBasis, MessageSubject, Mode, ShapeMismatch, Undeclared};
use super::route;
use super::selector::{push_edge, Edge};
use super::stream::{self, ScanError};
use super::{BindingId, Direction, ServiceId};
use serde_json::Value;
use std::borrow::Cow;
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

/// Maps keyed by what the policy decides (group keys, template ids), never by traffic
/// alone, need no SipHash: the matcher's cheap hasher. Subjects and templates, which
/// traffic spells, keep the default.
type PolicyKeyed = std::hash::BuildHasherDefault<super::matcher::SetHasher>;

/// The field decisions of one message, aggregated as they are recorded: groups by
/// [`FieldKey`], path templates and raw subjects interned. Nothing is built per field
/// beyond a few hash look-ups; names, evidence strings and subject pseudonyms are made
/// once per group or subject, in [`Policy::decision_log`]. Raw subjects live here only
/// and are never logged.
#[derive(Debug, Clone, Default)]
pub struct Report {
    groups: Vec<Group>,
    /// (key, path template id) -> (group, slot in the group's `paths`).
    slots: HashMap<(FieldKey, u32), (u32, u32), PolicyKeyed>,
    /// Group by key (for decisions whose path is folded, and for merges).
    by_key: HashMap<FieldKey, u32, PolicyKeyed>,
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

/// A body read and its records located, waiting for consent answers.
#[derive(Debug, Clone)]
pub struct BodyPlan {
    /// The binding that covers the body; `None`: nothing to inspect.
    binding: Option<usize>,
    /// The body, decoded from its content codings.
    body: Vec<u8>,
    /// The body's content codings, to encode a changed body again.
    codings: Vec<encoding::Coding>,
    records: Vec<stream::Record>,
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

/// Appends an array step to a path template: `[*]`, or `[i]` with
/// [`Policy::exact_paths`].
pub(crate) fn push_index(path: &mut String, i: usize, exact: bool) {
    if exact {
        push_edge(path, Edge::Index(i, 0));
    } else {
        path.push_str("[*]");
    }
}

/// Decides fields of one subject for one recipient.
pub(crate) struct Judge<'a> {
    pub(crate) policy: &'a Policy,
    recipient: Option<usize>,
    pub(crate) subject: Option<&'a str>,
    pub(crate) record_consent: Option<&'a Value>,
    header: Option<&'a HeaderConsent>,
    store: &'a StoreAnswers,
}

pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    reason: Option<Reason>,
    purpose: Option<usize>,
    evidence: Option<Evidence>,
}

impl<'a> Judge<'a> {
    pub(crate) fn new(
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
    pub(crate) fn decide(&self, category: usize) -> Verdict {
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
    pub(crate) fn decision(&self, category: usize, action: &'static str, v: &Verdict) -> FieldKey {
        FieldKey {
            category,
            action,
            reason: v.reason,
            purpose: v.purpose,
            evidence: v.evidence,
        }
    }

    /// Decides a node that the fields `complete` (indexes into the binding's fields, in
    /// field order) select, records each field's decision, and returns the action to
    /// apply: the most severe of the denying fields' actions, or `None` when every field
    /// allows the node. Both walks, the streaming one and the tree oracle, decide a node
    /// here; they differ only in how they read and change it.
    pub(crate) fn decide_node<'b>(
        &self,
        binding: &'b CBinding,
        complete: &[u32],
        path: &str,
        report: &mut Report,
    ) -> Option<&'b Action> {
        let mut worst: Option<&Action> = None;
        // One field per node is the common case: it needs no vector.
        let mut one = None;
        let mut more = Vec::new();
        for &f in complete {
            let field = &binding.fields[f as usize];
            let v = self.decide(field.category);
            if !v.allowed && worst.is_none_or(|w| field.action.severity() > w.severity()) {
                worst = Some(&field.action);
            }
            match one {
                None => one = Some((f as usize, v)),
                Some(_) => more.push((f as usize, v)),
            }
        }
        for (f, v) in one.iter().chain(&more) {
            let field = &binding.fields[*f];
            let action = if v.allowed {
                "allow"
            } else {
                worst.map(Action::as_str).unwrap_or("strip")
            };
            if !v.allowed && action == "block" {
                report
                    .blocked
                    .insert(self.policy.categories[field.category].clone());
            }
            report.record(self.decision(field.category, action, v), path, self.subject);
        }
        worst
    }

    /// Applies `action` to `node`; returns whether the node must be removed. `null`
    /// holds no personal data: every action but `strip` leaves it as it is.
    pub(crate) fn apply(&self, node: &mut Value, action: &Action) -> bool {
        match action {
            Action::Strip => return true,
            _ if node.is_null() => {}
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

    pub(crate) fn needs_store(
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
            Some(k) => pseudonym(k, subject),
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

    /// Checks a body's size, content coding and media type, and decodes it.
    pub(crate) fn prepare_body<'b>(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: Cow<'b, [u8]>,
    ) -> Result<(Cow<'b, [u8]>, Vec<encoding::Coding>), Uninspectable> {
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
        let body = if codings.is_empty() {
            body
        } else {
            Cow::Owned(
                encoding::decode(&body, &codings, self.max_body_bytes).map_err(|e| match e {
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
                })?,
            )
        };
        match content_type {
            Some(ct) if is_json_content_type(ct) => Ok((body, codings)),
            Some(ct) => Err(Uninspectable::new(
                UninspectableKind::UnsupportedMediaType,
                format!("content-type `{}` is not JSON; this path carries customer data and must be sent as application/json", short(ct)),
            )),
            None => Err(Uninspectable::new(
                UninspectableKind::UnsupportedMediaType,
                "the body has no content-type; this path carries customer data and must be sent as application/json",
            )),
        }
    }

    /// Reads a body and locates its records: one pass over the bytes that checks them
    /// as a strict parser would and finds every record with its subject and consent,
    /// without building a tree ([`stream::scan`]). `Ok` with no records when there is
    /// nothing to inspect. The plan keeps the (decoded) body for [`Policy::judge_body`].
    pub fn plan_body(
        &self,
        ex: &Exchange,
        direction: Direction,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<BodyPlan, Uninspectable> {
        self.plan_body_cow(ex, direction, content_type, content_encoding, body.into())
    }

    /// [`Policy::plan_body`] of a body the caller hands over (no copy is made of it).
    pub fn plan_body_owned(
        &self,
        ex: &Exchange,
        direction: Direction,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: Vec<u8>,
    ) -> Result<BodyPlan, Uninspectable> {
        self.plan_body_cow(ex, direction, content_type, content_encoding, body.into())
    }

    fn plan_body_cow(
        &self,
        ex: &Exchange,
        direction: Direction,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: Cow<'_, [u8]>,
    ) -> Result<BodyPlan, Uninspectable> {
        let mut plan = BodyPlan {
            binding: ex.binding(direction).map(|b| b.0),
            body: Vec::new(),
            codings: Vec::new(),
            records: Vec::new(),
            store_subjects: Vec::new(),
        };
        let Some(b) = plan.binding else {
            return Ok(plan);
        };
        if body.is_empty() {
            plan.binding = None;
            return Ok(plan);
        }
        let (body, codings) = self.prepare_body(content_type, content_encoding, body)?;
        let binding = &self.bindings[b];
        let scanned = stream::scan(
            &body,
            binding,
            self.max_depth,
            self.max_records,
            self.exact_paths,
        )
        .map_err(|e| self.unreadable(e))?;
        if scanned.too_deep {
            return Err(self.unreadable(ScanError::TooDeep));
        }
        if let Some(n) = scanned.too_many {
            return Err(Uninspectable::new(
                UninspectableKind::TooManyRecords,
                format!("more than {} records (found at least {n}); split the batch or raise limits.max_records", self.max_records),
            ));
        }
        if let Some(why) = self.stream_shape_problem(binding, &scanned) {
            let mut refusal = Uninspectable::new(UninspectableKind::ShapeMismatch, why);
            refusal.tolerated = binding.shape_mismatch == ShapeMismatch::Pass;
            return Err(refusal);
        }
        let mut records = scanned.records;
        // A record's consent object is read only for a recipient with a consent purpose
        // (the decisions and store lookups of any other never look at it): parsed for
        // those alone.
        let reads_consent = ex
            .recipient(direction)
            .service
            .is_some_and(|s| self.services[s.0].has_consent_purpose);
        if reads_consent {
            let mut asked = std::collections::HashSet::new();
            for rec in &mut records {
                rec.consent = rec
                    .consent_span
                    .and_then(|(s, e)| serde_json::from_slice::<Value>(&body[s..e]).ok())
                    .filter(Value::is_object);
                if let Some(s) = &rec.subject {
                    if !asked.contains(s.as_str())
                        && self.needs_store(ex, direction, s, rec.consent.as_ref())
                    {
                        asked.insert(s.as_str());
                        plan.store_subjects.push(s.clone());
                    }
                }
            }
        }
        plan.records = records;
        plan.codings = codings;
        plan.body = body.into_owned();
        Ok(plan)
    }

    /// The refusal of a body the scan could not read.
    pub(crate) fn unreadable(&self, e: ScanError) -> Uninspectable {
        match e {
            ScanError::TooDeep => Uninspectable::new(
                UninspectableKind::TooDeep,
                format!(
                    "JSON nests deeper than the policy's limit of {}",
                    self.max_depth
                ),
            ),
            ScanError::Malformed(m) => Uninspectable::new(
                UninspectableKind::Malformed,
                format!("body is not valid JSON: {m}"),
            ),
            ScanError::Duplicate(key) => Uninspectable::new(
                UninspectableKind::Ambiguous,
                format!(
                    "the key `{key}` appears twice in one object; parsers disagree on which value counts, so the body cannot be judged"
                ),
            ),
        }
    }

    /// Why a scanned body does not have its binding's shape, if it does not. A body has
    /// it when `records` finds records that can hold what the binding declares (objects,
    /// `null` or empty arrays; any array where a selector starts with an index or a
    /// wildcard; anything with `undeclared: strip`, which removes what it does not
    /// judge), or when it finds none because the batch is empty: the deepest part of the
    /// records path that exists in the body selects only empty containers
    /// (`{"customers": []}`, or `{}`, `[]`, `null` as the whole body). Anything else (a
    /// renamed envelope, a bare record, a top-level array, a list of strings) would carry
    /// its data past the policy unjudged.
    fn stream_shape_problem(
        &self,
        binding: &CBinding,
        scanned: &stream::Scanned,
    ) -> Option<String> {
        if scanned.records.is_empty() {
            return (!scanned.empty_batch).then(|| {
                format!("the body has no records at `{}` and is not an empty batch, so the data in it would pass unjudged; send the records where binding `{}` expects them, or have the policy bind this shape", binding.records.source, binding.name)
            });
        }
        // With `undeclared: strip` whatever a record holds is judged or removed.
        if self.undeclared == Undeclared::Strip {
            return None;
        }
        let bad = scanned
            .records
            .iter()
            .find(|r| !r.shape_ok(binding.records_are_objects))?;
        Some(format!("a record at `{}` is not a JSON object, so binding `{}` cannot judge what it holds; send each record as an object", bad.path, binding.name))
    }

    /// Decides every record of a planned body and applies the actions, in one pass over
    /// the body's bytes ([`stream::rewrite`]).
    pub fn judge_body(
        &self,
        ex: &Exchange,
        direction: Direction,
        plan: BodyPlan,
        store: &StoreAnswers,
    ) -> BodyVerdict {
        let mut verdict = BodyVerdict::default();
        let Some(b) = plan.binding else {
            return verdict;
        };
        let binding = &self.bindings[b];
        let new_body = stream::rewrite(
            self,
            binding,
            &plan.body,
            &plan.records,
            |rec| {
                let mut judge = Judge::new(self, ex, direction, rec.subject.as_deref(), store);
                judge.record_consent = rec.consent.as_ref();
                judge
            },
            &mut verdict.report,
        );
        if let Some(json) = new_body {
            // The encoders write to memory.
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
            Some(k) => report.subjects.iter().map(|s| pseudonym(k, s)).collect(),
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
