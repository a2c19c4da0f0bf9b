//! Parsing a body the way the filter must: a document two parsers could read differently
//! is refused rather than guessed at.
//!
//! JSON allows a key to appear twice in one object, and parsers disagree on which value
//! wins (serde_json and most JavaScript engines take the last, others the first, some
//! refuse). If the filter judged one value and the recipient read the other, a denied
//! value would slip through. So a duplicate key, compared after `\u` escapes are decoded,
//! makes the body ambiguous.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Why a body could not be parsed.
#[derive(Debug)]
pub enum StrictError {
    /// Not JSON (or nested past serde_json's recursion limit: `too_deep`).
    Syntax { message: String, too_deep: bool },
    /// An object holds the same key twice; `key` is cut short for the log.
    DuplicateKey { key: String },
}

const DUPLICATE: &str = "\u{0}duplicate key\u{0}";

/// Parses `body` into a value, refusing duplicate keys.
pub fn parse(body: &[u8]) -> Result<Value, StrictError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = StrictValue::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    result.map_err(|e| {
        let msg = e.to_string();
        if let Some(rest) = msg.strip_prefix(DUPLICATE) {
            let key = rest.split(" at line ").next().unwrap_or(rest);
            StrictError::DuplicateKey {
                key: key.chars().take(40).collect(),
            }
        } else {
            StrictError::Syntax {
                too_deep: msg.contains("recursion limit"),
                message: msg,
            }
        }
    })
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE}{key}")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrictError::Syntax { message, .. } => f.write_str(message),
            StrictError::DuplicateKey { key } => {
                write!(f, "the key `{key}` appears twice in one object")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json() {
        let text = br#"{"a":[1,-2,3.5,true,null,"x"],"b":{"c":{}}}"#;
        let v = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v, serde_json::from_slice::<Value>(text).unwrap());
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_spelled_with_escapes() {
        for text in [
            &br#"{"email":"a","email":"b"}"#[..],
            br#"{"email":"a","em\u0061il":"b"}"#,
            br#"{"c":[{"id":1,"x":{"k":1,"k":2}}]}"#,
        ] {
            match parse(text) {
                Err(StrictError::DuplicateKey { .. }) => {}
                other => panic!("{}: {other:?}", String::from_utf8_lossy(text)),
            }
        }
        assert!(
            parse(br#"{"a":{"k":1},"b":{"k":2}}"#).is_ok(),
            "the same key in two objects is fine"
        );
    }

    #[test]
    fn trailing_garbage_and_depth_are_syntax_errors() {
        assert!(matches!(
            parse(b"{} {}"),
            Err(StrictError::Syntax {
                too_deep: false,
                ..
            })
        ));
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(StrictError::Syntax { too_deep: true, .. })
        ));
    }
}
