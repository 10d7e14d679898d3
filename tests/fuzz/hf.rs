//! Seeded mutations of the files of a Hugging Face checkpoint directory: the safetensors
//! header (its length prefix, bytes of its JSON, its offsets, shapes and dtypes), config.json,
//! the shard index and tokenizer.json; and truncation of any of them.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

/// JSON values that lie: zero, negative, beyond u64, fractional, of another type.
fn lie(rng: &mut StdRng, orig: &Value) -> Value {
    let o = orig.as_u64().unwrap_or(1);
    match rng.gen_range(0..16) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(1u64 << 53),
        4 => json!(u64::MAX),
        5 => serde_json::from_str("18446744073709551616").unwrap(),
        6 => json!(1e300),
        7 => json!(3.5),
        8 => json!("7"),
        9 => Value::Null,
        10 => json!([]),
        11 => json!({}),
        12 => json!(o + rng.gen_range(1..=8)),
        13 => json!(o.saturating_sub(rng.gen_range(1..=8))),
        14 => json!(o.saturating_mul(2)),
        _ => json!(1u64 << 32),
    }
}

/// Flips 1–4 bytes of `b[lo..hi]`, half the time to a character that matters to JSON.
fn flip(rng: &mut StdRng, b: &mut [u8], lo: usize, hi: usize) -> String {
    let mut at = Vec::new();
    for _ in 0..rng.gen_range(1..=4) {
        let i = rng.gen_range(lo..hi);
        b[i] = if rng.gen_bool(0.5) {
            *b"{}[]\":,-0123456789eE. \\".choose(rng).unwrap()
        } else {
            b[i] ^ rng.gen_range(1..=255u8)
        };
        at.push(i);
    }
    format!("byte flips at {at:?}")
}

fn truncate(rng: &mut StdRng, b: &[u8]) -> (Vec<u8>, String) {
    let cut = rng.gen_range(0..b.len());
    (b[..cut].to_vec(), format!("truncated at byte {cut}"))
}

/// A mutated safetensors file.
pub fn safetensors(rng: &mut StdRng, b: &[u8]) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let (head, data) = (&b[8..8 + n], &b[8 + n..]);
    let with = |prefix: u64, head: &[u8]| {
        let mut out = prefix.to_le_bytes().to_vec();
        out.extend_from_slice(head);
        out.extend_from_slice(data);
        out
    };
    match rng.gen_range(0..10) {
        0 | 1 => {
            let len = b.len() as u64;
            let p = match rng.gen_range(0..9) {
                0 => 0,
                1 => rng.gen_range(1..16),
                2 => n as u64 + rng.gen_range(1..=8),
                3 => (n as u64).saturating_sub(rng.gen_range(1..=8)),
                4 => len,
                5 => u64::MAX,
                6 => 1 << 63,
                7 => rng.gen_range(0..len),
                _ => 100 << 20,
            };
            (with(p, head), format!("header length {n} -> {p}"))
        }
        2 | 3 => {
            let mut out = b.to_vec();
            let d = flip(rng, &mut out, 8, 8 + n);
            (out, d)
        }
        4 => truncate(rng, b),
        _ => {
            let mut h: serde_json::Map<String, Value> = serde_json::from_slice(head).unwrap();
            let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
            let name = names.choose(rng).unwrap().clone();
            let other = names.choose(rng).unwrap().clone();
            let d = match rng.gen_range(0..8) {
                0 => {
                    let i = rng.gen_range(0..2);
                    let v = lie(rng, &h[&name]["data_offsets"][i]);
                    h.get_mut(&name).unwrap()["data_offsets"][i] = v.clone();
                    format!("{name} data_offsets[{i}] = {v}")
                }
                1 => {
                    let shape = h[&name]["shape"].as_array().unwrap().clone();
                    let mut s = shape.clone();
                    let d = match rng.gen_range(0..4) {
                        0 if !s.is_empty() => {
                            let i = rng.gen_range(0..s.len());
                            s[i] = lie(rng, &s[i]);
                            "a dimension lies"
                        }
                        1 => {
                            s.push(json!(rng.gen_range(0..3)));
                            "an extra dimension"
                        }
                        2 => {
                            s.pop();
                            "a dimension less"
                        }
                        _ => {
                            s.reverse();
                            "dimensions reversed"
                        }
                    };
                    h.get_mut(&name).unwrap()["shape"] = Value::Array(s.clone());
                    format!("{name} shape {shape:?} -> {s:?} ({d})")
                }
                2 => {
                    let t = [
                        "F64", "F16", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "X", "",
                    ];
                    let t = *t.choose(rng).unwrap();
                    h.get_mut(&name).unwrap()["dtype"] = json!(t);
                    format!("{name} dtype {t}")
                }
                3 => {
                    h.remove(&name);
                    format!("{name} removed")
                }
                4 => {
                    let v = h.remove(&name).unwrap();
                    h.insert(other.clone(), v);
                    format!("{name} renamed to {other}")
                }
                5 => {
                    let v = h.remove(&name).unwrap();
                    h.insert("model.layers.99.mlp.up_proj.weight".into(), v);
                    format!("{name} renamed to a layer the config lacks")
                }
                6 => {
                    let (a, c) = (
                        h[&name]["data_offsets"].clone(),
                        h[&other]["data_offsets"].clone(),
                    );
                    h.get_mut(&name).unwrap()["data_offsets"] = c;
                    h.get_mut(&other).unwrap()["data_offsets"] = a;
                    format!("data_offsets of {name} and {other} swapped")
                }
                _ => {
                    let v = [
                        json!({"a": 1}),
                        json!([]),
                        json!(null),
                        json!({"lang": [1]}),
                    ];
                    let v = v.choose(rng).unwrap().clone();
                    h.insert("__metadata__".into(), v.clone());
                    format!("__metadata__ = {v}")
                }
            };
            let head = serde_json::to_vec(&h).unwrap();
            (with(head.len() as u64, &head), d)
        }
    }
}

/// A mutated config.json.
pub fn config(rng: &mut StdRng, b: &[u8]) -> (Vec<u8>, String) {
    if rng.gen_bool(0.15) {
        return truncate(rng, b);
    }
    let mut v: Value = serde_json::from_slice(b).unwrap();
    let keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
        "model_type",
        "architectures",
        "bos_token_id",
        "eos_token_id",
    ];
    let k = *keys.choose(rng).unwrap();
    let d = if rng.gen_bool(0.15) {
        v.as_object_mut().unwrap().remove(k);
        format!("{k} removed")
    } else {
        let x = lie(rng, &v[k]);
        v[k] = x.clone();
        format!("{k} = {x}")
    };
    (serde_json::to_vec_pretty(&v).unwrap(), d)
}

/// A mutated model.safetensors.index.json.
pub fn index(rng: &mut StdRng, b: &[u8]) -> (Vec<u8>, String) {
    if rng.gen_bool(0.2) {
        return truncate(rng, b);
    }
    let mut v: Value = serde_json::from_slice(b).unwrap();
    let map = v["weight_map"].as_object_mut().unwrap();
    let names: Vec<String> = map.keys().cloned().collect();
    let name = names.choose(rng).unwrap().clone();
    let shards: Vec<Value> = map.values().cloned().collect();
    let d = match rng.gen_range(0..4) {
        0 => {
            map.remove(&name);
            format!("{name} removed from the index")
        }
        1 => {
            let s = shards.choose(rng).unwrap().clone();
            map.insert(name.clone(), s.clone());
            format!("{name} -> {s}")
        }
        2 => {
            let s = [
                json!("missing.safetensors"),
                json!("../model.safetensors"),
                json!(""),
                json!(".hidden"),
                json!(5),
                json!(null),
            ];
            let s = s.choose(rng).unwrap().clone();
            map.insert(name.clone(), s.clone());
            format!("{name} -> {s}")
        }
        _ => {
            v["weight_map"] = json!([]);
            "weight_map = []".to_string()
        }
    };
    (serde_json::to_vec(&v).unwrap(), d)
}

/// A mutated tokenizer.json.
pub fn tokenizer(rng: &mut StdRng, b: &[u8]) -> (Vec<u8>, String) {
    if rng.gen_bool(0.2) {
        return truncate(rng, b);
    }
    let mut v: Value = serde_json::from_slice(b).unwrap();
    let d = match rng.gen_range(0..6) {
        0 => {
            let vocab = v["model"]["vocab"].as_object_mut().unwrap();
            let keys: Vec<String> = vocab.keys().take(2000).cloned().collect();
            let k = keys.choose(rng).unwrap().clone();
            let x = lie(rng, &vocab[&k]);
            vocab.insert(k.clone(), x.clone());
            format!("vocab[{k:?}] = {x}")
        }
        1 => {
            let added = v["added_tokens"].as_array_mut().unwrap();
            let i = rng.gen_range(0..added.len());
            let x = lie(rng, &added[i]["id"]);
            added[i]["id"] = x.clone();
            format!("added_tokens[{i}].id = {x}")
        }
        2 => {
            let merges = v["model"]["merges"].as_array_mut().unwrap();
            let i = rng.gen_range(0..merges.len());
            let m = [json!("zzzq qqqz"), json!(["a"]), json!(7), json!("")];
            merges[i] = m.choose(rng).unwrap().clone();
            format!("merges[{i}] = {}", merges[i])
        }
        3 => {
            let t = ["WordPiece", "Unigram", "WordLevel", "X", ""];
            let t = *t.choose(rng).unwrap();
            v["model"]["type"] = json!(t);
            format!("model.type = {t}")
        }
        4 => {
            v["pre_tokenizer"] = json!({"type": "Nope"});
            "pre_tokenizer.type = Nope".to_string()
        }
        _ => {
            v["model"]["vocab"] = json!({});
            "empty vocab".to_string()
        }
    };
    (serde_json::to_vec(&v).unwrap(), d)
}
