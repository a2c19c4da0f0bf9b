//! The transformations applied to a field that may not pass, and keyed pseudonyms.

use super::policy::MaskSpec;
use super::route::hex_digit;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A key of the policy (`keys.hash_key_env`, `keys.subject_key_env`) ready for HMAC:
/// its key schedule (the inner and outer padded blocks) is computed once when the policy
/// compiles, so a value costs two SHA-256 compressions instead of four. Never printed.
#[derive(Clone)]
pub struct MacKey(HmacSha256);

impl MacKey {
    pub fn new(key: &[u8]) -> MacKey {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail (and the
        // policy refuses keys shorter than MIN_KEY_BYTES before this is reached).
        MacKey(
            HmacSha256::new_from_slice(key)
                .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default())),
        )
    }

    /// HMAC-SHA256 of `data`.
    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// Keyed pseudonym of `data`: HMAC-SHA256 truncated to 128 bits, hex, with a version tag
/// so the scheme can change without silently breaking joins.
pub fn keyed_digest(tag: &str, key: &MacKey, data: &[u8]) -> String {
    let out = key.mac(data);
    let mut s = String::with_capacity(tag.len() + 32);
    s.push_str(tag);
    for b in &out[..16] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";
const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The tag of [`subject_pseudonym`]s. `s1:` (128 bits in hex, decision records v1) is
/// no longer written.
pub const SUBJECT_TAG: &str = "s2:";

/// Subject pseudonym for decision records and the consent cache: `s2:` and the first
/// 96 bits of HMAC-SHA256(subject key, subject) in base64url without padding (16
/// characters). 96 bits keep the chance that two of a billion subjects share a pseudonym
/// near 6·10^-12 (birthday bound n^2 / 2^97), at about half the length of `s1:`'s hex.
pub fn subject_pseudonym(key: &[u8], subject: &str) -> String {
    pseudonym(&MacKey::new(key), subject)
}

/// [`subject_pseudonym`] under a prepared key.
pub fn pseudonym(key: &MacKey, subject: &str) -> String {
    let out = key.mac(subject.as_bytes());
    let mut s = String::with_capacity(SUBJECT_TAG.len() + 16);
    s.push_str(SUBJECT_TAG);
    for chunk in out[..12].chunks(3) {
        let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            s.push(char::from(BASE64URL[(n >> shift & 63) as usize]));
        }
    }
    s
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
pub fn hash_value(key: &MacKey, v: &Value) -> Value {
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
        let a = keyed_digest("h1:", &MacKey::new(b"k1k1k1k1k1k1k1k1"), b"c-1");
        assert_eq!(
            a,
            keyed_digest("h1:", &MacKey::new(b"k1k1k1k1k1k1k1k1"), b"c-1")
        );
        assert_ne!(
            a,
            keyed_digest("h1:", &MacKey::new(b"k2k2k2k2k2k2k2k2"), b"c-1")
        );
        assert_ne!(
            a,
            keyed_digest("h1:", &MacKey::new(b"k1k1k1k1k1k1k1k1"), b"c-2")
        );
        assert!(a.starts_with("h1:") && a.len() == 35);
    }

    #[test]
    fn subject_pseudonyms_are_96_bits_of_the_hmac_in_base64url() {
        let key = b"k1k1k1k1k1k1k1k1";
        let s = subject_pseudonym(key, "c-1");
        assert_eq!(s, subject_pseudonym(key, "c-1"));
        assert_ne!(s, subject_pseudonym(key, "c-2"));
        assert_ne!(s, subject_pseudonym(b"k2k2k2k2k2k2k2k2", "c-1"));
        assert!(s.starts_with("s2:") && s.len() == 19, "{s}");
        assert!(s[3..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        // The same HMAC as `h1:`/`s1:` digests: its first 12 bytes, re-encoded.
        let hex = keyed_digest("", &MacKey::new(key), b"c-1");
        let want: Vec<u8> = (0..12)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut got = Vec::new();
        let val = |c: u8| BASE64URL.iter().position(|&x| x == c).unwrap() as u32;
        for q in s.as_bytes()[3..].chunks(4) {
            let n = q.iter().fold(0, |acc, &c| acc << 6 | val(c));
            got.extend([(n >> 16) as u8, (n >> 8) as u8, n as u8]);
        }
        assert_eq!(got, want);
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
