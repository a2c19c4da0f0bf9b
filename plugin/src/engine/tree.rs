//! The tree evaluator: the body parsed into a `serde_json::Value`, its records found and
//! every field decided on the tree, the tree written out again. This was the filter's
//! path before the streaming one ([`super::stream`]); it is kept, natively only (it is
//! not in the .wasm), as the oracle the streaming path is tested against
//! (`plugin/tests/properties.rs`, "the streaming path agrees with the tree"). Both
//! decide with the same [`Judge`]; only how the body is read and written differs.

use super::compile::{Action, CBinding, Policy};
use super::consent::StoreAnswers;
use super::decision::Reason;
use super::encoding;
use super::eval::{
    push_index, BodyVerdict, Exchange, FieldKey, Judge, Report, Uninspectable, UninspectableKind,
    UNDECLARED,
};
use super::matcher::Cursor;
use super::policy::{ShapeMismatch, Undeclared};
use super::selector::{push_edge, Edge, Selector};
use super::strict_json::StrictError;
use super::Direction;
use serde_json::Value;

#[derive(Debug, Clone)]
enum PathElem {
    Key(String),
    Index(usize),
}

/// A body parsed by the tree path, its records located, waiting for consent answers.
#[derive(Debug, Clone)]
pub struct TreePlan {
    doc: Option<Value>,
    binding: usize,
    codings: Vec<encoding::Coding>,
    records: Vec<RecordInfo>,
    /// Subjects whose consent must come from the consent store.
    pub store_subjects: Vec<String>,
}

#[derive(Debug, Clone)]
struct RecordInfo {
    path: Vec<PathElem>,
    subject: Option<String>,
    consent: Option<Value>,
}

fn depth_exceeds(v: &Value, max: usize) -> bool {
    // serde_json bounds nesting at 128, so this recursion is bounded too.
    fn d(v: &Value, left: usize) -> bool {
        match v {
            Value::Array(a) => left == 0 || a.iter().any(|x| d(x, left - 1)),
            Value::Object(o) => left == 0 || o.values().any(|x| d(x, left - 1)),
            _ => false,
        }
    }
    d(v, max)
}

/// Follows a singular selector from `root`.
fn get_singular<'v>(sel: &Selector, root: &'v Value) -> Option<&'v Value> {
    use super::selector::Atom;
    let mut cur = root;
    for step in &sel.steps {
        cur = match (step.atoms.first()?, cur) {
            (Atom::Name(n), Value::Object(o)) => match o.get(n) {
                Some(v) => v,
                // Field names match in any case, so must the subject and consent paths:
                // `ID` is the subject when there is no `id` (one spelling only).
                None => {
                    let mut same = o.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n));
                    match (same.next(), same.next()) {
                        (Some((_, v)), None) => v,
                        _ => return None,
                    }
                }
            },
            (Atom::Index(i), Value::Array(a)) => {
                let idx = if *i >= 0 {
                    usize::try_from(*i).ok()?
                } else {
                    a.len()
                        .checked_sub(usize::try_from(i.unsigned_abs()).ok()?)?
                };
                a.get(idx)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

fn subject_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Finds every node `sel` selects from `root`, without descending into a found node.
fn find_all(sel: &Selector, root: &Value, limit: usize) -> Result<Vec<Vec<PathElem>>, usize> {
    fn go(
        sel: &Selector,
        v: &Value,
        states: &[usize],
        path: &mut Vec<PathElem>,
        out: &mut Vec<Vec<PathElem>>,
        limit: usize,
    ) -> Result<(), usize> {
        if states.iter().any(|&p| sel.is_complete(p)) {
            out.push(path.clone());
            if out.len() > limit {
                return Err(out.len());
            }
            return Ok(());
        }
        if states.is_empty() {
            return Ok(());
        }
        let mut next = Vec::new();
        match v {
            Value::Object(o) => {
                for (k, child) in o {
                    next.clear();
                    for &p in states {
                        sel.advance(p, Edge::Key(k), &mut |q| next.push(q));
                    }
                    if !next.is_empty() {
                        path.push(PathElem::Key(k.clone()));
                        let n = next.clone();
                        go(sel, child, &n, path, out, limit)?;
                        path.pop();
                    }
                }
            }
            Value::Array(a) => {
                let len = a.len();
                for (i, child) in a.iter().enumerate() {
                    next.clear();
                    for &p in states {
                        sel.advance(p, Edge::Index(i, len), &mut |q| next.push(q));
                    }
                    if !next.is_empty() {
                        path.push(PathElem::Index(i));
                        let n = next.clone();
                        go(sel, child, &n, path, out, limit)?;
                        path.pop();
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(sel, root, &[0], &mut Vec::new(), &mut out, limit)?;
    Ok(out)
}

fn get_path_mut<'v>(root: &'v mut Value, path: &[PathElem]) -> Option<&'v mut Value> {
    let mut cur = root;
    for e in path {
        cur = match (e, cur) {
            (PathElem::Key(k), Value::Object(o)) => o.get_mut(k)?,
            (PathElem::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn path_string(path: &[PathElem]) -> String {
    let mut s = String::from("$");
    for e in path {
        match e {
            PathElem::Key(k) => push_edge(&mut s, Edge::Key(k)),
            PathElem::Index(i) => push_edge(&mut s, Edge::Index(*i, 0)),
        }
    }
    s
}

/// The path template of a record: [`path_string`] with every index written `[*]`
/// (with [`Policy::exact_paths`], as written).
fn path_template(path: &[PathElem], exact: bool) -> String {
    let mut s = String::from("$");
    for e in path {
        match e {
            PathElem::Key(k) => push_edge(&mut s, Edge::Key(k)),
            PathElem::Index(i) => push_index(&mut s, *i, exact),
        }
    }
    s
}

/// Walks one record, deciding and applying as it goes.
struct RecordWalk<'a, 'r> {
    judge: Judge<'a>,
    binding: &'a CBinding,
    report: &'r mut Report,
    changed: bool,
}

impl RecordWalk<'_, '_> {
    /// Returns false when the node must be removed from its parent.
    fn visit(
        &mut self,
        node: &mut Value,
        state: &Cursor,
        mut covered: bool,
        path: &mut String,
    ) -> bool {
        let policy = self.judge.policy;
        let matcher = &self.binding.matcher;
        // The fields whose selectors select this node, in field order, each once.
        let complete = matcher.complete(state);
        if !complete.is_empty() {
            let worst = self
                .judge
                .decide_node(self.binding, complete, path, self.report);
            if let Some(action) = worst {
                if *action != Action::Block {
                    self.changed = true;
                }
                return !self.judge.apply(node, action);
            }
            covered = true;
        }
        let undeclared_strip = policy.undeclared == Undeclared::Strip && !covered;
        let is_container = matches!(node, Value::Object(_) | Value::Array(_));
        if undeclared_strip && (state.is_dead() || !is_container) {
            let key = FieldKey {
                category: UNDECLARED,
                action: "strip",
                reason: Some(Reason::Undeclared),
                purpose: None,
                evidence: None,
            };
            self.report.record(key, path, self.judge.subject);
            self.changed = true;
            return false;
        }
        if state.is_dead() && !undeclared_strip && !covered {
            return true;
        }
        match node {
            Value::Object(map) => {
                map.retain(|k, child| {
                    let next = matcher.step(state, Edge::Key(k));
                    if next.is_dead() && !undeclared_strip {
                        return true;
                    }
                    let len = path.len();
                    push_edge(path, Edge::Key(k));
                    let keep = self.visit(child, &next, covered, path);
                    path.truncate(len);
                    keep
                });
            }
            Value::Array(items) => {
                let n = items.len();
                let mut i = 0;
                items.retain_mut(|child| {
                    let next = matcher.step(state, Edge::Index(i, n));
                    let keep = if next.is_dead() && !undeclared_strip {
                        true
                    } else {
                        let len = path.len();
                        push_index(path, i, policy.exact_paths);
                        let keep = self.visit(child, &next, covered, path);
                        path.truncate(len);
                        keep
                    };
                    i += 1;
                    keep
                });
            }
            _ => {}
        }
        true
    }
}

impl Policy {
    /// The tree path's [`Policy::plan_body`]: parses the body into a tree and locates
    /// its records.
    pub fn plan_body_tree(
        &self,
        ex: &Exchange,
        direction: Direction,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<TreePlan, Uninspectable> {
        let Some(b) = ex.binding(direction) else {
            return Ok(TreePlan {
                doc: None,
                binding: 0,
                codings: Vec::new(),
                records: Vec::new(),
                store_subjects: Vec::new(),
            });
        };
        let mut plan = TreePlan {
            doc: None,
            binding: b.0,
            codings: Vec::new(),
            records: Vec::new(),
            store_subjects: Vec::new(),
        };
        if body.is_empty() {
            return Ok(plan);
        }
        let (body, codings) = self.prepare_body(content_type, content_encoding, body.into())?;
        plan.codings = codings;
        let body = &body[..];
        let doc: Value = super::strict_json::parse(body).map_err(|e| match e {
            StrictError::Syntax { too_deep: true, .. } => Uninspectable::new(
                UninspectableKind::TooDeep,
                format!(
                    "JSON nests deeper than the policy's limit of {}",
                    self.max_depth
                ),
            ),
            StrictError::Syntax { message, .. } => Uninspectable::new(
                UninspectableKind::Malformed,
                format!("body is not valid JSON: {message}"),
            ),
            dup @ StrictError::DuplicateKey { .. } => Uninspectable::new(
                UninspectableKind::Ambiguous,
                format!(
                    "{dup}; parsers disagree on which value counts, so the body cannot be judged"
                ),
            ),
        })?;
        if depth_exceeds(&doc, self.max_depth) {
            return Err(Uninspectable::new(
                UninspectableKind::TooDeep,
                format!(
                    "JSON nests deeper than the policy's limit of {}",
                    self.max_depth
                ),
            ));
        }
        let binding = &self.bindings[b.0];
        let paths = find_all(&binding.records, &doc, self.max_records).map_err(|n| {
            Uninspectable::new(
                UninspectableKind::TooManyRecords,
                format!("more than {} records (found at least {n}); split the batch or raise limits.max_records", self.max_records),
            )
        })?;
        if let Some(why) = self.shape_problem(binding, &doc, &paths) {
            let mut refusal = Uninspectable::new(UninspectableKind::ShapeMismatch, why);
            refusal.tolerated = binding.shape_mismatch == ShapeMismatch::Pass;
            return Err(refusal);
        }
        for path in paths {
            let Some(record) = get_path_mut_ref(&doc, &path) else {
                continue;
            };
            let subject = binding
                .subject
                .as_ref()
                .and_then(|s| get_singular(s, record))
                .and_then(subject_of);
            let consent = binding
                .consent
                .as_ref()
                .and_then(|s| get_singular(s, record))
                .filter(|v| v.is_object())
                .cloned();
            if let Some(s) = &subject {
                if !plan.store_subjects.contains(s)
                    && self.needs_store(ex, direction, s, consent.as_ref())
                {
                    plan.store_subjects.push(s.clone());
                }
            }
            plan.records.push(RecordInfo {
                path,
                subject,
                consent,
            });
        }
        plan.doc = Some(doc);
        Ok(plan)
    }

    /// Why a body does not have its binding's shape, if it does not. A body has it when
    /// `records` finds records that can hold what the binding declares (objects, `null`
    /// or empty arrays; any array where a selector starts with an index or a wildcard;
    /// anything with `undeclared: strip`, which removes what it does not judge), or when
    /// it finds none because the batch is empty: the deepest part of the records path
    /// that exists in the body selects only empty containers (`{"customers": []}`, or
    /// `{}`, `[]`, `null` as the whole body). Anything else (a renamed envelope, a bare
    /// record, a top-level array, a list of strings) would carry its data past the
    /// policy unjudged.
    fn shape_problem(
        &self,
        binding: &CBinding,
        doc: &Value,
        records: &[Vec<PathElem>],
    ) -> Option<String> {
        let records_path = &binding.records.source;
        let mismatch = || {
            format!("the body has no records at `{records_path}` and is not an empty batch, so the data in it would pass unjudged; send the records where binding `{}` expects them, or have the policy bind this shape", binding.name)
        };
        if records.is_empty() && !binding.records.steps.iter().any(|s| s.descendant) {
            return (!empty_batch(doc, &binding.records.steps)).then(mismatch);
        }
        if records.is_empty() {
            // With a `..` step the records may be anywhere: the deepest part of the path
            // that is in the body must select only empty containers.
            for prefix in &binding.records_prefixes {
                let nodes = find_all(prefix, doc, self.max_records).unwrap_or_else(|_| vec![]);
                if nodes.is_empty() {
                    continue;
                }
                let empty = |v: &Value| match v {
                    Value::Null => true,
                    Value::Array(a) => a.is_empty(),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                let all_empty = nodes
                    .iter()
                    .all(|p| get_path_mut_ref(doc, p).is_some_and(empty));
                return (!all_empty).then(mismatch);
            }
            return None;
        }
        // With `undeclared: strip` whatever a record holds is judged or removed.
        if self.undeclared == Undeclared::Strip {
            return None;
        }
        for p in records {
            let ok = match get_path_mut_ref(doc, p) {
                None | Some(Value::Null | Value::Object(_)) => true,
                Some(Value::Array(a)) => a.is_empty() || !binding.records_are_objects,
                Some(_) => false,
            };
            if !ok {
                return Some(format!("a record at `{}` is not a JSON object, so binding `{}` cannot judge what it holds; send each record as an object", path_string(p), binding.name));
            }
        }
        None
    }

    /// The tree path's [`Policy::judge_body`]: decides every record on the tree and
    /// writes the tree out again when something changed.
    pub fn judge_body_tree(
        &self,
        ex: &Exchange,
        direction: Direction,
        plan: TreePlan,
        store: &StoreAnswers,
    ) -> BodyVerdict {
        let mut verdict = BodyVerdict::default();
        let Some(mut doc) = plan.doc else {
            return verdict;
        };
        let binding = &self.bindings[plan.binding];
        let mut changed = false;
        let initial = binding.matcher.start();
        for rec in &plan.records {
            let Some(node) = get_path_mut(&mut doc, &rec.path) else {
                continue;
            };
            let mut judge = Judge::new(self, ex, direction, rec.subject.as_deref(), store);
            judge.record_consent = rec.consent.as_ref();
            verdict.report.records += 1;
            let mut path = path_template(&rec.path, self.exact_paths);
            let mut walk = RecordWalk {
                judge,
                binding,
                report: &mut verdict.report,
                changed: false,
            };
            let keep = walk.visit(node, &initial, false, &mut path);
            changed |= walk.changed;
            if !keep {
                // The record itself was removed: it stays in place as `null`, so the
                // positions of the other records do not shift.
                *node = Value::Null;
            }
        }
        if changed {
            // A Value with string keys always serialises; the encoders write to memory.
            let json = serde_json::to_vec(&doc).unwrap_or_default();
            verdict.body = Some(encoding::encode(&json, &plan.codings).unwrap_or(json));
        }
        verdict
    }
}

/// Whether `node`, in which the record path `steps` (no `..` among them) finds no record,
/// is an empty batch: every branch of the path ends in an empty container (or `null`)
/// before it ends, never at a member that is not there or at a scalar.
fn empty_batch(node: &Value, steps: &[super::selector::Step]) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return true;
    };
    let selects = |edge: Edge<'_>| step.atoms.iter().any(|a| a.matches(edge));
    let children: Vec<&Value> = match node {
        Value::Null => return true,
        Value::Array(a) if a.is_empty() => return true,
        Value::Object(o) if o.is_empty() => return true,
        Value::Array(a) => a
            .iter()
            .enumerate()
            .filter(|(i, _)| selects(Edge::Index(*i, a.len())))
            .map(|(_, v)| v)
            .collect(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| selects(Edge::Key(k)))
            .map(|(_, v)| v)
            .collect(),
        _ => return false,
    };
    !children.is_empty() && children.iter().all(|c| empty_batch(c, rest))
}

fn get_path_mut_ref<'v>(root: &'v Value, path: &[PathElem]) -> Option<&'v Value> {
    let mut cur = root;
    for e in path {
        cur = match (e, cur) {
            (PathElem::Key(k), Value::Object(o)) => o.get(k)?,
            (PathElem::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}
