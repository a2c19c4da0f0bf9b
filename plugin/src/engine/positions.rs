//! Where each node of a JSON document is written: JSON Pointer to line and column.
//!
//! The filter uses it to say on which line of a policy an error is (only when there is
//! one), and to refuse a policy that writes a key twice in one object (JSON parsers
//! disagree on which value wins; `serde_json` silently takes the last). The harness
//! (`yamlpos`) uses the same positions for YAML and JSON policies and traffic files.

use std::collections::HashMap;
use std::fmt;

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where each node of a parsed document was written, by JSON Pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    keys: HashMap<String, Pos>,
    values: HashMap<String, Pos>,
}

impl Positions {
    /// Where the key of the mapping entry `ptr` is written.
    pub fn key(&self, ptr: &str) -> Option<Pos> {
        self.keys.get(ptr).copied()
    }

    /// Where the value at `ptr` starts.
    pub fn value(&self, ptr: &str) -> Option<Pos> {
        self.values.get(ptr).copied()
    }

    /// The position of the node at `ptr`: its key for a mapping entry, else its value.
    pub fn get(&self, ptr: &str) -> Option<Pos> {
        self.key(ptr).or_else(|| self.value(ptr))
    }

    /// [`Positions::get`] of `ptr` or, when that is unknown (a node that does not exist,
    /// or one produced by an alias), of its closest ancestor that is known.
    pub fn nearest(&self, ptr: &str) -> Option<Pos> {
        let mut p = ptr;
        loop {
            if let Some(pos) = self.get(p) {
                return Some(pos);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }

    /// Records where the key of the mapping entry `ptr` is written.
    pub fn set_key(&mut self, ptr: String, at: Pos) {
        self.keys.insert(ptr, at);
    }

    /// Records where the value at `ptr` starts.
    pub fn set_value(&mut self, ptr: String, at: Pos) {
        self.values.insert(ptr, at);
    }

    /// Number of nodes with a known position.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Escapes one reference token of a JSON Pointer (`~` → `~0`, `/` → `~1`).
pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// `ptr` extended by one reference token (escaped here).
pub fn join(ptr: &str, token: &str) -> String {
    let mut s = String::with_capacity(ptr.len() + token.len() + 1);
    s.push_str(ptr);
    s.push('/');
    s.push_str(&escape_token(token));
    s
}

/// A text the scanner could not follow: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosError {
    pub pos: Pos,
    pub message: String,
}

impl PosError {
    fn at(pos: Pos, message: impl Into<String>) -> Self {
        PosError {
            pos,
            message: message.into(),
        }
    }
}

/// The positions of every node of the JSON text `text`, which holds one value. Refuses
/// a key written twice in one object.
pub fn json(text: &str) -> Result<Positions, PosError> {
    JsonScan::new(text).next_value()
}

// The text has normally been accepted by serde_json already, so this scanner only has to
// follow the structure; it still never indexes out of bounds, and says where it stopped
// on text it cannot follow.

pub struct JsonScan<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
    col: usize, // 0-based, in characters
    pos: Positions,
}

impl<'a> JsonScan<'a> {
    pub fn new(text: &'a str) -> Self {
        JsonScan {
            b: text.as_bytes(),
            i: 0,
            line: 1,
            col: 0,
            pos: Positions::default(),
        }
    }

    /// Scans the next value of the text (a sequence of JSON texts, separated by
    /// whitespace) and returns the positions of its nodes.
    pub fn next_value(&mut self) -> Result<Positions, PosError> {
        self.pos = Positions::default();
        self.value(String::new())?;
        Ok(std::mem::take(&mut self.pos))
    }

    fn here(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.col + 1,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn bump(&mut self) {
        if let Some(c) = self.peek() {
            self.i += 1;
            if c == b'\n' {
                self.line += 1;
                self.col = 0;
            } else if c & 0xC0 != 0x80 {
                self.col += 1;
            }
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.bump();
        }
    }

    fn unexpected(&self) -> PosError {
        PosError::at(self.here(), "invalid JSON: unexpected character")
    }

    /// Skips a string; returns its raw text including the quotes.
    fn string(&mut self) -> Result<&'a str, PosError> {
        let start = self.i;
        self.bump(); // opening quote
        loop {
            match self.peek() {
                None => return Err(self.unexpected()),
                Some(b'\\') => {
                    self.bump();
                    self.bump();
                }
                Some(b'"') => {
                    self.bump();
                    break;
                }
                Some(_) => self.bump(),
            }
        }
        std::str::from_utf8(&self.b[start..self.i]).map_err(|_| self.unexpected())
    }

    fn value(&mut self, ptr: String) -> Result<(), PosError> {
        self.ws();
        self.pos.values.insert(ptr.clone(), self.here());
        match self.peek() {
            Some(b'{') => {
                self.bump();
                let mut seen: HashMap<String, Pos> = HashMap::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.bump();
                    return Ok(());
                }
                loop {
                    self.ws();
                    let at = self.here();
                    let raw = self.string()?;
                    let key: String = serde_json::from_str(raw).map_err(|_| self.unexpected())?;
                    if let Some(first) = seen.get(&key) {
                        return Err(duplicate_key(&key, *first, at));
                    }
                    seen.insert(key.clone(), at);
                    let child = join(&ptr, &key);
                    self.pos.keys.insert(child.clone(), at);
                    self.ws();
                    if self.peek() != Some(b':') {
                        return Err(self.unexpected());
                    }
                    self.bump();
                    self.value(child)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.bump(),
                        Some(b'}') => {
                            self.bump();
                            return Ok(());
                        }
                        _ => return Err(self.unexpected()),
                    }
                }
            }
            Some(b'[') => {
                self.bump();
                self.ws();
                if self.peek() == Some(b']') {
                    self.bump();
                    return Ok(());
                }
                let mut n = 0usize;
                loop {
                    self.value(format!("{ptr}/{n}"))?;
                    n += 1;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.bump(),
                        Some(b']') => {
                            self.bump();
                            return Ok(());
                        }
                        _ => return Err(self.unexpected()),
                    }
                }
            }
            Some(b'"') => self.string().map(|_| ()),
            Some(_) => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.bump();
                }
                Ok(())
            }
            None => Err(self.unexpected()),
        }
    }
}

/// The error for `key` written twice in one mapping, at `first` and `again`.
pub fn duplicate_key(key: &str, first: Pos, again: Pos) -> PosError {
    PosError::at(
        again,
        format!(
            "duplicate key {key:?}: first at line {}, again at line {}; keep only one of them",
            first.line, again.line
        ),
    )
}
