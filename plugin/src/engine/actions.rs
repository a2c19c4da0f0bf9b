//! The transformations applied to a field that may not pass, and keyed pseudonyms.

use super::policy::MaskSpec;
use super::route::hex_digit;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Keyed pseudonym of `data`: HMAC-SHA256 truncated to 128 bits, hex, with a version tag
/// so the scheme can change without silently breaking joins.
pub fn keyed_digest(tag: &str, key: &[u8], data: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return format!("{tag}invalid-key"),
    };
    mac.update(data);
    let out = mac.finalize().into_bytes();
    let mut s = String::with_capacity(tag.len() + 32);
    s.push_str(tag);
    for b in &out[..16] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Subject pseudonym for decision logs.
pub fn subject_pseudonym(key: &[u8], subject: &str) -> String {
    keyed_digest("s1:", key, subject.as_bytes())
}

/// The bytes a value is hashed or masked as: a string's own text, anything else its
/// compact JSON, so `42` and `"42"` give the same pseudonym only if written the same.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `hash`: a keyed pseudonym, so the recipient can still join on it.
pub fn hash_value(key: &[u8], v: &Value) -> Value {
    Value::String(keyed_digest("h1:", key, value_text(v).as_bytes()))
}

/// `mask`: keep the declared part, replace every other character by `*`.
pub fn mask_text(spec: &MaskSpec, text: &str) -> String {
    let (local, domain) = match (spec.keep_domain, text.rfind('@')) {
        (true, Some(at)) => (&text[..at], &text[at..]),
        _ => (text, ""),
    };
    let chars: Vec<char> = local.chars().collect();
    let n = chars.len();
    // Never keep the whole value: at least half of it is masked.
    let budget = n / 2;
    let first = spec.keep_first.min(budget);
    let last = spec.keep_last.min(budget - first);
    let mut out = String::with_capacity(text.len());
    for (i, c) in chars.iter().enumerate() {
        if i < first || i >= n - last {
            out.push(*c);
        } else {
            out.push('*');
        }
    }
    out.push_str(domain);
    out
}

/// Masks a value. A scalar becomes its masked text; an array or object keeps its shape
/// with every scalar inside masked on its own, so the kept part of one value can never
/// be another value of the container.
pub fn mask_value(spec: &MaskSpec, v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|x| mask_value(spec, x)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, x)| (k.clone(), mask_value(spec, x)))
                .collect(),
        ),
        Value::Null => Value::Null,
        scalar => Value::String(mask_text(spec, &value_text(scalar))),
    }
}

/// Decodes `%XX` and `+` in a query component; invalid escapes stay as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < b.len() => match (hex_digit(b[i + 1]), hex_digit(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query component: unreserved characters stay, the rest becomes `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)].to_ascii_uppercase()));
            out.push(char::from(HEX[usize::from(b & 0xf)].to_ascii_uppercase()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_keyed_and_stable() {
        let a = keyed_digest("h1:", b"k1k1k1k1k1k1k1k1", b"c-1");
        assert_eq!(a, keyed_digest("h1:", b"k1k1k1k1k1k1k1k1", b"c-1"));
        assert_ne!(a, keyed_digest("h1:", b"k2k2k2k2k2k2k2k2", b"c-1"));
        assert_ne!(a, keyed_digest("h1:", b"k1k1k1k1k1k1k1k1", b"c-2"));
        assert!(a.starts_with("h1:") && a.len() == 35);
    }

    #[test]
    fn masks_keep_only_the_declared_part() {
        let last4 = MaskSpec {
            keep_last: 4,
            ..Default::default()
        };
        assert_eq!(mask_text(&last4, "+4915112345678"), "**********5678");
        // Short values are never revealed whole.
        assert_eq!(mask_text(&last4, "123"), "**3");
        let email = MaskSpec {
            keep_first: 1,
            keep_domain: true,
            ..Default::default()
        };
        assert_eq!(mask_text(&email, "anna@example.com"), "a***@example.com");
        assert_eq!(mask_text(&MaskSpec::default(), "ab"), "**");
    }

    #[test]
    fn masks_of_containers_mask_each_value_alone() {
        let domain = MaskSpec {
            keep_domain: true,
            ..Default::default()
        };
        let v = serde_json::json!(["ann@example.com", "secret-value", {"k": 12345678}]);
        let out = mask_value(&domain, &v).to_string();
        assert!(
            !out.contains("secret") && !out.contains("12345678"),
            "{out}"
        );
        assert!(out.contains("@example.com"), "{out}");
    }

    #[test]
    fn query_components_round_trip() {
        assert_eq!(percent_decode("a%40b.com"), "a@b.com");
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_encode("[redacted] x@y"), "%5Bredacted%5D%20x%40y");
    }
}
