//! The field matcher of a binding: one automaton over all of its field selectors, built
//! when the policy is compiled, so that the body walk costs about the same per node with
//! 500 selectors as with 5.
//!
//! The selectors together are an NFA whose states are (field, position) pairs, stepped by
//! [`Selector::advance`]. The matcher is its subset construction: a DFA state is a set of
//! NFA states, with the fields complete there (in field order, each once) and transitions
//! for object keys (by name, ASCII-case-insensitively, as [`Selector::advance`] compares
//! them), for array indexes (positive, negative, or one of each at once) and one default
//! for any other key or index (wildcards and the self-loops of descendant steps).
//!
//! Transitions depend only on a state's live NFA states (those not yet complete), so
//! states that differ only in the fields complete there share one transition table.
//!
//! Subset construction can blow up (descendant selectors), so it is bounded: states,
//! transition entries and the work of building them. A transition beyond the bound leads
//! to [`Cursor::Nfa`], which carries the NFA set itself and steps it with
//! [`Selector::advance`] at run time: slower (it allocates), never different. The
//! compiled matcher is read-only, so a policy stays `Send + Sync`.

use super::selector::{Atom, Edge, Selector};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// The state with no live selector: the walk need not look below it.
const DEAD: u32 = 0;
/// A transition the bounded construction did not build: simulated at run time.
const OVERFLOW: u32 = u32::MAX;

/// Bounds of the construction. Past them, transitions are simulated at run time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// DFA states, the dead and start states included (at least 2).
    pub states: usize,
    /// Transition entries over all tables.
    pub edges: usize,
    /// NFA states handled while building transitions: a bound on compile time.
    pub work: usize,
    /// NFA states kept: the live states of each table (for simulation past the bound)
    /// and the complete fields of each state. With `states` and `edges`, a bound on
    /// memory.
    pub pool: usize,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        states: 4096,
        edges: 1 << 17,
        work: 1 << 23,
        pool: 1 << 19,
    };
}

/// A range of one of the matcher's pools.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of<T>(pool: &mut Vec<T>, items: impl IntoIterator<Item = T>) -> Span {
        let start = pool.len();
        pool.extend(items);
        Span {
            start: start as u32,
            len: (pool.len() - start) as u32,
        }
    }

    fn get<T>(self, pool: &[T]) -> &[T] {
        let start = self.start as usize;
        pool.get(start..start + self.len as usize).unwrap_or(&[])
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    table: u32,
    /// Into `complete`: the fields complete here, in field order.
    complete: Span,
}

/// The transitions of every state with one set of live NFA states.
#[derive(Debug, Clone, Copy)]
struct Table {
    /// Into `live`: the live NFA states, for simulation past the bound.
    live: Span,
    /// For any key or index that no entry below lists.
    other: u32,
    /// Into `names`: (symbol, target), by symbol.
    names: Span,
    /// Into `pos`: (index, target), by index.
    pos: Span,
    /// Into `neg`: (distance from the end, target), by distance.
    neg: Span,
    /// Into `both`: (index, distance, target), for an element that both select.
    both: Span,
}

/// Where the walk is in the matcher.
#[derive(Debug)]
pub enum Cursor {
    /// A state of the compiled automaton.
    Dfa(u32),
    /// Past the construction's bound: the NFA set itself.
    Nfa(Box<NfaSet>),
}

#[derive(Debug)]
pub struct NfaSet {
    live: Vec<u32>,
    complete: Vec<u32>,
}

impl Cursor {
    /// No selector is live here nor complete (the NFA set is empty).
    #[inline]
    pub fn is_dead(&self) -> bool {
        match self {
            Cursor::Dfa(s) => *s == DEAD,
            Cursor::Nfa(n) => n.live.is_empty() && n.complete.is_empty(),
        }
    }
}

/// Size of a compiled matcher, for tests and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub states: usize,
    pub tables: usize,
    pub edges: usize,
    /// Transitions (or whole tables) left to run-time simulation by the bound.
    pub overflow: usize,
    /// NFA states handled while building (bounded by [`Limits::work`]).
    pub work: usize,
    /// Heap bytes held by the matcher (approximate: the capacity of its vectors).
    pub heap_bytes: usize,
}

pub struct Matcher {
    /// The NFA: the selectors (for simulation), the NFA id of each field's position 0,
    /// and the field of every NFA id.
    selectors: Vec<Selector>,
    first: Vec<u32>,
    field_of: Vec<u32>,
    symbols: NameTable,
    /// Every selector at its start (the root of a record): the dead state if there are
    /// no selectors, as an empty list of NFA states was before.
    start: u32,
    states: Vec<State>,
    tables: Vec<Table>,
    complete: Vec<u32>,
    live: Vec<u32>,
    names: Vec<(u32, u32)>,
    pos: Vec<(u64, u32)>,
    neg: Vec<(u64, u32)>,
    both: Vec<(u64, u64, u32)>,
    overflow: usize,
    work: usize,
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tables are large and say nothing to a reader.
        write!(f, "Matcher({:?})", self.stats())
    }
}

impl Matcher {
    /// The automaton of a binding's field selectors, in field order.
    pub fn new<'s>(selectors: impl IntoIterator<Item = &'s Selector>) -> Matcher {
        Self::build(selectors, Limits::DEFAULT)
    }

    pub(crate) fn build<'s>(
        selectors: impl IntoIterator<Item = &'s Selector>,
        limits: Limits,
    ) -> Matcher {
        let selectors: Vec<Selector> = selectors.into_iter().cloned().collect();
        let mut first = Vec::with_capacity(selectors.len());
        let mut field_of = Vec::new();
        for (f, s) in selectors.iter().enumerate() {
            first.push(field_of.len() as u32);
            field_of.extend(std::iter::repeat_n(f as u32, s.steps.len() + 1));
        }
        // One past the last field: a field's last NFA state is `first[f + 1] - 1`.
        first.push(field_of.len() as u32);
        let symbols = NameTable::new(
            selectors
                .iter()
                .flat_map(|s| &s.steps)
                .flat_map(|s| &s.atoms)
                .filter_map(|a| match a {
                    Atom::Name(n) => Some(n.as_str()),
                    _ => None,
                }),
        );
        let start = first[..first.len() - 1].to_vec();
        let mut b = Builder {
            m: Matcher {
                selectors,
                first,
                field_of,
                symbols,
                start: DEAD,
                states: Vec::new(),
                tables: Vec::new(),
                complete: Vec::new(),
                live: Vec::new(),
                names: Vec::new(),
                pos: Vec::new(),
                neg: Vec::new(),
                both: Vec::new(),
                overflow: 0,
                work: 0,
            },
            limits,
            state_heads: HashMap::default(),
            state_next: Vec::new(),
            table_heads: HashMap::default(),
            table_next: Vec::new(),
            edges: 0,
            work: 0,
        };
        let dead = b.intern(&[], true);
        debug_assert_eq!(dead, DEAD);
        b.m.start = b.intern(&start, true);
        // Tables are filled in the order they are found; filling one may add more.
        let mut t = 0;
        while t < b.m.tables.len() {
            b.fill(t);
            t += 1;
        }
        let mut m = b.m;
        m.work = b.work;
        m.states.shrink_to_fit();
        m.tables.shrink_to_fit();
        m.complete.shrink_to_fit();
        m.live.shrink_to_fit();
        m.names.shrink_to_fit();
        m.pos.shrink_to_fit();
        m.neg.shrink_to_fit();
        m.both.shrink_to_fit();
        m
    }

    /// Where every selector starts: the root of a record.
    pub fn start(&self) -> Cursor {
        Cursor::Dfa(self.start)
    }

    /// The fields complete at `c` (their selectors select this node), in field order,
    /// each once.
    #[inline]
    pub fn complete<'s>(&'s self, c: &'s Cursor) -> &'s [u32] {
        match c {
            Cursor::Dfa(s) => match self.states.get(*s as usize) {
                Some(st) => st.complete.get(&self.complete),
                None => &[],
            },
            Cursor::Nfa(n) => &n.complete,
        }
    }

    /// The cursor after following `edge` from `c`. Allocates nothing within the
    /// compiled automaton.
    #[inline]
    pub fn step(&self, c: &Cursor, edge: Edge<'_>) -> Cursor {
        match c {
            Cursor::Dfa(s) => {
                let Some(table) = self
                    .states
                    .get(*s as usize)
                    .and_then(|st| self.tables.get(st.table as usize))
                else {
                    return Cursor::Dfa(DEAD);
                };
                match self.target(table, edge) {
                    OVERFLOW => self.simulate(table.live.get(&self.live), edge),
                    t => Cursor::Dfa(t),
                }
            }
            Cursor::Nfa(n) => self.simulate(&n.live, edge),
        }
    }

    #[inline]
    fn target(&self, t: &Table, edge: Edge<'_>) -> u32 {
        match edge {
            Edge::Key(k) => {
                let names = t.names.get(&self.names);
                if names.is_empty() {
                    return t.other;
                }
                let Some(sym) = self.symbols.get(k) else {
                    return t.other;
                };
                match names.binary_search_by_key(&sym, |&(s, _)| s) {
                    Ok(i) => names[i].1,
                    Err(_) => t.other,
                }
            }
            Edge::Index(at, len) => {
                if t.pos.len == 0 && t.neg.len == 0 {
                    return t.other;
                }
                let at = at as u64;
                // `[-b]` selects element `len - b`, for 1 <= b <= len.
                let back = (len as u64).checked_sub(at).filter(|&b| b > 0);
                let pos = lookup(t.pos.get(&self.pos), at);
                let neg = back.and_then(|b| lookup(t.neg.get(&self.neg), b));
                match (pos, neg, back) {
                    (Some(p), None, _) => p,
                    (None, Some(n), _) => n,
                    (Some(_), Some(_), Some(b)) => {
                        let both = t.both.get(&self.both);
                        match both.binary_search_by_key(&(at, b), |&(i, b, _)| (i, b)) {
                            Ok(i) => both[i].2,
                            // Not built: simulate (never different, only slower).
                            Err(_) => OVERFLOW,
                        }
                    }
                    _ => t.other,
                }
            }
        }
    }

    /// One step of the NFA from the live states `live`, as the walk did it before the
    /// automaton: each state advanced by its selector.
    fn simulate(&self, live: &[u32], edge: Edge<'_>) -> Cursor {
        let mut next = Vec::new();
        for &s in live {
            let f = self.field_of[s as usize] as usize;
            let first = self.first[f];
            self.selectors[f].advance((s - first) as usize, edge, &mut |q| {
                next.push(first + q as u32);
            });
        }
        sort(&mut next);
        next.dedup();
        let (live, complete) = self.split(&next);
        Cursor::Nfa(Box::new(NfaSet { live, complete }))
    }

    /// Splits a sorted NFA set into its live states and its complete fields (in field
    /// order: NFA ids grow with the field).
    fn split(&self, set: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let mut live = Vec::new();
        let mut complete = Vec::new();
        for &s in set {
            match self.complete_field(s) {
                Some(f) => complete.push(f),
                None => live.push(s),
            }
        }
        (live, complete)
    }

    /// The field of NFA state `s` if `s` is that field's last (complete) state.
    #[inline]
    fn complete_field(&self, s: u32) -> Option<u32> {
        let f = self.field_of[s as usize];
        (self.first.get(f as usize + 1) == Some(&(s + 1))).then_some(f)
    }

    /// Whether the sorted NFA set `set` splits into exactly `live` and `complete`.
    fn same(&self, set: &[u32], live: &[u32], complete: &[u32]) -> bool {
        let (mut l, mut c) = (live.iter(), complete.iter());
        set.iter().all(|&x| match self.complete_field(x) {
            Some(f) => c.next() == Some(&f),
            None => l.next() == Some(&x),
        }) && l.next().is_none()
            && c.next().is_none()
    }

    /// Whether the live states of the sorted NFA set `set` are exactly `live`.
    fn same_live(&self, set: &[u32], live: &[u32]) -> bool {
        let mut l = live.iter();
        set.iter()
            .filter(|&&x| self.complete_field(x).is_none())
            .all(|x| l.next() == Some(x))
            && l.next().is_none()
    }

    pub fn stats(&self) -> Stats {
        fn cap<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        let selectors = cap(&self.selectors)
            + self
                .selectors
                .iter()
                .map(|s| {
                    s.source.capacity()
                        + cap(&s.steps)
                        + s.steps
                            .iter()
                            .map(|st| {
                                cap(&st.atoms)
                                    + st.atoms
                                        .iter()
                                        .map(|a| match a {
                                            Atom::Name(n) => n.capacity(),
                                            _ => 0,
                                        })
                                        .sum::<usize>()
                            })
                            .sum::<usize>()
                })
                .sum::<usize>();
        Stats {
            states: self.states.len(),
            tables: self.tables.len(),
            edges: self.names.len() + self.pos.len() + self.neg.len() + self.both.len(),
            overflow: self.overflow,
            work: self.work,
            heap_bytes: selectors
                + cap(&self.first)
                + cap(&self.field_of)
                + self.symbols.heap_bytes()
                + cap(&self.states)
                + cap(&self.tables)
                + cap(&self.complete)
                + cap(&self.live)
                + cap(&self.names)
                + cap(&self.pos)
                + cap(&self.neg)
                + cap(&self.both),
        }
    }
}

fn lookup(entries: &[(u64, u32)], key: u64) -> Option<u32> {
    entries
        .binary_search_by_key(&key, |&(k, _)| k)
        .ok()
        .map(|i| entries[i].1)
}

/// The subset construction, with its bounds.
struct Builder {
    m: Matcher,
    limits: Limits,
    /// States by the hash of their NFA set, and tables by the hash of their live
    /// states: the first of each hash, then a chain (`NONE` ends it). The sets
    /// themselves are not copied: a candidate is checked against the pools.
    state_heads: HashMap<u64, u32, BuildHasherDefault<SetHasher>>,
    state_next: Vec<u32>,
    table_heads: HashMap<u64, u32, BuildHasherDefault<SetHasher>>,
    table_next: Vec<u32>,
    edges: usize,
    work: usize,
}

/// The end of a hash chain.
const NONE: u32 = u32::MAX;

fn mix(h: u64, x: u32) -> u64 {
    (h.rotate_left(5) ^ u64::from(x)).wrapping_mul(0x517c_c1b7_2722_0a95)
}

impl Builder {
    /// The state of the NFA set `set` (sorted, no duplicates), added if it is new and
    /// within the bound (or `force`d); `OVERFLOW` if it is not.
    fn intern(&mut self, set: &[u32], force: bool) -> u32 {
        // One pass: the hash of the live states and of the complete fields.
        let (mut live_hash, mut done_hash) = (0u64, 1u64);
        for &x in set {
            match self.m.complete_field(x) {
                Some(f) => done_hash = mix(done_hash, f),
                None => live_hash = mix(live_hash, x),
            }
        }
        let key = mix(live_hash, done_hash as u32) ^ done_hash;
        let mut s = self.state_heads.get(&key).copied().unwrap_or(NONE);
        while s != NONE {
            let st = self.m.states[s as usize];
            let live = self.m.tables[st.table as usize].live.get(&self.m.live);
            if self.m.same(set, live, st.complete.get(&self.m.complete)) {
                return s;
            }
            s = self.state_next[s as usize];
        }
        if !force && self.m.states.len() >= self.limits.states {
            self.m.overflow += 1;
            return OVERFLOW;
        }
        let mut table = self.table_heads.get(&live_hash).copied().unwrap_or(NONE);
        while table != NONE {
            let live = self.m.tables[table as usize].live.get(&self.m.live);
            if self.m.same_live(set, live) {
                break;
            }
            table = self.table_next[table as usize];
        }
        let (live, complete) = self.m.split(set);
        let kept = self.m.live.len() + self.m.complete.len();
        let adds = complete.len() + if table == NONE { live.len() } else { 0 };
        if !force && kept + adds > self.limits.pool {
            self.m.overflow += 1;
            return OVERFLOW;
        }
        let table = match table {
            NONE => {
                let t = self.m.tables.len() as u32;
                let span = Span::of(&mut self.m.live, live);
                self.m.tables.push(Table {
                    live: span,
                    // Until the table is filled, and for good if it is past the bound.
                    other: OVERFLOW,
                    names: Span::default(),
                    pos: Span::default(),
                    neg: Span::default(),
                    both: Span::default(),
                });
                let next = self.table_heads.insert(live_hash, t).unwrap_or(NONE);
                self.table_next.push(next);
                t
            }
            t => t,
        };
        let s = self.m.states.len() as u32;
        let complete = Span::of(&mut self.m.complete, complete);
        self.m.states.push(State { table, complete });
        let next = self.state_heads.insert(key, s).unwrap_or(NONE);
        self.state_next.push(next);
        s
    }

    /// Builds the transitions of table `t`, or leaves them all to simulation when they
    /// are past the bound.
    fn fill(&mut self, t: usize) {
        let live = self.m.tables[t].live.get(&self.m.live).to_vec();
        // Reading the live states and sorting what they reach costs too: count it first.
        let atoms: usize = live
            .iter()
            .map(|&s| {
                let f = self.m.field_of[s as usize] as usize;
                let at = (s - self.m.first[f]) as usize;
                self.m.selectors[f]
                    .steps
                    .get(at)
                    .map_or(0, |st| st.atoms.len())
            })
            .sum();
        let prep = (live.len() + atoms).saturating_mul(usize::BITS as usize);
        if self.work.saturating_add(prep) > self.limits.work {
            self.m.overflow += 1;
            return;
        }
        self.work += prep;
        // What any edge reaches (descendant self-loops, wildcards), and what a name or
        // an index adds to that.
        let mut base = Vec::new();
        // Keys widened to u64 so that one `group` serves names and indexes.
        let mut names: Vec<(u64, u32)> = Vec::new();
        let mut pos: Vec<(u64, u32)> = Vec::new();
        let mut neg: Vec<(u64, u32)> = Vec::new();
        for &s in &live {
            let f = self.m.field_of[s as usize] as usize;
            let at = (s - self.m.first[f]) as usize;
            let Some(step) = self.m.selectors[f].steps.get(at) else {
                continue;
            };
            if step.descendant {
                base.push(s);
            }
            for atom in &step.atoms {
                match atom {
                    Atom::Wildcard => base.push(s + 1),
                    Atom::Name(n) => match self.m.symbols.get(n) {
                        Some(sym) => names.push((u64::from(sym), s + 1)),
                        // Every name is a symbol; should one not be, simulate.
                        None => {
                            self.m.overflow += 1;
                            return;
                        }
                    },
                    Atom::Index(i) if *i >= 0 => pos.push((i.unsigned_abs(), s + 1)),
                    Atom::Index(i) => neg.push((i.unsigned_abs(), s + 1)),
                }
            }
        }
        sort(&mut base);
        base.dedup();
        let names = group(names);
        let pos = group(pos);
        let neg = group(neg);
        // Saturating: a product must not wrap on a 32-bit target and pass the bound.
        let entries = (names.len() + pos.len() + neg.len())
            .saturating_add(pos.len().saturating_mul(neg.len()));
        let work = adds(&names)
            .saturating_add(entries.saturating_add(1).saturating_mul(base.len()))
            .saturating_add(adds(&pos).saturating_mul(1 + neg.len()))
            .saturating_add(adds(&neg).saturating_mul(1 + pos.len()));
        if self.edges.saturating_add(entries) > self.limits.edges
            || self.work.saturating_add(work) > self.limits.work
        {
            // `other` stays OVERFLOW and there are no entries: every edge simulates.
            self.m.overflow += 1;
            return;
        }
        self.edges += entries;
        self.work += work;
        let other = self.intern(&base, false);
        let target = |b: &mut Builder, adds: &[&[u32]]| {
            // `base` is sorted and an edge adds a few states: insert them in place.
            let mut set = base.clone();
            for &x in adds.iter().copied().flatten() {
                if let Err(at) = set.binary_search(&x) {
                    set.insert(at, x);
                }
            }
            b.intern(&set, false)
        };
        let name_entries: Vec<(u32, u32)> = names
            .iter()
            .map(|(sym, add)| (*sym as u32, target(self, &[add])))
            .filter(|&(_, to)| to != other)
            .collect();
        let pos_entries: Vec<(u64, u32)> = pos
            .iter()
            .map(|(i, add)| (*i, target(self, &[add])))
            .collect();
        let neg_entries: Vec<(u64, u32)> = neg
            .iter()
            .map(|(b, add)| (*b, target(self, &[add])))
            .collect();
        let mut both_entries = Vec::with_capacity(pos.len() * neg.len());
        for (i, pa) in &pos {
            for (b, na) in &neg {
                both_entries.push((*i, *b, target(self, &[pa, na])));
            }
        }
        let m = &mut self.m;
        let table = Table {
            live: m.tables[t].live,
            other,
            names: Span::of(&mut m.names, name_entries),
            pos: Span::of(&mut m.pos, pos_entries),
            neg: Span::of(&mut m.neg, neg_entries),
            both: Span::of(&mut m.both, both_entries),
        };
        m.tables[t] = table;
    }
}

/// How many NFA states the groups add.
fn adds<K>(groups: &[(K, Vec<u32>)]) -> usize {
    groups.iter().map(|(_, v)| v.len()).sum()
}

/// The construction's maps are keyed by hashes of NFA sets (see [`mix`]), which need
/// no second hashing by SipHash. The sets come from the policy, not from traffic, so
/// they need no protection from chosen collisions.
#[derive(Default)]
pub(crate) struct SetHasher(u64);

impl Hasher for SetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// Sorts (key, NFA state) pairs and groups the states by key.
fn group(mut pairs: Vec<(u64, u32)>) -> Vec<(u64, Vec<u32>)> {
    sort(&mut pairs);
    let mut out: Vec<(u64, Vec<u32>)> = Vec::new();
    for (k, s) in pairs {
        match out.last_mut() {
            Some((last, v)) if *last == k => {
                if v.last() != Some(&s) {
                    v.push(s);
                }
            }
            _ => out.push((k, vec![s])),
        }
    }
    out
}

/// The names of every selector, each a symbol, looked up ASCII-case-insensitively
/// without allocating: open addressing with linear probing, at most half full. The
/// table is fixed when the policy compiles, so however a message's keys hash, a lookup
/// costs at most the longest run of full slots, which only the policy's names decide.
struct NameTable {
    /// Symbol + 1 per slot; 0 is empty. The length is a power of two (or 0).
    slots: Vec<u32>,
    /// Lower-case, by symbol.
    names: Vec<Box<str>>,
}

impl NameTable {
    fn new<'a>(names: impl Iterator<Item = &'a str>) -> NameTable {
        let names: Vec<&str> = names.collect();
        let mut t = NameTable {
            slots: Vec::new(),
            names: Vec::new(),
        };
        if names.is_empty() {
            return t;
        }
        // Room for every name at most half full, duplicates included.
        t.slots = vec![0; (names.len() * 2).next_power_of_two()];
        let mask = t.slots.len() - 1;
        for n in names {
            if t.get(n).is_some() {
                continue;
            }
            let mut i = (hash_ci(n.as_bytes()) as usize) & mask;
            while t.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            t.slots[i] = t.names.len() as u32 + 1;
            t.names.push(n.to_ascii_lowercase().into_boxed_str());
        }
        t.names.shrink_to_fit();
        t
    }

    #[inline]
    fn get(&self, key: &str) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = (hash_ci(key.as_bytes()) as usize) & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            let sym = slot - 1;
            if self.names[sym as usize].eq_ignore_ascii_case(key) {
                return Some(sym);
            }
            i = (i + 1) & mask;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 4
            + self.names.capacity() * std::mem::size_of::<Box<str>>()
            + self.names.iter().map(|n| n.len()).sum::<usize>()
    }
}

/// Sorts in place (heapsort): small code, as the construction sorts only a few types
/// and the `.wasm` should not carry a general sort for each.
fn sort<T: Ord + Copy>(v: &mut [T]) {
    fn sift<T: Ord + Copy>(v: &mut [T], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && v[child] < v[child + 1] {
                child += 1;
            }
            if v[root] >= v[child] {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    }
    let n = v.len();
    for root in (0..n / 2).rev() {
        sift(v, root, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift(v, 0, end);
    }
}

/// FNV-1a of the ASCII-lower-cased bytes, folded so the low bits see the high ones.
#[inline]
fn hash_ci(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29) ^ (h >> 47)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::selector::Step;

    /// The walk before the automaton: the list of live (field, position) states, each
    /// advanced by its selector at every edge; the fields complete at a node are those
    /// of complete states, in list order, each once.
    #[derive(Clone)]
    struct Reference<'s> {
        selectors: &'s [Selector],
        states: Vec<(usize, usize)>,
    }

    impl Reference<'_> {
        fn step(&self, edge: Edge<'_>) -> Self {
            let mut next = Vec::new();
            for &(f, pos) in &self.states {
                self.selectors[f].advance(pos, edge, &mut |q| next.push((f, q)));
            }
            Reference {
                selectors: self.selectors,
                states: next,
            }
        }

        fn complete(&self) -> Vec<u32> {
            let mut out: Vec<u32> = Vec::new();
            for &(f, pos) in &self.states {
                if self.selectors[f].is_complete(pos) && !out.contains(&(f as u32)) {
                    out.push(f as u32);
                }
            }
            out
        }
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Names in several cases (ASCII folds, non-ASCII does not), and some no selector
    /// uses.
    const SEL_NAMES: &[&str] = &["a", "A", "b", "email", "EMail", "c", "déjà", "x y", ""];
    const DOC_NAMES: &[&str] = &[
        "a", "A", "b", "B", "email", "Email", "EMAIL", "c", "d", "déjà", "DÉJÀ", "dÉjà", "x y",
        "X Y", "", "zz",
    ];

    fn random_atom(r: &mut Rng) -> Atom {
        match r.below(10) {
            0..=4 => Atom::Name(r.pick(SEL_NAMES).to_string()),
            5..=7 => Atom::Index(*r.pick(&[0, 1, 2, -1, -2, -3, 1 << 40, -(1 << 40)])),
            _ => Atom::Wildcard,
        }
    }

    fn random_selector(r: &mut Rng) -> Selector {
        let steps = (0..1 + r.below(4))
            .map(|_| Step {
                descendant: r.below(4) == 0,
                atoms: (0..1 + usize::from(r.below(4) == 0) * (1 + r.below(2)))
                    .map(|_| random_atom(r))
                    .collect(),
            })
            .collect();
        Selector {
            source: String::new(),
            steps,
        }
    }

    enum Doc {
        Leaf,
        Object(Vec<(String, Doc)>),
        Array(Vec<Doc>),
    }

    fn random_doc(r: &mut Rng, depth: usize) -> Doc {
        if depth == 0 {
            return Doc::Leaf;
        }
        match r.below(5) {
            0 => Doc::Leaf,
            1 | 2 => Doc::Array((0..r.below(5)).map(|_| random_doc(r, depth - 1)).collect()),
            _ => {
                let mut keys: Vec<String> = Vec::new();
                for _ in 0..r.below(6) {
                    let k = r.pick(DOC_NAMES).to_string();
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                Doc::Object(
                    keys.into_iter()
                        .map(|k| (k, random_doc(r, depth - 1)))
                        .collect(),
                )
            }
        }
    }

    /// Walks every node of `doc` (dead subtrees too: `undeclared: strip` walks them) and
    /// checks the matcher against the reference at each; returns the nodes compared.
    fn compare(m: &Matcher, doc: &Doc, c: &Cursor, r: &Reference<'_>, path: &str) -> usize {
        assert_eq!(
            m.complete(c),
            &r.complete()[..],
            "complete fields at {path}"
        );
        assert_eq!(c.is_dead(), r.states.is_empty(), "dead at {path}");
        let mut n = 1;
        match doc {
            Doc::Leaf => {}
            Doc::Object(entries) => {
                for (k, child) in entries {
                    let e = Edge::Key(k);
                    n += compare(m, child, &m.step(c, e), &r.step(e), &format!("{path}.{k}"));
                }
            }
            Doc::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    let e = Edge::Index(i, items.len());
                    n += compare(m, child, &m.step(c, e), &r.step(e), &format!("{path}[{i}]"));
                }
            }
        }
        n
    }

    fn differential(seed: u64, limits: Limits) -> (usize, usize) {
        let mut r = Rng(seed);
        let mut nodes = 0;
        let mut overflow = 0;
        for _ in 0..150 {
            let selectors: Vec<Selector> = (0..1 + r.below(12))
                .map(|_| random_selector(&mut r))
                .collect();
            let m = Matcher::build(&selectors, limits);
            overflow += m.stats().overflow;
            let reference = Reference {
                selectors: &selectors,
                states: (0..selectors.len()).map(|f| (f, 0)).collect(),
            };
            for _ in 0..8 {
                let doc = random_doc(&mut r, 5);
                nodes += compare(&m, &doc, &m.start(), &reference, "$");
            }
        }
        (nodes, overflow)
    }

    #[test]
    fn the_automaton_agrees_with_the_selectors() {
        for seed in 1..=6u64 {
            let (nodes, _) =
                differential(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), Limits::DEFAULT);
            assert!(nodes > 1000, "too few nodes compared: {nodes}");
        }
    }

    #[test]
    fn past_the_bound_it_simulates_and_still_agrees() {
        let tiny = [
            Limits {
                states: 2,
                edges: 1 << 18,
                work: 1 << 23,
                pool: 1 << 19,
            },
            Limits {
                states: 5,
                edges: 1 << 18,
                work: 1 << 23,
                pool: 1 << 19,
            },
            Limits {
                states: 4096,
                edges: 3,
                work: 1 << 23,
                pool: 1 << 19,
            },
            Limits {
                states: 4096,
                edges: 1 << 18,
                work: 20,
                pool: 1 << 19,
            },
            Limits {
                states: 4096,
                edges: 1 << 18,
                work: 1 << 23,
                pool: 4,
            },
        ];
        for (i, limits) in tiny.into_iter().enumerate() {
            let (_, overflow) = differential(0x5eed + i as u64, limits);
            assert!(overflow > 0, "{limits:?} never reached its bound");
        }
    }

    fn sel(paths: &[&str]) -> Vec<Selector> {
        paths.iter().map(|p| Selector::parse(p).unwrap()).collect()
    }

    fn walk(m: &Matcher, edges: &[Edge<'_>]) -> Cursor {
        let mut c = m.start();
        for e in edges {
            c = m.step(&c, *e);
        }
        c
    }

    #[test]
    fn names_fold_ascii_case_only() {
        let s = sel(&["$.email", "$.EMAIL", "$['déjà']"]);
        let m = Matcher::new(&s);
        let c = walk(&m, &[Edge::Key("eMaIl")]);
        assert_eq!(m.complete(&c), &[0, 1]);
        assert!(matches!(c, Cursor::Dfa(_)));
        let c = walk(&m, &[Edge::Key("DÉJÀ")]);
        assert!(c.is_dead(), "non-ASCII letters do not fold");
        assert_eq!(m.complete(&walk(&m, &[Edge::Key("DéJà")])), &[2]);
        assert!(walk(&m, &[Edge::Key("other")]).is_dead());
    }

    #[test]
    fn positive_and_negative_indexes_at_once() {
        let s = sel(&["$[1]", "$[-2]", "$[*]", "$[0,-1]"]);
        let m = Matcher::new(&s);
        // len 3: [1] and [-2] are the same element.
        assert_eq!(m.complete(&walk(&m, &[Edge::Index(1, 3)])), &[0, 1, 2]);
        assert_eq!(m.complete(&walk(&m, &[Edge::Index(0, 3)])), &[2, 3]);
        assert_eq!(m.complete(&walk(&m, &[Edge::Index(2, 3)])), &[2, 3]);
        // len 1: [0] and [-1] are the same element; [-2] is out of range.
        assert_eq!(m.complete(&walk(&m, &[Edge::Index(0, 1)])), &[2, 3]);
        assert_eq!(m.complete(&walk(&m, &[Edge::Index(1, 2)])), &[0, 2, 3]);
    }

    #[test]
    fn descendant_blow_up_is_bounded() {
        // The classic exponential subset construction: `..a` then n wildcards.
        let paths: Vec<String> = (0..16)
            .map(|n| format!("$..a{}", "[*]".repeat(n)))
            .chain(["$..b.*.*.*.*.*.*.*.*.*.*.*".to_string()])
            .collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let s = sel(&paths);
        let m = Matcher::new(&s);
        let st = m.stats();
        println!("descendant blow-up: {st:?}");
        assert!(st.overflow > 0, "the bound was reached: {st:?}");
        assert!(st.states <= Limits::DEFAULT.states, "{st:?}");
        assert!(st.heap_bytes < 4 << 20, "{st:?}");
        let mut r = Rng(7);
        let reference = Reference {
            selectors: &s,
            states: (0..s.len()).map(|f| (f, 0)).collect(),
        };
        for _ in 0..50 {
            let doc = random_doc(&mut r, 6);
            compare(&m, &doc, &m.start(), &reference, "$");
        }
    }

    #[test]
    fn the_small_sort_sorts() {
        let mut r = Rng(99);
        for n in 0..40 {
            let mut v: Vec<(u64, u32)> = (0..n)
                .map(|_| (r.below(5) as u64, r.below(7) as u32))
                .collect();
            let mut want = v.clone();
            want.sort();
            sort(&mut v);
            assert_eq!(v, want);
        }
    }

    #[test]
    fn no_selectors_is_dead_at_once() {
        // As the empty list of NFA states was: `undeclared: strip` strips the record.
        let m = Matcher::new(&[]);
        assert!(m.start().is_dead());
        assert!(m.complete(&m.start()).is_empty());
        assert!(m.step(&m.start(), Edge::Key("a")).is_dead());
        assert!(m.step(&m.start(), Edge::Index(0, 1)).is_dead());
    }

    #[test]
    fn a_compiled_policy_stays_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Matcher>();
        check::<crate::engine::Policy>();
    }

    /// The example policy, and the benchmark's 500-selector policy (its generator is
    /// `generated_field` in `benches/engine.rs`). `--nocapture` prints the sizes.
    #[test]
    fn sizes_of_the_example_and_a_500_selector_policy() {
        use serde_json::{json, Value};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/acme-customers.json"
        );
        let base: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let env = |name: &str| match name {
            "CONSENTRY_HASH_KEY" | "CONSENTRY_SUBJECT_KEY" => {
                Some("test-key-0123456789abcdef".to_string())
            }
            _ => None,
        };
        let compile = |v: &Value| {
            crate::engine::Policy::compile(v.to_string().as_bytes(), &env)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let example = compile(&base);
        let mut large = base.clone();
        let fields = large["messages"][0]["fields"].as_array_mut().unwrap();
        for j in 0..500 - fields.len() {
            let path = match j % 10 {
                0..=4 => format!("$.f{j}"),
                5 => format!("$.prefs.f{j}"),
                6 => format!("$..f{j}"),
                7 => format!("$.orders[*].f{j}"),
                8 => format!("$['f{j}']"),
                _ => format!("$.*.f{j}"),
            };
            fields.push(json!({ "path": path, "category": "user.behavior.activity" }));
        }
        let large = compile(&large);
        for (name, p) in [("example", &example), ("p500", &large)] {
            for b in &p.bindings {
                let st = b.matcher.stats();
                println!(
                    "{name} binding `{}` ({} fields): {st:?}",
                    b.name,
                    b.fields.len()
                );
                assert_eq!(st.overflow, 0, "{name}: {st:?}");
                assert!(st.heap_bytes < 2 << 20, "{name}: {st:?}");
            }
        }
    }
}
