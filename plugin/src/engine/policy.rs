//! The policy file, format v1, as written by a policy author.
//!
//! These types mirror the text one to one (`deny_unknown_fields` everywhere, so a
//! misspelt key is an error, not a silently ignored rule). They carry no meaning of
//! their own: [`crate::engine::compile`] checks them and turns them into the
//! [`crate::engine::Policy`] the per-message path uses. The reference for every key is
//! `policies/README.md`; the JSON Schema is `policies/consentry-policy.schema.json`.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole policy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; must be 1.
    pub consentry: u32,
    /// Name reported in decision logs and block responses.
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    /// What happens to a message that cannot be inspected.
    #[serde(default)]
    pub fail: FailMode,
    /// What happens to a record's fields that no selector declares.
    #[serde(default)]
    pub undeclared: Undeclared,
    /// Action for a denied field whose binding names none.
    #[serde(default)]
    pub default_action: Option<ActionSpec>,
    /// Marker that `redact` writes in place of a value.
    #[serde(default)]
    pub redact_marker: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub keys: Keys,
    #[serde(default)]
    pub log: LogOptions,
    #[serde(default)]
    pub identity: Identity,
    pub services: BTreeMap<String, Service>,
    pub purposes: BTreeMap<String, Purpose>,
    #[serde(default)]
    pub consent: ConsentSources,
    pub messages: Vec<MessageBinding>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Undeclared {
    #[default]
    Allow,
    Strip,
}

/// What to do with a field that may not pass.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionSpec {
    Strip,
    Redact,
    Hash,
    Block,
    /// Keep a declared part of the value, replace the rest with `*`.
    Mask(MaskSpec),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSpec {
    /// Characters kept at the start.
    #[serde(default)]
    pub keep_first: usize,
    /// Characters kept at the end.
    #[serde(default)]
    pub keep_last: usize,
    /// For e-mail addresses: keep the part from `@` on.
    #[serde(default)]
    pub keep_domain: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    #[serde(default = "default_max_records")]
    pub max_records: usize,
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_max_depth() -> usize {
    64
}
fn default_max_records() -> usize {
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    #[serde(default = "default_hash_key_env")]
    pub hash_key_env: String,
    #[serde(default = "default_subject_key_env")]
    pub subject_key_env: String,
}

fn default_hash_key_env() -> String {
    "CONSENTRY_HASH_KEY".into()
}
fn default_subject_key_env() -> String {
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogOptions {
    /// Also log messages the policy did not touch (no declared field present).
    #[serde(default)]
    pub untouched: bool,
    /// Read and list every field of a message even when its recipient may receive
    /// everything the binding declares whatever the subjects' consent. Off, such a
    /// message is decided from its headers alone (its body is neither buffered nor
    /// parsed) and its entry names the purpose and legal basis of each category.
    #[serde(default)]
    pub every_field: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// A request header that names the calling service on behalf of another, trusted
    /// only from the callers it names (see [`CallerHeader`]).
    #[serde(default)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerHeaderFields {
    name: String,
    #[serde(default)]
    trusted_from: Vec<String>,
    #[serde(default)]
    trust_plaintext: bool,
}

impl<'de> Deserialize<'de> for CallerHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CallerHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object {\"name\": HEADER, \"trusted_from\": [SERVICE, ...]}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CallerHeader, E> {
                Err(E::custom(format!(
                    "identity.caller_header is an object now, so that it says who may assert a caller: write {{\"name\": \"{v}\", \"trusted_from\": [\"gateway\"]}} naming the services (an edge gateway) allowed to send it; a bare header name let any caller claim another's identity"
                )))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<CallerHeader, A::Error> {
                let f = CallerHeaderFields::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(CallerHeader {
                    name: f.name,
                    trusted_from: f.trusted_from,
                    trust_plaintext: f.trust_plaintext,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A service of the mesh and how it is recognised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Envoy upstream cluster names that reach this service (as a recipient of requests).
    #[serde(default)]
    pub clusters: Vec<String>,
    /// `:authority` values (host, with or without port) that reach this service.
    #[serde(default)]
    pub authorities: Vec<String>,
    /// mTLS peer identities (SPIFFE URI SANs) this service calls with.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Purposes for which this service processes customer data, in order of preference.
    #[serde(default)]
    pub purposes: Vec<String>,
    /// The service's paths differ by letter case (`/Orders` is not `/orders`), so binding
    /// prefixes match its requests case-sensitively. Off, they match in any case, as
    /// most frameworks route.
    #[serde(default)]
    pub case_sensitive_paths: bool,
}

/// The six legal bases of GDPR Art. 6(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    pub basis: LegalBasis,
    /// The consent a customer must have granted; required with `basis: consent`.
    #[serde(default)]
    pub consent_key: Option<String>,
    /// Data categories this purpose may receive; a parent covers its children.
    pub allows: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentSources {
    /// A header, set by a trusted gateway, listing each subject's granted consents.
    #[serde(default)]
    pub header: Option<ConsentHeader>,
    /// A consent store reached through an Envoy cluster.
    #[serde(default)]
    pub store: Option<ConsentStore>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentHeader {
    pub name: String,
    /// Services whose requests may carry this header; from anyone else it is ignored.
    pub trusted_callers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentStore {
    /// Envoy cluster of the store.
    pub cluster: String,
    /// `:authority` sent to the store; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Path of the batch lookup endpoint (POST).
    #[serde(default = "default_store_path")]
    pub path: String,
    #[serde(default = "default_store_timeout_ms")]
    pub timeout_ms: u64,
    /// How long an answer is reused, across requests and worker VMs.
    #[serde(default = "default_store_cache_ttl_s")]
    pub cache_ttl_s: u64,
}

fn default_store_path() -> String {
    "/v1/consents:lookup".into()
}
fn default_store_timeout_ms() -> u64 {
    250
}
fn default_store_cache_ttl_s() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionSpec {
    #[default]
    Both,
    Request,
    Response,
}

/// Where customer data sits in one kind of message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBinding {
    pub name: String,
    /// Path prefixes (before `?`) this binding covers; empty covers every path.
    #[serde(default)]
    pub paths: Vec<String>,
    /// HTTP methods of the request this binding covers; empty covers every method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub direction: DirectionSpec,
    /// JSONPath from the body root to each record; `$` makes the body one record.
    #[serde(default = "default_records")]
    pub records: String,
    /// JSONPath from the record root to the subject (customer) id.
    #[serde(default)]
    pub subject: Option<String>,
    /// JSONPath from the record root to the record's consent object.
    #[serde(default)]
    pub consent: Option<String>,
    /// Body fields: JSONPath from the record root.
    #[serde(default)]
    pub fields: Vec<FieldBinding>,
    /// Where the subject of header and query data is found.
    #[serde(default)]
    pub message_subject: Option<MessageSubject>,
    #[serde(default)]
    pub headers: Vec<NamedBinding>,
    #[serde(default)]
    pub query: Vec<NamedBinding>,
    /// A non-empty body in which `records` finds nothing, and that is not an empty
    /// batch: refused as uninspectable (`shape_mismatch`), or passed with a warning.
    #[serde(default)]
    pub shape_mismatch: ShapeMismatch,
}

/// What happens to a covered body that does not have the binding's shape (a renamed
/// envelope, a bare record, a top-level array): its records would go unjudged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeMismatch {
    #[default]
    Refuse,
    /// Pass it unchanged; logged as uninspectable with `enforced: false`, at warn level,
    /// and counted.
    Pass,
}

fn default_records() -> String {
    "$".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldBinding {
    pub path: String,
    pub category: String,
    #[serde(default)]
    pub action: Option<ActionSpec>,
}

/// A header or query parameter that carries customer data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedBinding {
    pub name: String,
    pub category: String,
    #[serde(default)]
    pub action: Option<ActionSpec>,
    /// Query parameters only: compare the name case-sensitively (default: in any case).
    #[serde(default)]
    pub case_sensitive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MessageSubject {
    Header(String),
    Query(String),
}
