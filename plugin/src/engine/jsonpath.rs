//! A parser for the subset of JSONPath (RFC 9535) that policy selectors use: the root
//! `$`, then child and descendant segments of names, indexes and wildcards, alone or in
//! bracketed unions. Filters and slices are recognised so they can be refused with a
//! reason. This keeps a general JSONPath engine (and its regex and PEG dependencies) out
//! of the `.wasm`; tests check it against `jsonpath-rust` on every shape policies use.

use super::selector::{Atom, Step};

/// Parses `source` into steps, or says what is wrong and where (1-based column).
pub fn parse(source: &str) -> Result<Vec<Step>, String> {
    let mut p = Parser {
        s: source.as_bytes(),
        i: 0,
        src: source,
    };
    p.path()
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        format!(
            "`{}` is not a valid JSONPath ({what} at column {}); write it like `$.customers[*]` or `$.address.city`",
            self.src,
            self.i + 1
        )
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn path(&mut self) -> Result<Vec<Step>, String> {
        if !self.eat(b'$') {
            return Err(self.err("it must start with `$`"));
        }
        let mut steps = Vec::new();
        loop {
            self.blank();
            match self.peek() {
                None => return Ok(steps),
                Some(b'.') => {
                    self.i += 1;
                    let descendant = self.eat(b'.');
                    let atoms = match self.peek() {
                        Some(b'[') if descendant => self.bracket()?,
                        Some(b'*') => {
                            self.i += 1;
                            vec![Atom::Wildcard]
                        }
                        _ => vec![Atom::Name(self.member_name()?)],
                    };
                    steps.push(Step { descendant, atoms });
                }
                Some(b'[') => {
                    let atoms = self.bracket()?;
                    steps.push(Step {
                        descendant: false,
                        atoms,
                    });
                }
                Some(_) => return Err(self.err("expected `.` or `[`")),
            }
        }
    }

    /// A shorthand name: a letter, `_` or non-ASCII, then also digits.
    fn member_name(&mut self) -> Result<String, String> {
        let start = self.i;
        while let Some(b) = self.peek() {
            let first = self.i == start;
            let ok =
                b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 || (!first && b.is_ascii_digit());
            if !ok {
                break;
            }
            self.i += 1;
        }
        if self.i == start {
            return Err(self.err("expected a name, `*` or `[`"));
        }
        std::str::from_utf8(&self.s[start..self.i])
            .map(str::to_string)
            .map_err(|_| self.err("invalid UTF-8"))
    }

    /// `[` selector (`,` selector)* `]`.
    fn bracket(&mut self) -> Result<Vec<Atom>, String> {
        self.i += 1; // `[`
        let mut atoms = Vec::new();
        loop {
            self.blank();
            let atom = match self.peek() {
                Some(b'\'' | b'"') => Atom::Name(self.string()?),
                Some(b'*') => {
                    self.i += 1;
                    Atom::Wildcard
                }
                Some(b'?') => return Err(format!(
                    "`{}` uses a filter `[?...]`; a field's category may not depend on its value: bind the field by name, and use a separate message binding per shape",
                    self.src
                )),
                Some(b'-' | b'0'..=b'9' | b':') => self.index_or_slice()?,
                _ => return Err(self.err("expected a quoted name, an index or `*`")),
            };
            atoms.push(atom);
            self.blank();
            if self.eat(b']') {
                return Ok(atoms);
            }
            if !self.eat(b',') {
                return Err(self.err("expected `,` or `]`"));
            }
        }
    }

    fn index_or_slice(&mut self) -> Result<Atom, String> {
        let start = self.i;
        if self.eat(b'-') && self.peek() == Some(b'0') {
            return Err(self.err("`-0` is not an index"));
        }
        let digits = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.blank();
        if self.peek() == Some(b':') {
            return Err(format!(
                "`{}` uses a slice; selectors take names, indexes, `*` and `..` only: use `[*]` for every element",
                self.src
            ));
        }
        let text = std::str::from_utf8(&self.s[start..self.i])
            .unwrap_or("")
            .trim();
        if self.i == digits
            || (text.trim_start_matches('-').len() > 1
                && text.trim_start_matches('-').starts_with('0'))
        {
            return Err(self.err("expected an integer index without leading zeros"));
        }
        text.parse::<i64>()
            .ok()
            .filter(|n| n.unsigned_abs() < (1u64 << 53))
            .map(Atom::Index)
            .ok_or_else(|| self.err("index out of range"))
    }

    /// A single- or double-quoted name with JSON-style escapes.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match b {
                _ if b == quote => return Ok(out),
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.i += 1;
                    match e {
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'/' | b'\\' | b'\'' | b'"' => out.push(char::from(e)),
                        b'u' => out.push(self.unicode()?),
                        _ => return Err(self.err("unknown escape")),
                    }
                }
                b if b < 0x20 => return Err(self.err("control character in a name")),
                _ => {
                    // Copy one whole UTF-8 character.
                    let start = self.i - 1;
                    let len = match b {
                        0xf0.. => 4,
                        0xe0.. => 3,
                        0xc0.. => 2,
                        _ => 1,
                    };
                    let end = (start + len).min(self.s.len());
                    let ch = std::str::from_utf8(&self.s[start..end])
                        .map_err(|_| self.err("invalid UTF-8"))?;
                    out.push_str(ch);
                    self.i = end;
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let text = std::str::from_utf8(h).map_err(|_| self.err("bad \\u escape"))?;
        let v = u32::from_str_radix(text, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    fn unicode(&mut self) -> Result<char, String> {
        let hi = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&hi) {
            if !(self.eat(b'\\') && self.eat(b'u')) {
                return Err(self.err("lone surrogate in \\u escape"));
            }
            let lo = self.hex4()?;
            if !(0xdc00..0xe000).contains(&lo) {
                return Err(self.err("lone surrogate in \\u escape"));
            }
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| self.err("lone surrogate in \\u escape"))
    }
}
