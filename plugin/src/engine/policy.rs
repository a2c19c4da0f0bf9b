//! The policy file, format v1, as written by a policy author.
//!
//! These types mirror the text one to one; [`crate::engine::policy_read`] reads them from
//! the parsed document and refuses every key it does not know, so a misspelt key is an
//! error, not a silently ignored rule. They carry no meaning of
//! their own: [`crate::engine::compile`] checks them and turns them into the
//! [`crate::engine::Policy`] the per-message path uses. The reference for every key is
//! `policies/README.md`; the JSON Schema is `policies/consentry-policy.schema.json`.

use std::collections::BTreeMap;

/// The whole policy document.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// Format version; must be 1.
    pub consentry: u32,
    /// Name reported in decision logs and block responses.
    pub name: String,
    pub mode: Mode,
    /// What happens to a message that cannot be inspected.
    pub fail: FailMode,
    /// What happens to a record's fields that no selector declares.
    pub undeclared: Undeclared,
    /// Action for a denied field whose binding names none.
    pub default_action: Option<ActionSpec>,
    /// Marker that `redact` writes in place of a value.
    pub redact_marker: Option<String>,
    pub limits: Limits,
    pub keys: Keys,
    pub log: LogOptions,
    pub identity: Identity,
    pub services: BTreeMap<String, Service>,
    pub purposes: BTreeMap<String, Purpose>,
    pub consent: ConsentSources,
    pub messages: Vec<MessageBinding>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Undeclared {
    #[default]
    Allow,
    Strip,
}

/// What to do with a field that may not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionSpec {
    Strip,
    Redact,
    Hash,
    Block,
    /// Keep a declared part of the value, replace the rest with `*`.
    Mask(MaskSpec),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskSpec {
    /// Characters kept at the start.
    pub keep_first: usize,
    /// Characters kept at the end.
    pub keep_last: usize,
    /// For e-mail addresses: keep the part from `@` on.
    pub keep_domain: bool,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_depth: usize,
    pub max_records: usize,
}

pub(crate) fn default_max_body_bytes() -> usize {
    1024 * 1024
}
pub(crate) fn default_max_depth() -> usize {
    64
}
pub(crate) fn default_max_records() -> usize {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: default_max_body_bytes(),
            max_depth: default_max_depth(),
            max_records: default_max_records(),
        }
    }
}

/// Names of the VM environment variables that hold the keys. The keys themselves never
/// appear in the policy: Envoy's admin config dump shows plugin configuration.
#[derive(Debug, Clone)]
pub struct Keys {
    pub hash_key_env: String,
    pub subject_key_env: String,
}

pub(crate) fn default_hash_key_env() -> String {
    "CONSENTRY_HASH_KEY".into()
}
pub(crate) fn default_subject_key_env() -> String {
    "CONSENTRY_SUBJECT_KEY".into()
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            hash_key_env: default_hash_key_env(),
            subject_key_env: default_subject_key_env(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Also log messages the policy did not touch (no declared field present).
    pub untouched: bool,
    /// Read and list every field of a message even when its recipient may receive
    /// everything the binding declares whatever the subjects' consent. Off, such a
    /// message is decided from its headers alone (its body is neither buffered nor
    /// parsed) and its entry names the purpose and legal basis of each category.
    pub every_field: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// A request header that names the calling service on behalf of another, trusted
    /// only from the callers it names (see [`CallerHeader`]).
    pub caller_header: Option<CallerHeader>,
}

/// A header in which a trusted party (an edge gateway) names the service it calls for.
/// Nobody else can assert an identity with it: a caller with a principal the policy
/// does not list in `trusted_from` is who its principal says, or unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerHeader {
    pub name: String,
    /// Services whose mTLS principal may assert a caller with the header.
    pub trusted_from: Vec<String>,
    /// Trust the header on requests without an mTLS principal. Only for a setup
    /// without a mesh, where nothing else can name the caller and the network in front
    /// of Envoy guarantees the header; `consentry check` warns about it.
    pub trust_plaintext: bool,
}

/// A service of the mesh and how it is recognised.
#[derive(Debug, Clone)]
pub struct Service {
    /// Envoy upstream cluster names that reach this service (as a recipient of requests).
    pub clusters: Vec<String>,
    /// `:authority` values (host, with or without port) that reach this service.
    pub authorities: Vec<String>,
    /// mTLS peer identities (SPIFFE URI SANs) this service calls with.
    pub principals: Vec<String>,
    /// Purposes for which this service processes customer data, in order of preference.
    pub purposes: Vec<String>,
    /// The service's paths differ by letter case (`/Orders` is not `/orders`), so binding
    /// prefixes match its requests case-sensitively. Off, they match in any case, as
    /// most frameworks route.
    pub case_sensitive_paths: bool,
}

/// The six legal bases of GDPR Art. 6(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LegalBasis {
    Consent,
    Contract,
    LegalObligation,
    VitalInterests,
    PublicTask,
    LegitimateInterests,
}

impl LegalBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::Contract => "contract",
            LegalBasis::LegalObligation => "legal_obligation",
            LegalBasis::VitalInterests => "vital_interests",
            LegalBasis::PublicTask => "public_task",
            LegalBasis::LegitimateInterests => "legitimate_interests",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Purpose {
    pub basis: LegalBasis,
    /// The consent a customer must have granted; required with `basis: consent`.
    pub consent_key: Option<String>,
    /// Data categories this purpose may receive; a parent covers its children.
    pub allows: Vec<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ConsentSources {
    /// A header, set by a trusted gateway, listing each subject's granted consents.
    pub header: Option<ConsentHeader>,
    /// A consent store reached through an Envoy cluster.
    pub store: Option<ConsentStore>,
}

#[derive(Debug, Clone)]
pub struct ConsentHeader {
    pub name: String,
    /// Services whose requests may carry this header; from anyone else it is ignored.
    pub trusted_callers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ConsentStore {
    /// Envoy cluster of the store.
    pub cluster: String,
    /// `:authority` sent to the store; defaults to the cluster name.
    pub authority: Option<String>,
    /// Path of the batch lookup endpoint (POST).
    pub path: String,
    pub timeout_ms: u64,
    /// How long an answer is reused, across requests and worker VMs.
    pub cache_ttl_s: u64,
}

pub(crate) fn default_store_path() -> String {
    "/v1/consents:lookup".into()
}
pub(crate) fn default_store_timeout_ms() -> u64 {
    250
}
pub(crate) fn default_store_cache_ttl_s() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirectionSpec {
    #[default]
    Both,
    Request,
    Response,
}

/// Where customer data sits in one kind of message.
#[derive(Debug, Clone)]
pub struct MessageBinding {
    pub name: String,
    /// Path prefixes (before `?`) this binding covers; empty covers every path.
    pub paths: Vec<String>,
    /// HTTP methods of the request this binding covers; empty covers every method.
    pub methods: Vec<String>,
    pub direction: DirectionSpec,
    /// JSONPath from the body root to each record; `$` makes the body one record.
    pub records: String,
    /// JSONPath from the record root to the subject (customer) id.
    pub subject: Option<String>,
    /// JSONPath from the record root to the record's consent object.
    pub consent: Option<String>,
    /// Body fields: JSONPath from the record root.
    pub fields: Vec<FieldBinding>,
    /// Where the subject of header and query data is found.
    pub message_subject: Option<MessageSubject>,
    pub headers: Vec<NamedBinding>,
    pub query: Vec<NamedBinding>,
    /// A non-empty body in which `records` finds nothing, and that is not an empty
    /// batch: refused as uninspectable (`shape_mismatch`), or passed with a warning.
    pub shape_mismatch: ShapeMismatch,
}

/// What happens to a covered body that does not have the binding's shape (a renamed
/// envelope, a bare record, a top-level array): its records would go unjudged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShapeMismatch {
    #[default]
    Refuse,
    /// Pass it unchanged; logged as uninspectable with `enforced: false`, at warn level,
    /// and counted.
    Pass,
}

pub(crate) fn default_records() -> String {
    "$".into()
}

#[derive(Debug, Clone)]
pub struct FieldBinding {
    pub path: String,
    pub category: String,
    pub action: Option<ActionSpec>,
}

/// A header or query parameter that carries customer data.
#[derive(Debug, Clone)]
pub struct NamedBinding {
    pub name: String,
    pub category: String,
    pub action: Option<ActionSpec>,
    /// Query parameters only: compare the name case-sensitively (default: in any case).
    pub case_sensitive: bool,
}

#[derive(Debug, Clone)]
pub enum MessageSubject {
    Header(String),
    Query(String),
}
