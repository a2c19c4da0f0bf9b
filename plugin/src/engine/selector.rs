//! Policy selectors: JSONPath (RFC 9535) parsed once when the policy is compiled (by
//! [`super::jsonpath`], checked in tests against `jsonpath-rust`), as a small step list
//! that the per-message walk matches without ever parsing JSONPath again.
//!
//! Supported: names (`.a`, `['a']`), indexes (`[0]`, `[-1]`), wildcards (`[*]`, `.*`),
//! unions of those (`['a','b']`, `[0,2]`) and descendants (`..a`, `..*`). Filters and
//! slices are refused at compile time: what a field is must not depend on its value.

/// One thing a step can match at a child edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Atom {
    Name(String),
    Index(i64),
    Wildcard,
}

/// One step of a lowered selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `..`: the atoms may match at any depth below the current node.
    pub descendant: bool,
    pub atoms: Vec<Atom>,
}

/// A lowered selector: the steps from its root (the body or a record) to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub source: String,
    pub steps: Vec<Step>,
}

/// A child edge while walking a document.
#[derive(Debug, Clone, Copy)]
pub enum Edge<'a> {
    Key(&'a str),
    /// Index and the array's length (for negative indexes).
    Index(usize, usize),
}

impl Atom {
    pub(crate) fn matches(&self, edge: Edge<'_>) -> bool {
        match (self, edge) {
            (Atom::Wildcard, _) => true,
            // A recipient's parser may match keys case-insensitively (many object
            // mappers do): `Email` is judged as `email`, never let through unjudged.
            (Atom::Name(n), Edge::Key(k)) => n.eq_ignore_ascii_case(k),
            (Atom::Index(i), Edge::Index(at, len)) => {
                if *i >= 0 {
                    usize::try_from(*i).is_ok_and(|i| i == at)
                } else {
                    let back = i.unsigned_abs();
                    usize::try_from(back).is_ok_and(|b| b <= len && len - b == at)
                }
            }
            _ => false,
        }
    }
}

impl Selector {
    /// Parses and lowers a JSONPath. The error says what is wrong and what to write
    /// instead; the caller adds where the selector is.
    pub fn parse(source: &str) -> Result<Selector, String> {
        Ok(Selector {
            source: source.to_string(),
            steps: super::jsonpath::parse(source)?,
        })
    }

    /// The selector is `$`: it selects its root.
    pub fn is_root(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether this selector can only ever select one node (no wildcard, union or
    /// descendant), as a subject id or a consent object must be.
    pub fn is_singular(&self) -> bool {
        self.steps
            .iter()
            .all(|s| !s.descendant && s.atoms.len() == 1 && !matches!(s.atoms[0], Atom::Wildcard))
    }

    /// Positions reachable after following `edge` from a node where the selector was
    /// at `pos` (a position is the number of steps already matched). A descendant step
    /// stays active below its node, so it may yield both `pos` and `pos + 1`.
    pub fn advance(&self, pos: usize, edge: Edge<'_>, out: &mut impl FnMut(usize)) {
        let Some(step) = self.steps.get(pos) else {
            return;
        };
        if step.descendant {
            out(pos);
        }
        if step.atoms.iter().any(|a| a.matches(edge)) {
            out(pos + 1);
        }
    }

    pub fn is_complete(&self, pos: usize) -> bool {
        pos == self.steps.len()
    }
}

/// Appends one edge to a normalized path string (`$.a[0]['b c']`) for the decision log.
pub fn push_edge(path: &mut String, edge: Edge<'_>) {
    use std::fmt::Write;
    match edge {
        Edge::Index(i, _) => {
            let _ = write!(path, "[{i}]");
        }
        Edge::Key(k) => {
            let plain = !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.as_bytes()[0].is_ascii_digit();
            if plain {
                path.push('.');
                path.push_str(k);
            } else {
                path.push_str("['");
                for c in k.chars() {
                    match c {
                        '\'' => path.push_str("\\'"),
                        '\\' => path.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(path, "\\u{:04x}", c as u32);
                        }
                        c => path.push(c),
                    }
                }
                path.push_str("']");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonpath_rust::parser::model::{Segment, Selector as JpSelector};
    use jsonpath_rust::parser::parse_json_path;

    /// The reference: jsonpath-rust's parse, lowered to steps.
    fn reference(source: &str) -> Result<Vec<Step>, String> {
        let q = parse_json_path(source).map_err(|e| e.to_string())?;
        q.segments
            .iter()
            .map(|s| lower_segment(source, s))
            .collect()
    }

    pub(super) fn lower_segment(source: &str, segment: &Segment) -> Result<Step, String> {
        match segment {
            Segment::Selector(s) => Ok(Step {
                descendant: false,
                atoms: vec![lower_selector(source, s)?],
            }),
            Segment::Selectors(list) => Ok(Step {
                descendant: false,
                atoms: list
                    .iter()
                    .map(|s| lower_selector(source, s))
                    .collect::<Result<_, _>>()?,
            }),
            Segment::Descendant(inner) => {
                let mut step = lower_segment(source, inner)?;
                if step.descendant {
                    return Err(format!(
                        "`{source}` nests `..` twice; one `..` already reaches every depth"
                    ));
                }
                step.descendant = true;
                Ok(step)
            }
        }
    }

    fn lower_selector(source: &str, selector: &JpSelector) -> Result<Atom, String> {
        match selector {
            JpSelector::Name(n) => Ok(Atom::Name(unquote(n))),
            JpSelector::Index(i) => Ok(Atom::Index(*i)),
            JpSelector::Wildcard => Ok(Atom::Wildcard),
            JpSelector::Slice(..) => Err(format!(
                "`{source}` uses a slice; selectors take names, indexes, `*` and `..` only: use `[*]` for every element"
            )),
            JpSelector::Filter(_) => Err(format!(
                "`{source}` uses a filter `[?...]`; a field's category may not depend on its value: bind the field by name, and use a separate message binding per shape"
            )),
        }
    }

    /// jsonpath-rust keeps the quotes of bracketed names (`['a']` gives `'a'`).
    fn unquote(name: &str) -> String {
        let b = name.as_bytes();
        if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
            name[1..name.len() - 1].to_string()
        } else {
            name.to_string()
        }
    }

    #[test]
    fn the_parser_agrees_with_jsonpath_rust() {
        let accepted = [
            "$",
            "$.a",
            "$.a.b",
            "$['a b']",
            "$[\"a\"]",
            "$.c[*].e",
            "$.c[1]",
            "$.c[-1]",
            "$['x','y']",
            "$[0,2]",
            "$..email",
            "$..*",
            "$.a..b",
            "$..['a','b']",
            "$.*",
            "$[*]",
            "$.customers[*]",
            "$.déjà",
            "$['it\\'s']",
            "$['\\u0041']",
            "$.a_1",
            "$ .a",
            "$[ 'a' , 'b' ]",
            "$['😀']",
            "$['\\ud83d\\ude00']",
        ];
        for src in accepted {
            let ours = crate::engine::jsonpath::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(Ok(ours), reference(src), "{src}");
        }
        let refused = [
            "",
            "a",
            "$.",
            "$..",
            "$[",
            "$['a'",
            "$[01]",
            "$[-0]",
            "$.1a",
            "$a",
            "$['a\\q']",
            "$[1:2]",
            "$[?@.a]",
            "$.a[?@.b == 1]",
            "$[1,]",
            "$...a",
        ];
        for src in refused {
            assert!(
                crate::engine::jsonpath::parse(src).is_err(),
                "{src} was accepted"
            );
        }
    }

    fn reach(sel: &str, edges: &[Edge<'_>]) -> bool {
        let s = Selector::parse(sel).unwrap();
        let mut states = vec![0usize];
        for e in edges {
            let mut next = Vec::new();
            for &p in &states {
                s.advance(p, *e, &mut |q| next.push(q));
            }
            states = next;
        }
        states.iter().any(|&p| s.is_complete(p))
    }

    #[test]
    fn names_indexes_wildcards() {
        assert!(reach("$.a.b", &[Edge::Key("a"), Edge::Key("b")]));
        assert!(!reach("$.a.b", &[Edge::Key("a"), Edge::Key("c")]));
        assert!(reach("$['a b']", &[Edge::Key("a b")]));
        assert!(reach(
            "$.c[*].e",
            &[Edge::Key("c"), Edge::Index(3, 5), Edge::Key("e")]
        ));
        assert!(reach("$.c[1]", &[Edge::Key("c"), Edge::Index(1, 5)]));
        assert!(!reach("$.c[1]", &[Edge::Key("c"), Edge::Index(2, 5)]));
        assert!(reach("$.c[-1]", &[Edge::Key("c"), Edge::Index(4, 5)]));
        assert!(!reach("$.c[-6]", &[Edge::Key("c"), Edge::Index(0, 5)]));
        assert!(reach("$['x','y']", &[Edge::Key("y")]));
        assert!(
            reach("$.email", &[Edge::Key("EMail")]),
            "names match in any case"
        );
    }

    #[test]
    fn descendants_reach_any_depth() {
        assert!(reach("$..email", &[Edge::Key("email")]));
        assert!(reach(
            "$..email",
            &[Edge::Key("a"), Edge::Index(0, 1), Edge::Key("email")]
        ));
        assert!(!reach("$..email", &[Edge::Key("a"), Edge::Key("b")]));
        assert!(reach(
            "$.a..*",
            &[Edge::Key("a"), Edge::Key("b"), Edge::Key("c")]
        ));
    }

    #[test]
    fn root_and_singular() {
        assert!(Selector::parse("$").unwrap().is_root());
        assert!(Selector::parse("$.a[0].b").unwrap().is_singular());
        assert!(!Selector::parse("$.a[*]").unwrap().is_singular());
        assert!(!Selector::parse("$..a").unwrap().is_singular());
    }

    #[test]
    fn filters_slices_and_garbage_are_refused_with_a_hint() {
        let e = Selector::parse("$.a[?@.b == 1]").unwrap_err();
        assert!(e.contains("filter"), "{e}");
        let e = Selector::parse("$.a[1:3]").unwrap_err();
        assert!(e.contains("slice"), "{e}");
        let e = Selector::parse("customers[").unwrap_err();
        assert!(e.contains("not a valid JSONPath"), "{e}");
    }

    #[test]
    fn normalized_paths() {
        let mut p = String::from("$");
        push_edge(&mut p, Edge::Key("customers"));
        push_edge(&mut p, Edge::Index(2, 3));
        push_edge(&mut p, Edge::Key("e-mail"));
        push_edge(&mut p, Edge::Key("it's"));
        assert_eq!(p, "$.customers[2]['e-mail']['it\\'s']");
    }
}
