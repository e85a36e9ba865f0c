//! JSON Schemas (draft 2020-12) of the five documents, generated from the
//! types, with the seed's `$id`s and titles. A test holds them to the
//! seed's own schema constants (`seed-schemas.json`, transcribed from its
//! `nativeProcessImageSchemas`): every constraint the seed states, ours
//! states too; ours say more (the seed leaves array items open).

use serde_json::Value;

use crate::docs::{Manifest, Mappings, Resources, Threads, Translation};

/// The seed's schema constants.
pub const SEED_SCHEMAS: &str = include_str!("seed-schemas.json");

const ID_BASE: &str = "https://machinen.dev/schemas/native-process-image/";

fn one<T: schemars::JsonSchema>(name: &str) -> Value {
    let mut s = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut s {
        o.insert(
            "$schema".into(),
            "https://json-schema.org/draft/2020-12/schema".into(),
        );
        o.insert("$id".into(), format!("{ID_BASE}{name}.schema.json").into());
    }
    s
}

/// The schemas by document (`manifest`, `mappings`, `threads`,
/// `resources`, `translation`).
pub fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("manifest", one::<Manifest>("manifest")),
        ("mappings", one::<Mappings>("mappings")),
        ("threads", one::<Threads>("threads")),
        ("resources", one::<Resources>("resources")),
        ("translation", one::<Translation>("translation")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `s`, with a `$ref` into the root's `$defs` followed.
    fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/$defs/");
                resolve(root, &root["$defs"][name])
            }
            None => s,
        }
    }

    fn types(v: &Value) -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => vec![],
        }
    }

    /// Every constraint of `seed` holds in `ours` (at `path`).
    fn holds(
        root: &Value,
        seed: &Value,
        ours: &Value,
        path: &str,
        required: bool,
        bad: &mut Vec<String>,
    ) {
        let ours = resolve(root, ours);
        let Some(seed) = seed.as_object() else { return };
        for (k, v) in seed {
            let mine = &ours[k.as_str()];
            match k.as_str() {
                "$schema"
                | "$id"
                | "title"
                | "const"
                | "additionalProperties"
                | "minimum"
                | "minLength"
                | "minItems" => {
                    if k == "additionalProperties" && v.is_object() {
                        holds(
                            root,
                            v,
                            mine,
                            &format!("{path}/additionalProperties"),
                            true,
                            bad,
                        );
                    } else if mine != v {
                        bad.push(format!("{path}: {k} is {mine} here, {v} in the seed"));
                    }
                }
                "enum" => {
                    let mut a: Vec<String> = types(mine);
                    let mut b: Vec<String> = types(v);
                    a.sort();
                    b.sort();
                    if a != b {
                        bad.push(format!("{path}: enum {a:?} here, {b:?} in the seed"));
                    }
                }
                "type" => {
                    let mut mine_t = types(mine);
                    // An optional field may also be null here (serde's
                    // Option); absent and null mean the same to a reader.
                    if !required {
                        mine_t.retain(|t| t != "null");
                    }
                    if mine_t != types(v) {
                        bad.push(format!("{path}: type {mine_t:?} here, {v} in the seed"));
                    }
                }
                "required" => {
                    let mut a = types(mine);
                    let mut b = types(v);
                    a.sort();
                    b.sort();
                    if a != b {
                        bad.push(format!("{path}: required {a:?} here, {b:?} in the seed"));
                    }
                }
                "properties" => {
                    let req = types(&seed["required"]);
                    for (name, sub) in v.as_object().into_iter().flatten() {
                        let p = format!("{path}/{name}");
                        match ours["properties"].get(name) {
                            Some(m) => holds(root, sub, m, &p, req.contains(name), bad),
                            None => bad.push(format!("{p}: missing here")),
                        }
                    }
                }
                "items" => holds(root, v, &ours["items"], &format!("{path}[]"), true, bad),
                other => bad.push(format!("{path}: the seed's {other} is not checked here")),
            }
        }
    }

    #[test]
    fn generated_schemas_hold_every_constraint_of_the_seeds() {
        let seed: Value = serde_json::from_str(SEED_SCHEMAS).expect("seed schemas");
        let mut bad = Vec::new();
        for (name, ours) in schemas() {
            holds(&ours, &seed[name], &ours, name, true, &mut bad);
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn the_checker_notices_a_difference() {
        let seed: Value = serde_json::from_str(SEED_SCHEMAS).expect("seed schemas");
        let mut ours = schemas()[0].1.clone();
        ours["required"] = serde_json::json!(["formatVersion"]);
        let mut bad = Vec::new();
        holds(&ours, &seed["manifest"], &ours, "manifest", true, &mut bad);
        assert!(bad.iter().any(|b| b.contains("required")), "{bad:?}");
    }
}
