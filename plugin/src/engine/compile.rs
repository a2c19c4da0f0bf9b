//! Turning a policy file into the compiled [`Policy`] the per-message path uses.
//!
//! Compilation checks everything it can and reports every problem at once, each with
//! where it is (a JSON Pointer into the policy) and what to do about it. A policy with
//! any error never half-loads: there is no partially compiled `Policy`.

use super::decision::Grant;
use super::matcher::Matcher;
use super::policy::{
    ActionSpec, ConsentStore, DirectionSpec, FailMode, LegalBasis, MaskSpec, MessageSubject, Mode,
    PolicyFile, ShapeMismatch, Undeclared,
};
use super::policy_read::read_policy;
use super::positions;
use super::route;
use super::selector::Selector;
use super::{BindingId, Direction, ServiceId};
use std::collections::HashMap;
use std::fmt;

/// The largest nesting the JSON parser accepts (serde_json's recursion limit).
pub const MAX_SUPPORTED_DEPTH: usize = 127;
/// Shortest accepted key for `hash` and subject pseudonyms.
pub const MIN_KEY_BYTES: usize = 16;

/// One problem with a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// JSON Pointer (RFC 6901) to the offending value, `""` for the whole document.
    pub pointer: String,
    /// 1-based line and column, where the parser knows them.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        if !self.pointer.is_empty() {
            write!(f, "at {}: ", self.pointer)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a policy; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "policy has {n} error{}", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// What to do with a field that may not pass, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Strip,
    Redact,
    Hash,
    Mask(MaskSpec),
    Block,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Strip => "strip",
            Action::Redact => "redact",
            Action::Hash => "hash",
            Action::Mask(_) => "mask",
            Action::Block => "block",
        }
    }

    /// Order of severity, for a field two bindings deny with different actions.
    pub(crate) fn severity(&self) -> u8 {
        match self {
            Action::Mask(_) => 1,
            Action::Hash => 2,
            Action::Redact => 3,
            Action::Strip => 4,
            Action::Block => 5,
        }
    }
}

impl From<&ActionSpec> for Action {
    fn from(a: &ActionSpec) -> Self {
        match a {
            ActionSpec::Strip => Action::Strip,
            ActionSpec::Redact => Action::Redact,
            ActionSpec::Hash => Action::Hash,
            ActionSpec::Block => Action::Block,
            ActionSpec::Mask(m) => Action::Mask(m.clone()),
        }
    }
}

#[derive(Debug)]
pub(crate) struct CService {
    pub name: String,
    /// For each interned category: the purposes of this service that allow it, in the
    /// service's order of preference.
    pub grants: Vec<Vec<usize>>,
    pub has_consent_purpose: bool,
    /// Binding prefixes match this service's request paths case-sensitively.
    pub case_sensitive_paths: bool,
}

#[derive(Debug)]
pub(crate) struct CPurpose {
    pub name: String,
    pub basis: LegalBasis,
    pub consent_key: Option<String>,
}

#[derive(Debug)]
pub(crate) struct CField {
    pub selector: Selector,
    pub category: usize,
    pub action: Action,
}

#[derive(Debug)]
pub(crate) struct CNamed {
    /// Header names lower-case; query parameter names as written.
    pub name: String,
    pub category: usize,
    pub action: Action,
    /// Query parameters: compare names case-sensitively.
    pub case_sensitive: bool,
}

impl CNamed {
    /// Whether a query parameter, by its raw (still encoded) name, is this one: the
    /// name is read as frameworks read it ([`route::param_base_name`]).
    pub fn is_param(&self, raw_name: &str) -> bool {
        param_is(&self.name, self.case_sensitive, raw_name)
    }

    /// Whether a header, by its name as the host gives it, is this one.
    pub fn is_header(&self, name: &str) -> bool {
        route::header_name_eq(name, &self.name)
    }
}

/// Whether the query parameter spelled `raw_name` is the parameter `name`.
pub(crate) fn param_is(name: &str, case_sensitive: bool, raw_name: &str) -> bool {
    let base = route::param_base_name(raw_name);
    if case_sensitive {
        base == name
    } else {
        base.eq_ignore_ascii_case(name)
    }
}

#[derive(Debug)]
pub(crate) struct CBinding {
    pub name: String,
    /// Path prefixes in canonical form ([`route::canonical_path`]).
    pub paths: Vec<String>,
    /// The same, as compared case-insensitively ([`route::fold_case`]).
    pub paths_folded: Vec<String>,
    pub methods: Vec<String>,
    pub direction: DirectionSpec,
    pub records: Selector,
    pub subject: Option<Selector>,
    pub consent: Option<Selector>,
    pub fields: Vec<CField>,
    /// One automaton over all of `fields`' selectors, for the body walk.
    pub matcher: Matcher,
    pub message_subject: Option<MessageSubject>,
    pub headers: Vec<CNamed>,
    pub query: Vec<CNamed>,
    pub shape_mismatch: ShapeMismatch,
    /// `records` without its last step, without its last two, ... down to `$`: where an
    /// empty batch is told from a body of another shape when `records` has a `..` step
    /// (without one, the steps themselves are followed: `eval::empty_batch`).
    pub records_prefixes: Vec<Selector>,
    /// Every selector of the binding starts with a member name, so a record that is not
    /// an object cannot hold what the binding declares: it is of another shape.
    pub records_are_objects: bool,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
    pub cache_ttl_s: u64,
}

#[derive(Debug)]
pub(crate) struct CCallerHeader {
    /// Lower-case.
    pub name: String,
    pub trusted_from: Vec<ServiceId>,
    pub trust_plaintext: bool,
}

#[derive(Debug)]
pub(crate) struct CConsentHeader {
    pub name: String,
    pub trusted: Vec<ServiceId>,
}

/// `(category, purpose)` pairs: what lets a recipient have each category of a binding.
type OpenGrants = Vec<(usize, usize)>;

/// A compiled policy. Built once per configuration; read-only afterwards.
#[derive(Debug)]
pub struct Policy {
    pub(crate) name: String,
    pub(crate) mode: Mode,
    pub(crate) fail: FailMode,
    pub(crate) undeclared: Undeclared,
    pub(crate) redact_marker: String,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_depth: usize,
    pub(crate) max_records: usize,
    pub(crate) log_untouched: bool,
    pub(crate) caller_header: Option<CCallerHeader>,
    pub(crate) services: Vec<CService>,
    pub(crate) by_cluster: HashMap<String, usize>,
    pub(crate) by_authority: HashMap<String, usize>,
    pub(crate) by_principal: HashMap<String, usize>,
    pub(crate) by_name: HashMap<String, usize>,
    pub(crate) purposes: Vec<CPurpose>,
    pub(crate) categories: Vec<String>,
    pub(crate) consent_header: Option<CConsentHeader>,
    pub(crate) store: Option<StoreConfig>,
    pub(crate) bindings: Vec<CBinding>,
    /// `[binding][service]`: when the service may receive every category the binding
    /// declares under a purpose whose legal basis holds whatever the consent, that
    /// purpose for each category, `(category, purpose)`; such messages need no reading.
    pub(crate) open: Vec<Vec<Option<OpenGrants>>>,
    pub(crate) hash_key: Option<super::actions::MacKey>,
    pub(crate) subject_key: Option<super::actions::MacKey>,
    /// Decision records name each field by its concrete path (`$.customers[3].email`)
    /// instead of its template (`$.customers[*].email`): see [`Policy::with_exact_paths`].
    pub(crate) exact_paths: bool,
}

/// `a` covers `b` when they are equal or `a` is a dotted prefix of `b`.
pub fn category_covers(parent: &str, child: &str) -> bool {
    child == parent
        || (child.len() > parent.len()
            && child.starts_with(parent)
            && child.as_bytes()[parent.len()] == b'.')
}

fn is_dotted_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Escapes one JSON Pointer reference token.
fn tok(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

struct Errors(Vec<PolicyError>);

impl Errors {
    fn at(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        self.0.push(PolicyError {
            pointer: pointer.into(),
            line: None,
            column: None,
            message: message.into(),
        });
    }
}

impl Policy {
    /// Compiles a policy from its JSON text. `env` answers the VM's environment
    /// variables, where the keys for `hash` and subject pseudonyms live.
    pub fn compile(
        text: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Policy, PolicyErrors> {
        let whole = |line: usize, column: usize, message: String| {
            PolicyErrors(vec![PolicyError {
                pointer: String::new(),
                line: Some(line).filter(|l| *l > 0),
                column: Some(column).filter(|c| *c > 0),
                message,
            }])
        };
        let doc: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
            // serde_json ends its message with the position, which is reported apart.
            let msg = e.to_string();
            let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
            whole(
                e.line(),
                e.column(),
                format!("{msg} (the policy is not valid JSON; fix the syntax there)"),
            )
        })?;
        // Valid JSON is UTF-8. The positions say where each error is and refuse a key
        // written twice, which serde_json would silently resolve to its last value.
        let text = std::str::from_utf8(text).unwrap_or_default();
        let positions =
            positions::json(text).map_err(|e| whole(e.pos.line, e.pos.column, e.message))?;
        let place = |mut e: PolicyError| {
            if let Some(p) = positions.nearest(&e.pointer) {
                e.line = Some(p.line);
                e.column = Some(p.column);
            }
            e
        };
        let placed =
            |errors: Vec<PolicyError>| PolicyErrors(errors.into_iter().map(place).collect());
        let file = read_policy(&doc).map_err(placed)?;
        Self::from_file(&file, env).map_err(|e| placed(e.0))
    }

    /// Compiles an already parsed policy file (the harness parses YAML into the same types).
    pub fn from_file(
        file: &PolicyFile,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Policy, PolicyErrors> {
        let mut errs = Errors(Vec::new());
        if file.consentry != 1 {
            errs.at(
                "/consentry",
                format!(
                    "format version {} is not supported; this filter reads version 1",
                    file.consentry
                ),
            );
        }
        if file.name.trim().is_empty() {
            errs.at(
                "/name",
                "the policy needs a name; it appears in every decision log and block response",
            );
        }
        let limits = &file.limits;
        if limits.max_body_bytes == 0 || limits.max_body_bytes > 64 * 1024 * 1024 {
            errs.at(
                "/limits/max_body_bytes",
                "must be between 1 and 67108864 (64 MiB)",
            );
        }
        if limits.max_depth == 0 || limits.max_depth > MAX_SUPPORTED_DEPTH {
            errs.at(
                "/limits/max_depth",
                format!("must be between 1 and {MAX_SUPPORTED_DEPTH}"),
            );
        }
        if limits.max_records == 0 {
            errs.at("/limits/max_records", "must be at least 1");
        }
        if let Some(m) = &file.redact_marker {
            if m.is_empty() {
                errs.at("/redact_marker", "an empty marker would be mistaken for a real empty value; pick a visible one such as \"[redacted]\"");
            }
        }

        // Purposes.
        let mut purposes = Vec::new();
        let mut purpose_idx = HashMap::new();
        let mut purpose_allows: Vec<Vec<String>> = Vec::new();
        for (name, p) in &file.purposes {
            let at = format!("/purposes/{}", tok(name));
            if !is_dotted_name(name) {
                errs.at(&at, format!("purpose name `{name}` must be dotted lower-case words, like `marketing.email`"));
            }
            match (p.basis, &p.consent_key) {
                (LegalBasis::Consent, None) => errs.at(
                    format!("{at}/basis"),
                    format!("purpose `{name}` has basis consent but no consent_key: add the key a customer grants, e.g. \"consent_key\": \"marketing_email\""),
                ),
                (LegalBasis::Consent, Some(k)) if k.trim().is_empty() => {
                    errs.at(format!("{at}/consent_key"), "consent_key must not be empty")
                }
                (b, Some(_)) if b != LegalBasis::Consent => errs.at(
                    format!("{at}/consent_key"),
                    format!("purpose `{name}` has basis {} which holds by declaration; remove consent_key or make the basis consent", b.as_str()),
                ),
                _ => {}
            }
            if p.allows.is_empty() {
                errs.at(format!("{at}/allows"), format!("purpose `{name}` allows no data category; list at least one, or remove the purpose"));
            }
            for (i, c) in p.allows.iter().enumerate() {
                if !is_dotted_name(c) {
                    errs.at(format!("{at}/allows/{i}"), format!("`{c}` is not a data category; categories are dotted lower-case names like `user.contact.email`"));
                }
            }
            purpose_idx.insert(name.clone(), purposes.len());
            purposes.push(CPurpose {
                name: name.clone(),
                basis: p.basis,
                consent_key: p.consent_key.clone(),
            });
            purpose_allows.push(p.allows.clone());
        }

        // Services and how they are recognised.
        let mut by_cluster = HashMap::new();
        let mut by_authority = HashMap::new();
        let mut by_principal = HashMap::new();
        let mut by_name = HashMap::new();
        let mut service_purposes: Vec<Vec<usize>> = Vec::new();
        let mut service_names = Vec::new();
        for (name, s) in &file.services {
            let at = format!("/services/{}", tok(name));
            let id = service_names.len();
            if name.is_empty() || !is_header_name(name) {
                errs.at(&at, format!("service name `{name}` must be a token (letters, digits, `-`, `_`, `.`): it travels in headers"));
            }
            by_name.insert(name.clone(), id);
            for (i, p) in s.principals.iter().enumerate() {
                if !p.is_empty() && !p.starts_with("spiffe://") {
                    errs.at(format!("{at}/principals/{i}"), format!("`{p}` is not a SPIFFE ID; principals look like spiffe://trust-domain/ns/NAMESPACE/sa/ACCOUNT"));
                }
            }
            let mut claim = |map: &mut HashMap<String, usize>,
                             key: String,
                             what: &str,
                             i: usize| {
                if key.is_empty() {
                    errs.at(
                        format!("{at}/{what}/{i}"),
                        format!("an empty {what} entry matches nothing; remove it"),
                    );
                } else if let Some(prev) = map.insert(key.clone(), id) {
                    if prev != id {
                        errs.at(
                            format!("{at}/{what}/{i}"),
                            format!("`{key}` is claimed by services `{}` and `{name}`; one identity must name one service", service_names_get(&file.services, prev)),
                        );
                    }
                }
            };
            for (i, c) in s.clusters.iter().enumerate() {
                claim(&mut by_cluster, c.clone(), "clusters", i);
            }
            for (i, a) in s.authorities.iter().enumerate() {
                claim(&mut by_authority, a.to_ascii_lowercase(), "authorities", i);
            }
            for (i, p) in s.principals.iter().enumerate() {
                claim(&mut by_principal, p.clone(), "principals", i);
            }
            let mut ps = Vec::new();
            for (i, p) in s.purposes.iter().enumerate() {
                match purpose_idx.get(p) {
                    Some(&pi) => ps.push(pi),
                    None => errs.at(
                        format!("{at}/purposes/{i}"),
                        format!("service `{name}` names purpose `{p}`, which is not defined under `purposes`; define it or fix the name"),
                    ),
                }
            }
            service_purposes.push(ps);
            service_names.push(name.clone());
        }

        let caller_header = file.identity.caller_header.as_ref().map(|h| {
            if !is_header_name(&h.name) {
                errs.at(
                    "/identity/caller_header/name",
                    format!("`{}` is not a valid header name", h.name),
                );
            }
            if h.trusted_from.is_empty() && !h.trust_plaintext {
                errs.at("/identity/caller_header/trusted_from", "no caller may assert an identity with this header, so it would always be ignored; name the gateway that sets it, e.g. \"trusted_from\": [\"gateway\"]");
            }
            let mut trusted_from = Vec::new();
            for (i, c) in h.trusted_from.iter().enumerate() {
                match by_name.get(c) {
                    Some(&id) if file.services.get(c).is_some_and(|s| s.principals.is_empty()) => {
                        errs.at(format!("/identity/caller_header/trusted_from/{i}"), format!("service `{c}` has no principals, so no request can come from it; trust is given to an mTLS identity: list its SPIFFE id under services.{c}.principals"));
                        trusted_from.push(ServiceId(id));
                    }
                    Some(&id) => trusted_from.push(ServiceId(id)),
                    None => errs.at(
                        format!("/identity/caller_header/trusted_from/{i}"),
                        format!("`{c}` is not a service of this policy; define it under `services`"),
                    ),
                }
            }
            CCallerHeader {
                name: h.name.to_ascii_lowercase(),
                trusted_from,
                trust_plaintext: h.trust_plaintext,
            }
        });

        let consent_header = file.consent.header.as_ref().map(|h| {
            let mut trusted = Vec::new();
            if !is_header_name(&h.name) {
                errs.at("/consent/header/name", format!("`{}` is not a valid header name", h.name));
            }
            if h.trusted_callers.is_empty() {
                errs.at("/consent/header/trusted_callers", "no service may send the consent header, so it would always be ignored; name the gateway that sets it");
            }
            for (i, c) in h.trusted_callers.iter().enumerate() {
                match by_name.get(c) {
                    Some(&id) => trusted.push(ServiceId(id)),
                    None => errs.at(
                        format!("/consent/header/trusted_callers/{i}"),
                        format!("`{c}` is not a service of this policy; define it under `services`"),
                    ),
                }
            }
            CConsentHeader {
                name: h.name.to_ascii_lowercase(),
                trusted,
            }
        });

        let store = file
            .consent
            .store
            .as_ref()
            .map(|s| compile_store(s, &mut errs));

        // Message bindings.
        let mut categories: Vec<String> = Vec::new();
        let default_action = file
            .default_action
            .as_ref()
            .map(Action::from)
            .unwrap_or(Action::Strip);
        let mut needs_hash_key = default_action == Action::Hash;
        let mut needs_subject_key = false;
        let mut bindings = Vec::new();
        if file.messages.is_empty() {
            errs.at("/messages", "no message bindings: the policy would inspect nothing; bind at least one message shape");
        }
        let mut seen_names = HashMap::new();
        for (bi, m) in file.messages.iter().enumerate() {
            let at = format!("/messages/{bi}");
            if m.name.trim().is_empty() {
                errs.at(
                    format!("{at}/name"),
                    "a binding needs a name; it appears in decision logs",
                );
            }
            if let Some(prev) = seen_names.insert(m.name.clone(), bi) {
                errs.at(format!("{at}/name"), format!("binding name `{}` is already used by /messages/{prev}; names appear in logs and must be unique", m.name));
            }
            let mut paths = Vec::new();
            for (i, p) in m.paths.iter().enumerate() {
                if !p.starts_with('/') || p.contains(['?', '#']) {
                    errs.at(format!("{at}/paths/{i}"), format!("`{p}` is not a path prefix; write it like `/v1/customers`, without a query"));
                    continue;
                }
                match route::canonical_path(p) {
                    Ok(c) => paths.push(c),
                    Err(problem) => errs.at(
                        format!("{at}/paths/{i}"),
                        format!("`{p}` cannot be a path prefix: {problem}"),
                    ),
                }
            }
            let mut methods = Vec::new();
            for (i, meth) in m.methods.iter().enumerate() {
                if meth.is_empty() || !meth.bytes().all(|b| b.is_ascii_alphabetic()) {
                    errs.at(
                        format!("{at}/methods/{i}"),
                        format!("`{meth}` is not an HTTP method"),
                    );
                }
                methods.push(meth.to_ascii_uppercase());
            }
            let records = sel(&mut errs, &m.records, format!("{at}/records"), false);
            let subject = m
                .subject
                .as_ref()
                .and_then(|s| sel(&mut errs, s, format!("{at}/subject"), true));
            let consent = m
                .consent
                .as_ref()
                .and_then(|s| sel(&mut errs, s, format!("{at}/consent"), true));
            let mut fields = Vec::new();
            for (fi, f) in m.fields.iter().enumerate() {
                let fat = format!("{at}/fields/{fi}");
                let s = sel(&mut errs, &f.path, format!("{fat}/path"), false);
                if let Some(s) = &s {
                    if s.is_root() {
                        errs.at(format!("{fat}/path"), "`$` is the whole record; bind its fields, or point `records` at the data instead");
                    }
                }
                if !is_dotted_name(&f.category) {
                    errs.at(format!("{fat}/category"), format!("`{}` is not a data category; categories are dotted lower-case names like `user.contact.email`", f.category));
                }
                let action = f
                    .action
                    .as_ref()
                    .map(Action::from)
                    .unwrap_or_else(|| default_action.clone());
                needs_hash_key |= action == Action::Hash;
                if let Some(s) = s {
                    fields.push(CField {
                        selector: s,
                        category: intern(&mut categories, &f.category),
                        action,
                    });
                }
            }
            let headers = named(
                &mut errs,
                &mut categories,
                &mut needs_hash_key,
                &default_action,
                &at,
                &m.headers,
                "headers",
            );
            let query = named(
                &mut errs,
                &mut categories,
                &mut needs_hash_key,
                &default_action,
                &at,
                &m.query,
                "query",
            );
            if m.fields.is_empty()
                && m.headers.is_empty()
                && m.query.is_empty()
                && file.undeclared == Undeclared::Allow
            {
                errs.at(at.clone(), format!("binding `{}` declares no fields, headers or query parameters and undeclared data is allowed, so it can change nothing; declare what it carries", m.name));
            }
            if let Some(ms) = &m.message_subject {
                match ms {
                    MessageSubject::Header(h) if !is_header_name(h) => errs.at(
                        format!("{at}/message_subject/header"),
                        format!("`{h}` is not a valid header name"),
                    ),
                    MessageSubject::Query(q) if q.is_empty() || q.contains('[') => errs.at(
                        format!("{at}/message_subject/query"),
                        format!("`{q}` is not a parameter name; write it without brackets (`id` covers `id[]` too)"),
                    ),
                    _ => {}
                }
                needs_subject_key = true;
            }
            needs_subject_key |= subject.is_some();
            if let Some(records) = records {
                let matcher = Matcher::new(fields.iter().map(|f| &f.selector));
                let records_prefixes = (0..records.steps.len())
                    .rev()
                    .map(|k| Selector {
                        source: records.source.clone(),
                        steps: records.steps[..k].to_vec(),
                    })
                    .collect();
                let starts_with_name = |s: &Selector| {
                    s.steps.first().is_some_and(|step| {
                        !step.descendant
                            && step
                                .atoms
                                .iter()
                                .all(|a| matches!(a, super::selector::Atom::Name(_)))
                    })
                };
                let records_are_objects = fields.iter().all(|f| starts_with_name(&f.selector))
                    && subject.as_ref().is_none_or(starts_with_name)
                    && consent.as_ref().is_none_or(starts_with_name);
                bindings.push(CBinding {
                    name: m.name.clone(),
                    paths_folded: paths.iter().map(|p| route::fold_case(p)).collect(),
                    paths,
                    methods,
                    direction: m.direction,
                    records,
                    subject,
                    consent,
                    fields,
                    matcher,
                    message_subject: m.message_subject.as_ref().map(|ms| match ms {
                        MessageSubject::Header(h) => MessageSubject::Header(h.to_ascii_lowercase()),
                        q => q.clone(),
                    }),
                    headers,
                    query,
                    shape_mismatch: m.shape_mismatch,
                    records_prefixes,
                    records_are_objects,
                });
            }
        }

        // Per service and category, the purposes that allow it, in preference order.
        let services: Vec<CService> = service_names
            .iter()
            .zip(&service_purposes)
            .map(|(name, ps)| CService {
                name: name.clone(),
                grants: categories
                    .iter()
                    .map(|c| {
                        ps.iter()
                            .copied()
                            .filter(|&p| purpose_allows[p].iter().any(|a| category_covers(a, c)))
                            .collect()
                    })
                    .collect(),
                has_consent_purpose: ps.iter().any(|&p| purposes[p].basis == LegalBasis::Consent),
                case_sensitive_paths: file
                    .services
                    .get(name)
                    .is_some_and(|s| s.case_sensitive_paths),
            })
            .collect();

        let mut key = |env_name: &str,
                       pointer: &str,
                       what: &str,
                       needed: bool|
         -> Option<Vec<u8>> {
            if !needed {
                return None;
            }
            match env(env_name) {
                Some(v) if v.len() >= MIN_KEY_BYTES => Some(v.into_bytes()),
                Some(_) => {
                    errs.at(pointer, format!("the key in environment variable {env_name} is shorter than {MIN_KEY_BYTES} bytes; use at least 32 random bytes"));
                    None
                }
                None => {
                    errs.at(pointer, format!("this policy needs a {what} key, but environment variable {env_name} is not set in the VM; set it in vm_config.environment_variables (never in the policy)"));
                    None
                }
            }
        };
        let hash_key = key(
            &file.keys.hash_key_env,
            "/keys/hash_key_env",
            "hash",
            needs_hash_key,
        );
        let subject_key = key(
            &file.keys.subject_key_env,
            "/keys/subject_key_env",
            "subject pseudonym",
            needs_subject_key,
        );

        if !errs.0.is_empty() {
            return Err(PolicyErrors(errs.0));
        }
        // With every field to be listed, or undeclared data to be stripped, every
        // covered message must be read.
        let reads_all = file.log.every_field || file.undeclared == Undeclared::Strip;
        let open = bindings
            .iter()
            .map(|b| {
                services
                    .iter()
                    .map(|s| (!reads_all).then(|| open_grants(b, s, &purposes)).flatten())
                    .collect()
            })
            .collect();
        Ok(Policy {
            name: file.name.clone(),
            mode: file.mode,
            fail: file.fail,
            undeclared: file.undeclared,
            redact_marker: file
                .redact_marker
                .clone()
                .unwrap_or_else(|| "[redacted]".into()),
            max_body_bytes: limits.max_body_bytes,
            max_depth: limits.max_depth,
            max_records: limits.max_records,
            log_untouched: file.log.untouched,
            exact_paths: false,
            caller_header,
            services,
            by_cluster,
            by_authority,
            by_principal,
            by_name,
            purposes,
            categories,
            consent_header,
            store,
            bindings,
            open,
            hash_key: hash_key.map(|k| super::actions::MacKey::new(&k)),
            subject_key: subject_key.map(|k| super::actions::MacKey::new(&k)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn fail(&self) -> FailMode {
        self.fail
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// For tests and tools that must locate every decision in the body: the records of
    /// this policy then list concrete paths (`$.customers[3].email`, one per array
    /// element) instead of path templates (`$.customers[*].email`), so a group holds one
    /// path per element it decided. The filter never sets it: such a record grows with
    /// the batch.
    #[doc(hidden)]
    pub fn with_exact_paths(mut self) -> Policy {
        self.exact_paths = true;
        self
    }

    pub fn log_untouched(&self) -> bool {
        self.log_untouched
    }

    /// The header in which a trusted gateway names the caller, if the policy has one.
    pub fn caller_header(&self) -> Option<&str> {
        self.caller_header.as_ref().map(|h| h.name.as_str())
    }

    /// The consent header, if the policy reads one.
    pub fn consent_header(&self) -> Option<&str> {
        self.consent_header.as_ref().map(|h| h.name.as_str())
    }

    pub fn consent_store(&self) -> Option<&StoreConfig> {
        self.store.as_ref()
    }

    pub fn service_name(&self, id: ServiceId) -> &str {
        &self.services[id.0].name
    }

    /// The binding that covers a message of `direction` to or from `upstream`, if any,
    /// chosen from the canonical path ([`route`]). A message no binding covers is not
    /// inspected at all. A path with no single safe reading is refused when some reading
    /// of it could be covered: `Err` with why.
    pub fn route(
        &self,
        method: &str,
        raw_path: &str,
        upstream: Option<ServiceId>,
    ) -> Result<RouteMatch, route::PathProblem> {
        let case_sensitive = upstream.is_some_and(|u| self.services[u.0].case_sensitive_paths);
        match route::canonical_path(raw_path) {
            Ok(path) => {
                let folded = (!case_sensitive).then(|| route::fold_case(&path));
                let find = |d| self.find_binding(d, method, &path, folded.as_deref());
                let bindings = [find(Direction::Request), find(Direction::Response)];
                Ok(RouteMatch { path, bindings })
            }
            Err(problem) => {
                let lenient = route::lenient_path(raw_path);
                let folded = route::fold_case(&lenient);
                let covered = [Direction::Request, Direction::Response]
                    .into_iter()
                    .any(|d| {
                        self.find_binding(d, method, &lenient, Some(&folded))
                            .is_some()
                    });
                if covered {
                    Err(problem)
                } else {
                    Ok(RouteMatch {
                        path: lenient,
                        bindings: [None, None],
                    })
                }
            }
        }
    }

    /// Whether an exchange with this method and path could need the filter at all: some
    /// binding may cover it in either direction (for any recipient), or its path is
    /// refused. `false` is certain; the header callback skips the exchange on it.
    pub fn may_cover(&self, method: &str, raw_path: &str) -> bool {
        match self.route(method, raw_path, None) {
            Ok(m) => m.bindings.iter().any(Option::is_some),
            Err(_) => true,
        }
    }

    /// The binding that covers a message, if any, for any recipient (paths compared in
    /// any case); see [`Policy::route`].
    pub fn binding_for(&self, direction: Direction, method: &str, path: &str) -> Option<BindingId> {
        let m = self.route(method, path, None).ok()?;
        m.bindings[match direction {
            Direction::Request => 0,
            Direction::Response => 1,
        }]
    }

    /// The first binding for `direction` and `method` whose prefixes cover `canonical`,
    /// or, when it is given, its case-folded form `folded` (case-insensitive matching).
    fn find_binding(
        &self,
        direction: Direction,
        method: &str,
        canonical: &str,
        folded: Option<&str>,
    ) -> Option<BindingId> {
        self.bindings
            .iter()
            .position(|b| {
                let dir_ok = match b.direction {
                    DirectionSpec::Both => true,
                    DirectionSpec::Request => direction == Direction::Request,
                    DirectionSpec::Response => direction == Direction::Response,
                };
                dir_ok
                    && (b.methods.is_empty()
                        || b.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
                    && (b.paths.is_empty()
                        || match folded {
                            Some(f) => b.paths_folded.iter().any(|p| route::has_prefix(f, p, true)),
                            None => b
                                .paths
                                .iter()
                                .any(|p| route::has_prefix(canonical, p, true)),
                        })
            })
            .map(BindingId)
    }

    /// The prefix of canonical `path` that binding `b` covers it by (`/v1/customers`),
    /// followed by `/…` when the path goes on: what the decision log names, since the
    /// rest of a path may hold a customer id.
    pub(crate) fn logged_path(&self, b: BindingId, path: &str) -> String {
        let binding = &self.bindings[b.0];
        let folded = route::fold_case(path);
        // As many segments as the longest prefix that covers it has.
        let keep = binding
            .paths_folded
            .iter()
            .filter(|p| route::has_prefix(&folded, p, true))
            .map(|p| route::segment_count(p))
            .max()
            .unwrap_or(0);
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut out = String::new();
        for s in &segments[..keep.min(segments.len())] {
            out.push('/');
            out.push_str(s);
        }
        if segments.len() > keep {
            out.push_str("/…");
        } else if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// Whether the message's recipient may receive every category its binding declares
    /// whatever the subjects' consent (and undeclared data passes, and the policy does not
    /// ask for every field to be listed). Such a message is decided from its headers:
    /// nothing in its body could be changed.
    pub fn decided_at_headers(&self, binding: BindingId, recipient: Option<ServiceId>) -> bool {
        recipient.is_some_and(|r| {
            self.open
                .get(binding.0)
                .and_then(|b| b.get(r.0))
                .is_some_and(Option::is_some)
        })
    }

    /// For a message [`Policy::decided_at_headers`], the purpose and basis that let its
    /// recipient have each category, for its log entry.
    pub fn unread_grants(
        &self,
        binding: BindingId,
        recipient: Option<ServiceId>,
    ) -> Option<Vec<Grant>> {
        let grants = self.open.get(binding.0)?.get(recipient?.0)?.as_ref()?;
        Some(
            grants
                .iter()
                .map(|&(c, p)| Grant {
                    category: self.categories[c].clone(),
                    purpose: self.purposes[p].name.clone(),
                    basis: self.purposes[p].basis.as_str(),
                })
                .collect(),
        )
    }

    pub fn binding_name(&self, id: BindingId) -> &str {
        &self.bindings[id.0].name
    }

    /// Where the subject of the binding's header and query data is found.
    pub fn message_subject(&self, id: BindingId) -> Option<&MessageSubject> {
        self.bindings[id.0].message_subject.as_ref()
    }
}

/// For each category a binding declares (fields, headers, query; first mention first),
/// the first purpose of the service that allows it on a basis other than consent; `None`
/// when some category has no such purpose, so the message must be read.
fn open_grants(b: &CBinding, s: &CService, purposes: &[CPurpose]) -> Option<OpenGrants> {
    let mut out = OpenGrants::new();
    let categories = b
        .fields
        .iter()
        .map(|f| f.category)
        .chain(b.headers.iter().map(|h| h.category))
        .chain(b.query.iter().map(|q| q.category));
    for c in categories {
        if out.iter().any(|&(seen, _)| seen == c) {
            continue;
        }
        let p = s.grants[c]
            .iter()
            .copied()
            .find(|&p| purposes[p].basis != LegalBasis::Consent)?;
        out.push((c, p));
    }
    Some(out)
}

/// The bindings an exchange's canonical path selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The canonical path (the lenient reading when no binding could cover it).
    pub path: String,
    /// For the request and for the response.
    pub bindings: [Option<BindingId>; 2],
}

fn service_names_get(
    services: &std::collections::BTreeMap<String, super::policy::Service>,
    i: usize,
) -> &str {
    services.keys().nth(i).map(String::as_str).unwrap_or("?")
}

fn intern(categories: &mut Vec<String>, c: &str) -> usize {
    if let Some(i) = categories.iter().position(|x| x == c) {
        i
    } else {
        categories.push(c.to_string());
        categories.len() - 1
    }
}

fn sel(errs: &mut Errors, path: &str, at: String, singular: bool) -> Option<Selector> {
    match Selector::parse(path) {
        Ok(s) if singular && !s.is_singular() => {
            errs.at(
                at,
                format!(
                    "`{path}` may select several values; it must name exactly one, like `$.id`"
                ),
            );
            None
        }
        Ok(s) => Some(s),
        Err(e) => {
            errs.at(at, e);
            None
        }
    }
}

/// Compiles a binding's header or query parameter list.
fn named(
    errs: &mut Errors,
    categories: &mut Vec<String>,
    needs_hash_key: &mut bool,
    default_action: &Action,
    at: &str,
    list: &[super::policy::NamedBinding],
    what: &str,
) -> Vec<CNamed> {
    let header = what == "headers";
    let mut out = Vec::new();
    for (i, n) in list.iter().enumerate() {
        let nat = format!("{at}/{what}/{i}");
        if n.name.is_empty() {
            errs.at(format!("{nat}/name"), "the name must not be empty");
        } else if n.name.starts_with(':') {
            errs.at(
                format!("{nat}/name"),
                "pseudo-headers carry routing, not customer data; bind a query parameter instead",
            );
        } else if header && !is_header_name(&n.name) {
            errs.at(
                format!("{nat}/name"),
                format!("`{}` is not a valid header name", n.name),
            );
        } else if !header && n.name.contains('[') {
            errs.at(format!("{nat}/name"), format!("write the parameter name without brackets: `{}` already covers `{0}[]`, `{0}[0]` and `{0}[key]`", n.name.split('[').next().unwrap_or("")));
        }
        if !is_dotted_name(&n.category) {
            errs.at(format!("{nat}/category"), format!("`{}` is not a data category; categories are dotted lower-case names like `user.contact.email`", n.category));
        }
        let action = n
            .action
            .as_ref()
            .map(Action::from)
            .unwrap_or_else(|| default_action.clone());
        *needs_hash_key |= action == Action::Hash;
        if header && n.case_sensitive {
            errs.at(format!("{nat}/case_sensitive"), "header names are case-insensitive in HTTP; remove case_sensitive here (it applies to query parameters)");
        }
        out.push(CNamed {
            name: if header {
                n.name.to_ascii_lowercase()
            } else {
                n.name.clone()
            },
            category: intern(categories, &n.category),
            action,
            case_sensitive: n.case_sensitive,
        });
    }
    out
}

fn compile_store(s: &ConsentStore, errs: &mut Errors) -> StoreConfig {
    if s.cluster.is_empty() {
        errs.at(
            "/consent/store/cluster",
            "name the Envoy cluster of the consent store",
        );
    }
    if !s.path.starts_with('/') {
        errs.at(
            "/consent/store/path",
            format!(
                "`{}` must be an absolute path like /v1/consents:lookup",
                s.path
            ),
        );
    }
    if s.timeout_ms == 0 || s.timeout_ms > 60_000 {
        errs.at("/consent/store/timeout_ms", "must be between 1 and 60000");
    }
    if s.cache_ttl_s > 86_400 {
        errs.at(
            "/consent/store/cache_ttl_s",
            "must be at most 86400 (a day): a withdrawn consent must take effect",
        );
    }
    StoreConfig {
        cluster: s.cluster.clone(),
        authority: s.authority.clone().unwrap_or_else(|| s.cluster.clone()),
        path: s.path.clone(),
        timeout_ms: s.timeout_ms,
        cache_ttl_s: s.cache_ttl_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_categories_cover_children_only_at_dots() {
        assert!(category_covers("user", "user.contact.email"));
        assert!(category_covers("user.contact", "user.contact"));
        assert!(!category_covers("user.contact", "user.contacts"));
        assert!(!category_covers("user.contact.email", "user.contact"));
    }
}
