//! Generators and mutators shared by the property tests of the parsers that
//! read untrusted input (bundles, image configs, tarball headers).
//!
//! The tests run briefly in every `cargo test`; `PROPTEST_CASES=N` sets
//! the case count of every one of them for a longer run.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;

/// `cases` unless `PROPTEST_CASES` asks for another count.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        // Shapes the validators look at: names, paths, hex digests.
        "[A-Za-z_][A-Za-z0-9_]{0,8}",
        "/[a-z/.]{0,12}",
        "[0-9a-f]{64}",
    ]
}

pub(crate) fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// An arbitrary JSON value, to splice into documents. `words` are strings
/// the parser under test gives a meaning to (field names, tag values).
pub(crate) fn json_value(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(3),
            Just(4),
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1)
        ]
        .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
        prop::sample::select(words).prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![text(), prop::sample::select(words).prop_map(String::from)],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One change to a JSON document.
#[derive(Debug, Clone)]
pub(crate) enum JsonEdit {
    /// Replace the node picked by the index (over all nodes, in order).
    Replace(usize, Value),
    /// Remove the object key or array item picked by the index.
    Remove(usize),
    /// Add a key to the object picked by the index (or an item to an array).
    Insert(usize, String, Value),
    /// Duplicate the array item picked by the index.
    Duplicate(usize),
}

pub(crate) fn json_edit(words: &'static [&'static str]) -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        (any::<usize>(), json_value(words)).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        any::<usize>().prop_map(JsonEdit::Remove),
        (
            any::<usize>(),
            prop_oneof![text(), prop::sample::select(words).prop_map(String::from)],
            json_value(words)
        )
            .prop_map(|(i, k, v)| JsonEdit::Insert(i, k, v)),
        any::<usize>().prop_map(JsonEdit::Duplicate),
    ]
}

/// JSON pointers of every node of `v` (the root first).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            pointers(
                x,
                format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                out,
            )
        }),
        _ => {}
    }
}

pub(crate) fn apply(doc: &mut Value, edit: &JsonEdit) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    // (parent pointer, key or index) of every child.
    let children: Vec<(String, String)> = all
        .iter()
        .flat_map(|p| match doc.pointer(p) {
            Some(Value::Object(o)) => o.keys().map(|k| (p.clone(), k.clone())).collect(),
            Some(Value::Array(a)) => (0..a.len()).map(|i| (p.clone(), i.to_string())).collect(),
            _ => Vec::new(),
        })
        .collect();
    let containers: Vec<&String> = all
        .iter()
        .filter(|p| {
            doc.pointer(p)
                .is_some_and(|v| v.is_object() || v.is_array())
        })
        .collect();
    match edit {
        JsonEdit::Replace(i, v) => {
            if let Some(node) = doc.pointer_mut(&all[i % all.len()]) {
                *node = v.clone();
            }
        }
        JsonEdit::Remove(i) if !children.is_empty() => {
            let (p, k) = &children[i % children.len()];
            match doc.pointer_mut(p) {
                Some(Value::Object(o)) => {
                    o.remove(k);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = k.parse::<usize>() {
                        a.remove(i);
                    }
                }
                _ => {}
            }
        }
        JsonEdit::Insert(i, k, v) if !containers.is_empty() => {
            let p = containers[i % containers.len()].clone();
            match doc.pointer_mut(&p) {
                Some(Value::Object(o)) => {
                    o.insert(k.clone(), v.clone());
                }
                Some(Value::Array(a)) => a.push(v.clone()),
                _ => {}
            }
        }
        JsonEdit::Duplicate(i) => {
            let items: Vec<&(String, String)> = children
                .iter()
                .filter(|(p, _)| doc.pointer(p).is_some_and(Value::is_array))
                .collect();
            if !items.is_empty() {
                let (p, k) = items[i % items.len()].clone();
                if let Some(Value::Array(a)) = doc.pointer_mut(&p) {
                    if let Some(x) = k.parse::<usize>().ok().and_then(|i| a.get(i).cloned()) {
                        a.push(x);
                    }
                }
            }
        }
        _ => {}
    }
}

/// One change to a byte string.
#[derive(Debug, Clone)]
pub(crate) enum ByteEdit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

pub(crate) fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        any::<usize>().prop_map(ByteEdit::Remove),
        any::<usize>().prop_map(ByteEdit::Truncate),
    ]
}

pub(crate) fn mutate(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let n = bytes.len();
    match *edit {
        ByteEdit::Flip(i, b) if n > 0 => bytes[i % n] ^= 1 << b,
        ByteEdit::Set(i, b) if n > 0 => bytes[i % n] = b,
        ByteEdit::Insert(i, b) => bytes.insert(i % (n + 1), b),
        ByteEdit::Remove(i) if n > 0 => {
            bytes.remove(i % n);
        }
        ByteEdit::Truncate(i) => bytes.truncate(i % (n + 1)),
        _ => {}
    }
}

/// A document derived from `valid`: arbitrary bytes, or `valid` with JSON
/// edits, or with byte edits.
pub(crate) fn derived_document(
    valid: Vec<u8>,
    words: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    let doc: Value = serde_json::from_slice(&valid).unwrap_or(Value::Null);
    let by_json = prop::collection::vec(json_edit(words), 1..4).prop_map(move |edits| {
        let mut d = doc.clone();
        for e in &edits {
            apply(&mut d, e);
        }
        serde_json::to_vec_pretty(&d).unwrap_or_default()
    });
    let by_bytes = prop::collection::vec(byte_edit(), 1..4).prop_map(move |edits| {
        let mut b = valid.clone();
        for e in &edits {
            mutate(&mut b, e);
        }
        b
    });
    prop_oneof![1 => bytes(300), 4 => by_json, 3 => by_bytes]
}
