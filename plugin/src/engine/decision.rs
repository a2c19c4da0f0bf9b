//! The decision log: one JSON object per message, for the people who must later show why
//! data moved. It never holds the value of a customer field; subjects appear only as
//! keyed pseudonyms.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Modified,
    Blocked,
    Uninspectable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Modified => "modified",
            Outcome::Blocked => "blocked",
            Outcome::Uninspectable => "uninspectable",
        }
    }
}

/// Why a field did not pass as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No purpose of the recipient allows the category (or the recipient is unknown).
    NoPurpose,
    /// Every purpose that would allow it needs consent, and the subject has not given it.
    NoConsent,
    /// The policy strips fields it does not declare.
    Undeclared,
}

/// One field's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldDecision {
    /// Normalized JSONPath of the field in the message as received (`$.customers[0].email`),
    /// or `header:NAME` / `query:NAME`.
    pub path: String,
    pub category: String,
    /// `allow`, or the action applied (`strip`, `redact`, `hash`, `mask`, `block`).
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The purpose that allowed the field, or for `no_consent` the one that needed consent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<&'static str>,
    /// Where the consent came from, for consent-based purposes:
    /// `record:$.consents.marketing_email`, `header:NAME`, `store`,
    /// `store:unknown_subject`, `none` or `none:no_subject`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// Keyed pseudonym of the data subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// What lets a recipient receive one category whatever the subject's consent: logged for
/// a message decided from its headers alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub category: String,
    pub purpose: String,
    pub basis: &'static str,
}

/// The log entry of one message.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionLog {
    /// When the decision was made, RFC 3339 in UTC with milliseconds.
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// The canonical request path the binding was chosen by, up to the end of the prefix
    /// that covers it (`/v1/customers/…`: the rest may hold a customer id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub caller: String,
    /// What the caller's identity came from: `principal`, `trusted_header`,
    /// `plaintext_header` or `none` (the caller is unknown).
    pub caller_identity: &'static str,
    pub recipient: String,
    pub direction: &'static str,
    pub mode: &'static str,
    pub outcome: Outcome,
    /// False in audit mode, and for an uninspectable message let through by `fail: open`.
    pub enforced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    /// For an uninspectable message: why, in words a person can act on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Categories that caused a block.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked_categories: Vec<String>,
    /// False when the body was not read because the recipient may receive every
    /// category the binding declares whatever the consent (see `allowed_categories`).
    #[serde(skip_serializing_if = "is_true")]
    pub inspected: bool,
    /// For a message not inspected: each category of its binding, with the purpose and
    /// legal basis that let the recipient have it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_categories: Vec<Grant>,
    pub fields: Vec<FieldDecision>,
    /// Decisions left out of `fields` to bound the entry's size (see `counts`).
    #[serde(skip_serializing_if = "is_zero")]
    pub fields_omitted: usize,
    /// Number of field decisions per action.
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    /// Number of field decisions per category and action, complete even when `fields`
    /// was cut short: for the proxy's counters, not written to the log.
    #[serde(skip)]
    pub category_counts: Vec<(String, &'static str, usize)>,
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC (`2026-11-22T10:43:59.123Z`),
/// without a date library: the proleptic Gregorian calendar from a day count.
pub fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Prefix of every decision log line the filter writes to the proxy's log; what follows
/// is the entry's JSON. Log pipelines and `consentry report` find entries by it.
pub const LOG_PREFIX: &str = "consentry.decision ";

/// Most field decisions one log entry lists; the rest are counted.
pub const MAX_LOGGED_FIELDS: usize = 200;

impl DecisionLog {
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Whether anything in the message belonged to the policy. A message decided at its
    /// headers (`inspected: false`) is not: the policy alone let it through, whatever it
    /// held, so it is logged only with `log.untouched`.
    pub fn touched(&self) -> bool {
        !self.fields.is_empty() || self.fields_omitted > 0 || self.outcome != Outcome::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_795_343_661_260), "2026-11-22T10:34:21.260Z");
        assert_eq!(rfc3339_utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
