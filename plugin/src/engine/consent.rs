//! Where a customer's consent comes from: the record itself, a header set by a trusted
//! gateway, or the consent store. No consent found means no consent given.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Consent carried by the trusted consent header:
/// `c-1001=marketing_email,social_profiling; c-1002=` lists, per subject, every consent
/// key that subject granted (an empty list: the subject granted none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderConsent {
    pub(crate) subjects: HashMap<String, BTreeSet<String>>,
}

impl HeaderConsent {
    /// Parses the header's value. A malformed entry makes the whole header unusable:
    /// guessing at a consent header is how consent gets invented.
    pub fn parse(value: &str) -> Result<HeaderConsent, String> {
        let mut subjects: HashMap<String, BTreeSet<String>> = HashMap::new();
        for entry in value.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some((subject, keys)) = entry.split_once('=') else {
                return Err(format!(
                    "consent header entry `{}` has no `=`; write `SUBJECT=key1,key2`",
                    truncate_for_log(entry)
                ));
            };
            let subject = subject.trim();
            if subject.is_empty() {
                return Err("consent header entry with an empty subject".into());
            }
            let keys: BTreeSet<String> = keys
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect();
            if subjects.insert(subject.to_string(), keys).is_some() {
                return Err("consent header names the same subject twice".into());
            }
        }
        Ok(HeaderConsent { subjects })
    }

    pub(crate) fn grants(&self, subject: &str) -> Option<&BTreeSet<String>> {
        self.subjects.get(subject)
    }
}

/// Never echo a long or odd value into an error message.
fn truncate_for_log(s: &str) -> String {
    let mut out: String = s.chars().take(24).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// What the consent store said about one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentAnswer {
    /// The store knows the subject: every key it reports, granted or not.
    Known(BTreeMap<String, bool>),
    /// The store has no record of the subject: no consent given.
    Unknown,
}

/// The consent store's answers for this message, by subject id.
pub type StoreAnswers = HashMap<String, ConsentAnswer>;

/// The body of a lookup for `subjects`.
pub fn store_request_body(subjects: &[String]) -> Vec<u8> {
    let v = serde_json::json!({ "subjects": subjects });
    v.to_string().into_bytes()
}

/// Parses the store's answer: `{"consents": {"SUBJECT": {"KEY": true, ...}, ...}}`.
/// Subjects it was asked about and did not mention are [`ConsentAnswer::Unknown`].
pub fn parse_store_response(body: &[u8], asked: &[String]) -> Result<StoreAnswers, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("consent store answered with invalid JSON ({e})"))?;
    let consents = v
        .get("consents")
        .and_then(Value::as_object)
        .ok_or("consent store answer has no `consents` object")?;
    let mut out = StoreAnswers::new();
    for subject in asked {
        let answer = match consents.get(subject) {
            None | Some(Value::Null) => ConsentAnswer::Unknown,
            Some(Value::Object(keys)) => ConsentAnswer::Known(grant_map(keys)?),
            Some(_) => return Err("consent store answer for a subject is not an object".into()),
        };
        out.insert(subject.clone(), answer);
    }
    Ok(out)
}

fn grant_map(keys: &Map<String, Value>) -> Result<BTreeMap<String, bool>, String> {
    keys.iter()
        .map(|(k, v)| match granted(v) {
            Some(g) => Ok((k.clone(), g)),
            None => Err(format!(
                "consent store value for key `{}` is neither a boolean nor {{\"granted\": bool}}",
                truncate_for_log(k)
            )),
        })
        .collect()
}

/// A consent value: `true`/`false`, or an object with a boolean `granted`.
pub(crate) fn granted(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Object(o) => o.get("granted").and_then(Value::as_bool),
        _ => None,
    }
}

/// Serialises an answer for the cross-VM cache, with the id of its subject and its
/// expiry (ms since the epoch).
pub fn cache_encode(id: &str, answer: &ConsentAnswer, expires_ms: u64) -> Vec<u8> {
    let grants = match answer {
        ConsentAnswer::Known(m) => serde_json::to_value(m).unwrap_or(Value::Null),
        ConsentAnswer::Unknown => Value::Null,
    };
    serde_json::json!({ "id": id, "exp": expires_ms, "grants": grants })
        .to_string()
        .into_bytes()
}

/// Reads a cached answer if it is well formed, belongs to subject `id` (a slot may hold
/// another subject's entry) and has not expired at `now_ms`.
pub fn cache_decode(bytes: &[u8], id: &str, now_ms: u64) -> Option<ConsentAnswer> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    if v.get("id")?.as_str()? != id {
        return None;
    }
    let exp = v.get("exp")?.as_u64()?;
    if now_ms >= exp {
        return None;
    }
    match v.get("grants")? {
        Value::Null => Some(ConsentAnswer::Unknown),
        Value::Object(m) => grant_map(m).ok().map(ConsentAnswer::Known),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_grants_per_subject() {
        let h = HeaderConsent::parse("c-1=marketing_email, social ; c-2=").unwrap();
        assert!(h.grants("c-1").unwrap().contains("social"));
        assert!(h.grants("c-2").unwrap().is_empty());
        assert!(h.grants("c-3").is_none());
        assert!(HeaderConsent::parse("c-1").is_err());
        assert!(HeaderConsent::parse("c-1=a; c-1=b").is_err());
    }

    #[test]
    fn store_answers_and_unknown_subjects() {
        let asked = vec!["a".to_string(), "b".to_string()];
        let r = parse_store_response(
            br#"{"consents":{"a":{"k":true,"j":{"granted":false}}}}"#,
            &asked,
        )
        .unwrap();
        let ConsentAnswer::Known(m) = &r["a"] else {
            panic!()
        };
        assert_eq!(m.get("k"), Some(&true));
        assert_eq!(m.get("j"), Some(&false));
        assert_eq!(r["b"], ConsentAnswer::Unknown);
        assert!(parse_store_response(b"<html>", &asked).is_err());
        assert!(parse_store_response(br#"{"consents":{"a":{"k":"yes"}}}"#, &asked).is_err());
        assert!(parse_store_response(br#"{"consents":{"a":[1]}}"#, &asked).is_err());
    }

    #[test]
    fn cache_entries_expire_and_belong_to_one_subject() {
        let a = ConsentAnswer::Known([("k".to_string(), true)].into());
        let bytes = cache_encode("s2:aa", &a, 1000);
        assert_eq!(cache_decode(&bytes, "s2:aa", 999), Some(a));
        assert_eq!(cache_decode(&bytes, "s2:aa", 1000), None);
        assert_eq!(
            cache_decode(&bytes, "s2:bb", 0),
            None,
            "another subject's entry is a miss"
        );
        let u = cache_encode("s2:aa", &ConsentAnswer::Unknown, 1000);
        assert_eq!(cache_decode(&u, "s2:aa", 0), Some(ConsentAnswer::Unknown));
        assert_eq!(cache_decode(b"garbage", "s2:aa", 0), None);
    }
}
