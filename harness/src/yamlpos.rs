//! YAML (and JSON) with source positions.
//!
//! [`parse`] reads one YAML 1.2 document, or one JSON text, into a [`serde_json::Value`]
//! and a [`Positions`] map from JSON Pointer (RFC 6901, `""` for the root) to the 1-based
//! line and column of each node, so that errors found later, by whoever interprets the
//! value, can name the line a user has to fix.
//!
//! - **JSON** text (first non-blank character `{` or `[`) is read with `serde_json`, and its
//!   positions are taken by a small scanner. JSON that is not strictly valid (comments,
//!   unquoted keys: YAML flow style) is then tried as YAML.
//! - **YAML** is read with yaml-rust2's event parser. Plain scalars are resolved by the
//!   YAML 1.2 core schema: `null`, `~` and the empty scalar are null; `true`/`false` (also
//!   `True`, `TRUE`, ...) are booleans; decimal, `0x` and `0o` integers; floats. `.inf` and
//!   `.nan`, and numbers too large for a double, are refused: JSON cannot hold them.
//!   Quoted and block scalars are strings. The tags `!!str`, `!!int`, `!!float`, `!!bool`,
//!   `!!null`, `!!seq`, `!!map` and the non-specific `!` are understood; others are refused.
//! - Mapping keys must be strings (`1: x` is refused: quote the key), and a key may appear
//!   only once per mapping, in YAML and JSON alike.
//! - Anchors and aliases are expanded. The expanded document may hold at most
//!   [`MAX_NODES`] nodes (a string counts one node per 64 bytes), which stops
//!   "billion laughs" documents; nesting is limited to [`MAX_DEPTH`].
//! - A file holds one document: a second `---` document is an error.
//!
//! Positions: for a mapping entry, [`Positions::key`] is where its key is written and
//! [`Positions::value`] where its value starts; for an array element or the root only
//! the value position exists. Nodes produced by an alias have no positions of their own
//! below the alias: [`Positions::nearest`] finds the alias. Columns count characters.

use consentry::engine::positions::{self, JsonScan, PosError};
pub use consentry::engine::positions::{escape_token, join, Pos, Positions};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Most nodes an expanded YAML document may have (aliases counted every time they are used).
pub const MAX_NODES: usize = 1_000_000;
/// Deepest nesting of sequences and mappings in a YAML document.
pub const MAX_DEPTH: usize = 200;
/// A string scalar counts one node per this many bytes against [`MAX_NODES`].
const BYTES_PER_NODE: usize = 64;

/// A document that could not be read: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl YamlError {
    fn at(pos: Pos, message: impl Into<String>) -> Self {
        YamlError {
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }

    /// The position as a [`Pos`].
    pub fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }
}

/// Reads one YAML document or JSON text; see the module documentation.
pub fn parse(text: &str) -> Result<(Value, Positions), YamlError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if looks_like_json(text) {
        match serde_json::from_str::<Value>(text) {
            Ok(value) => {
                let pos = positions::json(text).map_err(pos_error)?;
                return Ok((value, pos));
            }
            Err(json_err) => {
                // Maybe YAML flow style (comments, unquoted keys); if not, the JSON error
                // is the one that makes sense for a file that looks like JSON.
                return parse_yaml(text).map_err(|_| json_error(&json_err));
            }
        }
    }
    parse_yaml(text)
}

/// Reads a sequence of JSON texts separated by optional whitespace (concatenated JSON,
/// JSON Lines), each with its own positions (lines and columns are those of `text`).
pub fn parse_json_stream(text: &str) -> Result<Vec<(Value, Positions)>, YamlError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut scan = JsonScan::new(text);
    for item in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        let value = item.map_err(|e| json_error(&e))?;
        out.push((value, scan.next_value().map_err(pos_error)?));
    }
    Ok(out)
}

fn pos_error(e: PosError) -> YamlError {
    YamlError::at(e.pos, e.message)
}

fn looks_like_json(text: &str) -> bool {
    matches!(text.trim_start().chars().next(), Some('{' | '['))
}

fn json_error(e: &serde_json::Error) -> YamlError {
    let msg = e.to_string();
    // serde_json appends " at line L column C"; the position is reported separately.
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    YamlError {
        line: e.line().max(1),
        column: e.column().max(1),
        message: format!("invalid JSON: {msg}"),
    }
}

// ---------------------------------------------------------------------------------------
// YAML

fn mark_pos(m: &Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

enum Kind {
    Seq(Vec<Value>),
    Map {
        map: Map<String, Value>,
        key: Option<String>,
        seen: HashMap<String, Pos>,
    },
}

struct Frame {
    kind: Kind,
    ptr: String,
    anchor: usize,
    nodes_at_start: usize,
    start_index: usize,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    pos: Positions,
    anchors: HashMap<usize, (Value, usize)>,
    nodes: usize,
    root: Option<Value>,
    docs: usize,
}

/// Where the next node goes.
enum Slot {
    /// A value, at this pointer.
    Value(String),
    /// The key of the current mapping entry.
    Key,
}

fn parse_yaml(text: &str) -> Result<(Value, Positions), YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut b = Builder::default();
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            YamlError::at(mark_pos(e.marker()), format!("invalid YAML: {}", e.info()))
        })?;
        let at = mark_pos(&mark);
        match event {
            Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
            Event::DocumentStart => {
                b.docs += 1;
                if b.docs > 1 {
                    return Err(YamlError::at(
                        at,
                        "a second YAML document starts here; a file holds exactly one document \
                         (remove the `---` and what follows, or split the file)",
                    ));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                b.count(1 + text.len() / BYTES_PER_NODE, at)?;
                let value =
                    resolve_scalar(text, style, tag.as_ref()).map_err(|m| YamlError::at(at, m))?;
                if anchor != 0 {
                    let n = 1 + string_len(&value) / BYTES_PER_NODE;
                    b.anchors.insert(anchor, (value.clone(), n));
                }
                b.node(value, at, mark.index())?;
            }
            Event::Alias(id) => {
                let Some(n) = b.anchors.get(&id).map(|(_, n)| *n) else {
                    return Err(YamlError::at(at, "alias to an unknown anchor"));
                };
                // Count before cloning, so an exponential document stops here.
                b.count(n, at)?;
                let value = b
                    .anchors
                    .get(&id)
                    .map(|(v, _)| v.clone())
                    .unwrap_or_default();
                b.node(value, at, mark.index())?;
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq", at)?;
                b.open(Kind::Seq(Vec::new()), anchor, at, mark.index())?;
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map", at)?;
                let kind = Kind::Map {
                    map: Map::new(),
                    key: None,
                    seen: HashMap::new(),
                };
                b.open(kind, anchor, at, mark.index())?;
            }
            Event::SequenceEnd | Event::MappingEnd => b.close(at)?,
        }
    }
    let root = b.root.unwrap_or(Value::Null);
    if b.pos.value("").is_none() {
        b.pos.set_value(String::new(), Pos { line: 1, column: 1 });
    }
    Ok((root, b.pos))
}

fn string_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        _ => 0,
    }
}

impl Builder {
    fn count(&mut self, n: usize, at: Pos) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(YamlError::at(
                at,
                format!(
                    "the document expands to more than {MAX_NODES} nodes (aliases count every \
                     time they are used); use fewer aliases or split the file"
                ),
            ));
        }
        Ok(())
    }

    fn slot(&self) -> Slot {
        match self.stack.last() {
            None => Slot::Value(String::new()),
            Some(Frame {
                kind: Kind::Seq(items),
                ptr,
                ..
            }) => Slot::Value(format!("{ptr}/{}", items.len())),
            Some(Frame {
                kind: Kind::Map { key: Some(k), .. },
                ptr,
                ..
            }) => Slot::Value(join(ptr, k)),
            Some(Frame {
                kind: Kind::Map { key: None, .. },
                ..
            }) => Slot::Key,
        }
    }

    /// A complete node (scalar or alias) at `at`.
    fn node(&mut self, value: Value, at: Pos, index: usize) -> Result<(), YamlError> {
        match self.slot() {
            Slot::Key => self.key(value, at, index),
            Slot::Value(ptr) => {
                self.pos.set_value(ptr, at);
                self.attach(value);
                Ok(())
            }
        }
    }

    fn key(&mut self, value: Value, at: Pos, index: usize) -> Result<(), YamlError> {
        let key = match value {
            Value::String(s) => s,
            other => {
                return Err(YamlError::at(
                    at,
                    format!(
                        "mapping key {other} is a {}, but keys must be strings; quote it (\"{}\")",
                        type_name(&other),
                        other.to_string().trim_matches('"')
                    ),
                ))
            }
        };
        let Some(frame) = self.stack.last_mut() else {
            return Err(YamlError::at(at, "internal error: a key outside a mapping"));
        };
        let first_key = frame.start_index > index;
        let ptr = frame.ptr.clone();
        if let Kind::Map {
            key: slot, seen, ..
        } = &mut frame.kind
        {
            if let Some(first) = seen.get(&key) {
                return Err(pos_error(positions::duplicate_key(&key, *first, at)));
            }
            seen.insert(key.clone(), at);
            self.pos.set_key(join(&ptr, &key), at);
            *slot = Some(key);
        }
        if first_key {
            // A block mapping's start event is reported after its first key.
            self.pos.set_value(ptr, at);
        }
        Ok(())
    }

    fn open(&mut self, kind: Kind, anchor: usize, at: Pos, index: usize) -> Result<(), YamlError> {
        let ptr = match self.slot() {
            Slot::Value(p) => p,
            Slot::Key => {
                return Err(YamlError::at(
                    at,
                    "a sequence or mapping is used as a mapping key; keys must be strings",
                ))
            }
        };
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError::at(
                at,
                format!("nesting deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.count(1, at)?;
        self.pos.set_value(ptr.clone(), at);
        self.stack.push(Frame {
            kind,
            ptr,
            anchor,
            nodes_at_start: self.nodes - 1,
            start_index: index,
        });
        Ok(())
    }

    fn close(&mut self, at: Pos) -> Result<(), YamlError> {
        let Some(frame) = self.stack.pop() else {
            return Err(YamlError::at(
                at,
                "internal error: unbalanced collection end",
            ));
        };
        let value = match frame.kind {
            Kind::Seq(items) => Value::Array(items),
            Kind::Map { map, .. } => Value::Object(map),
        };
        if frame.anchor != 0 {
            let n = self.nodes - frame.nodes_at_start;
            self.anchors.insert(frame.anchor, (value.clone(), n));
        }
        self.attach(value);
        Ok(())
    }

    /// Puts a finished value where the current slot says (never called for keys).
    fn attach(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame {
                kind: Kind::Seq(items),
                ..
            }) => items.push(value),
            Some(Frame {
                kind: Kind::Map { map, key, .. },
                ..
            }) => {
                if let Some(k) = key.take() {
                    map.insert(k, value);
                }
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "sequence",
        Value::Object(_) => "mapping",
    }
}

/// `Some(name)` for a core-schema tag `!!name`.
fn core_tag(tag: &Tag) -> Option<&str> {
    if tag.handle == "tag:yaml.org,2002:" || tag.handle == "!!" {
        Some(tag.suffix.as_str())
    } else {
        None
    }
}

fn unsupported_tag(tag: &Tag) -> String {
    format!(
        "unsupported tag {}{}; remove it (only !!str, !!int, !!float, !!bool, !!null, !!seq and \
         !!map are understood)",
        tag.handle, tag.suffix
    )
}

fn check_collection_tag(tag: Option<&Tag>, want: &str, at: Pos) -> Result<(), YamlError> {
    match tag {
        None => Ok(()),
        Some(t) if core_tag(t) == Some(want) => Ok(()),
        Some(t) => Err(YamlError::at(at, unsupported_tag(t))),
    }
}

fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(t) = tag {
        if t.handle == "!" && t.suffix.is_empty() {
            return Ok(Value::String(text));
        }
        let want = match core_tag(t) {
            Some("str") => return Ok(Value::String(text)),
            Some(w @ ("int" | "float" | "bool" | "null")) => w,
            _ => return Err(unsupported_tag(t)),
        };
        let v = resolve_plain(text.trim())?;
        let ok = match (want, &v) {
            ("null", Value::Null) | ("bool", Value::Bool(_)) => true,
            ("int", Value::Number(n)) => n.is_i64() || n.is_u64(),
            ("float", Value::Number(_)) => true,
            _ => false,
        };
        if !ok {
            return Err(format!("{text:?} is not a valid !!{want}"));
        }
        if want == "float" {
            if let Some(f) = v.as_f64() {
                return Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("{text:?} cannot be represented in JSON"));
            }
        }
        return Ok(v);
    }
    match style {
        TScalarStyle::Plain => resolve_plain(&text),
        _ => Ok(Value::String(text)),
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Result<Value, String> {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => {
            return Err(format!(
                "{s} (infinity / not-a-number) cannot be represented in JSON; quote it (\"{s}\") \
                 if a string is meant"
            ))
        }
        _ => {}
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return u64::from_str_radix(hex, 16)
                .map(|n| Value::Number(n.into()))
                .map_err(|_| format!("integer {s} does not fit in 64 bits"));
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if !oct.is_empty() && oct.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
            return u64::from_str_radix(oct, 8)
                .map(|n| Value::Number(n.into()))
                .map_err(|_| format!("integer {s} does not fit in 64 bits"));
        }
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
        if let Ok(n) = s.parse::<i64>() {
            return Ok(Value::Number(n.into()));
        }
        if let Ok(n) = digits.parse::<u64>() {
            if !s.starts_with('-') {
                return Ok(Value::Number(n.into()));
            }
        }
        // Beyond 64 bits: a double, as serde_json reads such JSON numbers.
        return float(s);
    }
    if is_core_float(s) {
        return float(s);
    }
    Ok(Value::String(s.to_string()))
}

fn float(s: &str) -> Result<Value, String> {
    let f: f64 = s
        .parse()
        .map_err(|_| format!("{s} is not a valid number"))?;
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("number {s} is too large for JSON"))
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let f = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac_digits = i - f;
        if int_digits == 0 && frac_digits == 0 {
            return false;
        }
    } else if int_digits == 0 {
        return false;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let e = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == e {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(line: usize, column: usize) -> Option<Pos> {
        Some(Pos { line, column })
    }

    #[test]
    fn yaml_values_and_positions() {
        let text = "name: x\nlist:\n  - 1\n  - k: v\n    j: [a, \"b\"]\nempty:\n";
        let (v, pos) = parse(text).unwrap();
        assert_eq!(
            v,
            json!({"name": "x", "list": [1, {"k": "v", "j": ["a", "b"]}], "empty": null})
        );
        assert_eq!(pos.key("/name"), p(1, 1));
        assert_eq!(pos.value("/name"), p(1, 7));
        assert_eq!(pos.key("/list"), p(2, 1));
        assert_eq!(pos.value("/list"), p(3, 3));
        assert_eq!(pos.value("/list/0"), p(3, 5));
        assert_eq!(pos.value("/list/1"), p(4, 5));
        assert_eq!(pos.key("/list/1/k"), p(4, 5));
        assert_eq!(pos.key("/list/1/j"), p(5, 5));
        assert_eq!(pos.value("/list/1/j/1"), p(5, 12));
        assert_eq!(pos.get("/list/1/j/1"), p(5, 12));
        assert_eq!(pos.get("/list/1/k"), p(4, 5));
        assert_eq!(pos.value(""), p(1, 1));
        assert_eq!(pos.nearest("/list/1/j/7/x"), p(5, 5));
        assert_eq!(pos.nearest("/nothing"), p(1, 1));
        assert_eq!(pos.key("/list/1"), None);
    }

    #[test]
    fn example_policy_json_maps_to_its_lines() {
        let text = include_str!("../../policies/acme-customers.json");
        // Where `needle` starts in the text (1-based line and column), so the test
        // follows edits of the example policy.
        let at = |needle: &str| {
            let (i, line) = text
                .lines()
                .enumerate()
                .find(|(_, l)| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in the example policy"));
            p(i + 1, line.find(needle).unwrap() + 1)
        };
        let (v, pos) = parse(text).unwrap();
        let direct: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v, direct);
        assert_eq!(pos.key("/name"), p(3, 3));
        assert_eq!(pos.value("/name"), p(3, 11));
        assert_eq!(pos.key("/services"), at("\"services\""));
        assert_eq!(
            pos.key("/services/marketing-email"),
            at("\"marketing-email\": {")
        );
        assert_eq!(
            pos.key("/purposes/marketing.email"),
            at("\"marketing.email\": {")
        );
        let consent_key = at("\"consent_key\": \"marketing_email\"");
        assert_eq!(
            pos.key("/purposes/marketing.email/consent_key"),
            consent_key
        );
        assert_eq!(pos.key("/messages"), at("\"messages\""));
        let keep_last = at("\"keep_last\": 4");
        assert_eq!(
            pos.key("/messages/0/fields/3/action/mask/keep_last"),
            keep_last
        );
        assert_eq!(pos.value(""), p(1, 1));
        // Reading the JSON as YAML (the fallback path) gives the same value and lines.
        let (y, ypos) = parse_yaml(text).unwrap();
        assert_eq!(y, direct);
        assert_eq!(
            ypos.key("/purposes/marketing.email/consent_key"),
            consent_key
        );
        assert_eq!(
            ypos.key("/messages/0/fields/3/action/mask/keep_last"),
            keep_last
        );
    }

    #[test]
    fn json_with_tabs_surrogates_and_compact_keys() {
        let text = "{\n\t\"a\":1,\n\t\"b\": \"\\ud83d\\ude00 \\/ é\", \"c\": [true, null]\n}";
        let (v, pos) = parse(text).unwrap();
        assert_eq!(v, json!({"a": 1, "b": "😀 / é", "c": [true, null]}));
        assert_eq!(pos.key("/a"), p(2, 2));
        assert_eq!(pos.value("/a"), p(2, 6));
        assert_eq!(pos.key("/c"), p(3, 28));
        assert_eq!(pos.value("/c/1"), p(3, 40));
    }

    #[test]
    fn json_errors() {
        let e = parse("{\n  \"a\": 1,\n  \"a\": 2\n}").unwrap_err();
        assert_eq!((e.line, e.column), (3, 3));
        assert!(
            e.message.contains("line 2") && e.message.contains("line 3"),
            "{e}"
        );
        let e = parse("{\n  \"a\": 1\n  \"b\": 2\n}").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.starts_with("invalid JSON"), "{e}");
    }

    #[test]
    fn yaml_flow_that_is_not_json_still_reads() {
        let (v, _) = parse("{a: 1, # comment\n b: [x]}").unwrap();
        assert_eq!(v, json!({"a": 1, "b": ["x"]}));
    }

    #[test]
    fn core_schema_scalars() {
        let text = "a: ~\nb: null\nc:\nd: True\ne: false\nf: 0x1F\ng: 0o17\nh: -42\ni: 1.5\n\
                    j: .5\nk: 1e3\nl: '1'\nm: \"true\"\nn: yes\no: 1.2.3\np: +7\nq: 18446744073709551615\n\
                    r: !!str 12\ns: 123456789012345678901234\nt: |\n  two\n  lines\n";
        let (v, _) = parse(text).unwrap();
        assert_eq!(v["a"], Value::Null);
        assert_eq!(v["b"], Value::Null);
        assert_eq!(v["c"], Value::Null);
        assert_eq!(v["d"], json!(true));
        assert_eq!(v["e"], json!(false));
        assert_eq!(v["f"], json!(31));
        assert_eq!(v["g"], json!(15));
        assert_eq!(v["h"], json!(-42));
        assert_eq!(v["i"], json!(1.5));
        assert_eq!(v["j"], json!(0.5));
        assert_eq!(v["k"], json!(1000.0));
        assert_eq!(v["l"], json!("1"));
        assert_eq!(v["m"], json!("true"));
        assert_eq!(v["n"], json!("yes"));
        assert_eq!(v["o"], json!("1.2.3"));
        assert_eq!(v["p"], json!(7));
        assert_eq!(v["q"], json!(u64::MAX));
        assert_eq!(v["r"], json!("12"));
        assert_eq!(v["s"], json!(1.2345678901234568e23));
        assert_eq!(v["t"], json!("two\nlines\n"));
    }

    #[test]
    fn infinities_and_nan_are_refused() {
        for bad in [
            "x: .inf",
            "x: -.Inf",
            "x: .nan",
            "x: 1e999",
            "x: !!float .inf",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.line, 1, "{bad}: {e}");
            assert!(e.message.contains("JSON"), "{bad}: {e}");
        }
        assert_eq!(parse("x: '.inf'").unwrap().0, json!({"x": ".inf"}));
    }

    #[test]
    fn keys_must_be_strings() {
        let e = parse("a: 1\n2: b\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 1));
        assert!(e.message.contains("quote it"), "{e}");
        let e = parse("? [a, b]\n: c\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = parse("null: 1").unwrap_err();
        assert!(e.message.contains("null"), "{e}");
        assert_eq!(parse("\"2\": b").unwrap().0, json!({"2": "b"}));
    }

    #[test]
    fn duplicate_keys_name_both_lines() {
        let e = parse("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
        assert_eq!((e.line, e.column), (4, 3));
        assert!(e.message.contains("\"c\""), "{e}");
        assert!(
            e.message.contains("line 3") && e.message.contains("line 4"),
            "{e}"
        );
    }

    #[test]
    fn aliases_expand_and_point_at_the_alias() {
        let text = "base: &b {x: 1, y: [2]}\nother: *b\nname: &n hello\nalso: *n\n";
        let (v, pos) = parse(text).unwrap();
        assert_eq!(v["other"], json!({"x": 1, "y": [2]}));
        assert_eq!(v["also"], json!("hello"));
        assert_eq!(pos.value("/other"), p(2, 8));
        assert_eq!(pos.nearest("/other/y/0"), p(2, 1));
        assert_eq!(pos.value("/base/y/0"), p(1, 21));
    }

    #[test]
    fn billion_laughs_is_stopped() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let names = ["b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let mut prev = "a";
        for n in names {
            text.push_str(&format!("{n}: &{n} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
            prev = n;
        }
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("more than"), "{e}");
        // Large strings count by size too.
        let big = "y".repeat(100_000);
        let mut text = format!("a: &a \"{big}\"\nb: [");
        for _ in 0..1000 {
            text.push_str("*a, ");
        }
        text.push_str("]\n");
        assert!(parse(&text).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("a: {}1{}", "[".repeat(600), "]".repeat(600));
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("recursion limit"), "{e}");
        let mut text = String::new();
        for depth in 0..300 {
            text.push_str(&" ".repeat(depth));
            text.push_str("k:\n");
        }
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("nesting"), "{e}");
        assert_eq!(e.line, MAX_DEPTH + 1, "{e}");
        // As JSON, serde_json's own limit answers first.
        let text = format!("{}1{}", "[".repeat(600), "]".repeat(600));
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("recursion limit"), "{e}");
    }

    #[test]
    fn one_document_only() {
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("one document"), "{e}");
        // A leading `---` alone is fine, as is an empty file.
        assert_eq!(parse("---\na: 1\n").unwrap().0, json!({"a": 1}));
        assert_eq!(parse("# nothing\n").unwrap().0, Value::Null);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.starts_with("invalid YAML"), "{e}");
        let e = parse("a: !custom x").unwrap_err();
        assert!(e.message.contains("unsupported tag"), "{e}");
    }

    #[test]
    fn pointers_escape_tokens() {
        let (_, pos) = parse("\"a/b\": {\"~c\": 1}").unwrap();
        assert_eq!(pos.key("/a~1b/~0c"), p(1, 9));
        assert_eq!(join("/x", "a/b~"), "/x/a~1b~0");
    }

    #[test]
    fn json_streams() {
        let text = "{\"a\": 1}\n{\"b\":\n  [2]} [3]";
        let docs = parse_json_stream(text).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].0, json!({"b": [2]}));
        assert_eq!(docs[1].1.key("/b"), p(2, 2));
        assert_eq!(docs[1].1.value("/b/0"), p(3, 4));
        assert_eq!(docs[2].1.value(""), p(3, 8));
        let e = parse_json_stream("{\"a\": 1}\n{\"a\": ").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }
}
