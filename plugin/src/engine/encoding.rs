//! Content codings the filter can look through: `gzip` (and `x-gzip`) and `deflate`,
//! alone or stacked (`gzip, gzip`). A body is decoded to be judged and, when it changed,
//! encoded again with the same codings, so the recipient gets what the headers say.
//! Anything else (`br`, `zstd`, `compress`, ...) cannot be inspected and is refused.

use flate2::read::{DeflateDecoder, GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use std::io::{Read, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// `deflate` as RFC 9110 means it: zlib-wrapped. A raw deflate stream, which some
    /// servers send instead, is read too but written back zlib-wrapped.
    Deflate,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Unsupported(String),
    Corrupt(String),
    TooLarge,
}

/// The codings of a `content-encoding` value, in the order they were applied.
pub fn codings(header: &str) -> Result<Vec<Coding>, DecodeError> {
    let mut out = Vec::new();
    for c in header.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match c.to_ascii_lowercase().as_str() {
            "identity" => {}
            "gzip" | "x-gzip" => out.push(Coding::Gzip),
            "deflate" => out.push(Coding::Deflate),
            _ => return Err(DecodeError::Unsupported(c.chars().take(32).collect())),
        }
    }
    Ok(out)
}

/// Undoes `codings` (last applied first), refusing output over `limit` bytes: a small
/// compressed body must not become a huge one in the filter's memory.
pub fn decode(body: &[u8], codings: &[Coding], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut data = body.to_vec();
    for c in codings.iter().rev() {
        data = match c {
            Coding::Gzip => read_limited(GzDecoder::new(&data[..]), limit)?,
            Coding::Deflate => match read_limited(ZlibDecoder::new(&data[..]), limit) {
                Ok(d) => d,
                Err(DecodeError::Corrupt(_)) => {
                    read_limited(DeflateDecoder::new(&data[..]), limit)?
                }
                Err(e) => return Err(e),
            },
        };
    }
    Ok(data)
}

fn read_limited(r: impl Read, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    r.take(cap)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// Applies `codings` in order.
pub fn encode(body: &[u8], codings: &[Coding]) -> Result<Vec<u8>, String> {
    let mut data = body.to_vec();
    for c in codings {
        data = match c {
            Coding::Gzip => {
                let mut e = GzEncoder::new(Vec::new(), Compression::fast());
                e.write_all(&data).map_err(|e| e.to_string())?;
                e.finish().map_err(|e| e.to_string())?
            }
            Coding::Deflate => {
                let mut e = ZlibEncoder::new(Vec::new(), Compression::fast());
                e.write_all(&data).map_err(|e| e.to_string())?;
                e.finish().map_err(|e| e.to_string())?
            }
        };
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_codings_round_trip() {
        let body = br#"{"customers":[{"email":"a@b.c"}]}"#;
        for header in [
            "gzip",
            "x-gzip",
            "deflate",
            "gzip, gzip",
            "deflate, gzip",
            "identity",
        ] {
            let cs = codings(header).unwrap();
            let wire = encode(body, &cs).unwrap();
            assert_eq!(decode(&wire, &cs, 1 << 20).unwrap(), body, "{header}");
        }
    }

    #[test]
    fn raw_deflate_is_read_too() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
        e.write_all(b"{}").unwrap();
        let raw = e.finish().unwrap();
        assert_eq!(decode(&raw, &[Coding::Deflate], 100).unwrap(), b"{}");
    }

    #[test]
    fn unknown_codings_corrupt_data_and_bombs_are_refused() {
        assert_eq!(
            codings("gzip, br"),
            Err(DecodeError::Unsupported("br".into()))
        );
        assert!(matches!(
            decode(b"not gzip", &[Coding::Gzip], 100),
            Err(DecodeError::Corrupt(_))
        ));
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(&vec![b' '; 1 << 20]).unwrap();
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 4096, "{}", bomb.len());
        assert_eq!(
            decode(&bomb, &[Coding::Gzip], 1 << 16),
            Err(DecodeError::TooLarge)
        );
    }
}
