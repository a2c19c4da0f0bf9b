//! The decision record (format v2): one JSON object per message, for the people who must
//! later show why data moved. It never holds the value of a customer field; subjects
//! appear only as keyed pseudonyms, each once per record. Field decisions are aggregated:
//! one group per (category, action, reason, purpose, basis, evidence), with the path
//! templates it covers, how many decisions it stands for and which subjects they were
//! about, so a record grows with the policy's shape, not with the number of records.
//! The JSON Schema is `policies/consentry-decision-record.v2.schema.json`.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No purpose of the recipient allows the category (or the recipient is unknown).
    NoPurpose,
    /// Every purpose that would allow it needs consent, and the subject has not given it.
    NoConsent,
    /// The policy strips fields it does not declare.
    Undeclared,
}

/// The decisions of one message about one (category, action, reason, purpose, basis,
/// evidence): every field decision of the message with those values, aggregated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecisionGroup {
    pub category: String,
    /// `allow`, or the action applied (`strip`, `redact`, `hash`, `mask`, `block`).
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The purpose that allowed the fields, or for `no_consent` the one that needed
    /// consent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<&'static str>,
    /// Where the consent came from, for consent-based purposes:
    /// `record:$.consents.marketing_email`, `header:NAME`, `store`,
    /// `store:unknown_subject`, `none` or `none:no_subject`. Never a record's position:
    /// the record path is the policy's, the same for every record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// Each distinct path template of the group's fields, in first-seen order: the
    /// normalized JSONPath with every array index written `[*]`
    /// (`$.customers[*].email`), or `header:NAME` / `query:NAME`.
    pub paths: Vec<String>,
    /// Decisions of this group whose path is not in `paths`, because the record lists at
    /// most [`MAX_LOGGED_PATHS`] distinct templates; they are counted in `n`.
    #[serde(skip_serializing_if = "is_zero")]
    pub folded: usize,
    /// How many field decisions the group stands for.
    pub n: usize,
    /// The subjects of those decisions: indexes into [`DecisionLog::subjects`], sorted,
    /// written as ranges (`"0-3,5"`); omitted when no decision had a subject.
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_ranges")]
    pub subjects: Vec<usize>,
}

/// What lets a recipient receive one category whatever the subject's consent: logged for
/// a message decided from its headers alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub category: String,
    pub purpose: String,
    pub basis: &'static str,
}

/// The decision record of one message (format v2, `"v": 2`): its facts, its subjects
/// (pseudonyms, each once), and its field decisions aggregated into groups.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionLog {
    /// The record format: [`RECORD_VERSION`].
    pub v: u32,
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
    /// Records judged in the body.
    #[serde(skip_serializing_if = "is_zero")]
    pub records: usize,
    /// The distinct subjects of the message's decisions, each once, in first-seen order,
    /// as keyed pseudonyms (`s2:…`); groups refer to them by index.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Every field decision of the message, in groups (first-seen order).
    pub decisions: Vec<DecisionGroup>,
    /// Number of field decisions per action (the sum of the groups' `n`).
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    /// Number of field decisions per category and action: for the proxy's counters, not
    /// written to the log.
    #[serde(skip)]
    pub category_counts: Vec<(String, &'static str, usize)>,
}

/// The format of the records this build writes: the `"v"` of every entry.
pub const RECORD_VERSION: u32 = 2;

/// Most distinct path templates one record lists; decisions at further templates are
/// counted in their group's `n` and `folded`. Templates do not grow with the number of
/// records, so only a body of many distinct undeclared keys (`undeclared: strip`) or
/// of many header spellings reaches it.
pub const MAX_LOGGED_PATHS: usize = 256;

/// Sorted indexes as ranges: `[0, 1, 2, 3, 5]` -> `"0-3,5"`.
pub fn subject_ranges(sorted: &[usize]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = if end == start {
            write!(out, "{start}")
        } else {
            write!(out, "{start}-{end}")
        };
        i += 1;
    }
    out
}

/// Reads [`subject_ranges`]' form back: `"0-3,5"` -> `[0, 1, 2, 3, 5]`. `None` for
/// anything else (a range written backwards, a non-number, an empty part).
pub fn parse_subject_ranges(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > 1_000_000 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

fn ser_ranges<S: serde::Serializer>(v: &[usize], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&subject_ranges(v))
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

impl DecisionLog {
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Whether anything in the message belonged to the policy. A message decided at its
    /// headers (`inspected: false`) is not: the policy alone let it through, whatever it
    /// held, so it is logged only with `log.untouched`.
    pub fn touched(&self) -> bool {
        !self.decisions.is_empty() || self.outcome != Outcome::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_subject_ranges, rfc3339_utc, subject_ranges};

    #[test]
    fn subject_indexes_are_written_as_ranges() {
        assert_eq!(subject_ranges(&[]), "");
        assert_eq!(subject_ranges(&[0]), "0");
        assert_eq!(subject_ranges(&[0, 1, 2, 3, 5]), "0-3,5");
        assert_eq!(subject_ranges(&[1, 3, 4, 9, 10, 11]), "1,3-4,9-11");
        for v in [vec![0], vec![0, 1, 2, 3, 5], vec![2, 7, 8, 40]] {
            assert_eq!(parse_subject_ranges(&subject_ranges(&v)), Some(v));
        }
        for bad in ["", "1,", "3-1", "a", "1-", "-1"] {
            assert_eq!(parse_subject_ranges(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_795_343_661_260), "2026-11-22T10:34:21.260Z");
        assert_eq!(rfc3339_utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
