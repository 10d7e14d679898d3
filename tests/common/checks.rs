//! Checks of a loaded model against the transformers fixtures and the f64 reference.

use super::{fixture, read, rel};
use broca::eval::perplexity;
use broca::model::Model;
use serde_json::Value;

/// The five UDHR texts of tests/fixtures.
pub const TEXTS: [&str; 5] = [
    "udhr-en.txt",
    "udhr-zh.txt",
    "udhr-ar.txt",
    "udhr-ru.txt",
    "udhr-de.txt",
];

/// For every fixture text: the first ids and the total length equal transformers', and the
/// PPL of the first 128 / 256 tokens (one window each) is within 0.5% of it. Collects every
/// mismatch before failing.
pub fn against_transformers(model: &Model, json: &str) {
    let refs: Value = serde_json::from_str(&read(&fixture(json))).expect("fixture JSON");
    let tok = model.tokenizer().expect("tokenizer");
    let mut errors = Vec::new();
    for name in TEXTS {
        let r = &refs["results"][name];
        let ids = tok.encode(&read(&fixture(name))).expect("encode");
        let first: Vec<u32> = r["first_ids"]
            .as_array()
            .expect("first_ids")
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        if ids[..first.len()] != first[..] {
            errors.push(format!(
                "{name}: first ids {:?}, expected {first:?}",
                &ids[..first.len()]
            ));
        }
        let total = r["total_tokens"].as_u64().unwrap() as usize;
        if ids.len() != total {
            errors.push(format!("{name}: {} tokens, expected {total}", ids.len()));
        }
        for n in [128, 256] {
            let want = r[format!("ppl_first_{n}")].as_f64().unwrap();
            let got = perplexity(model, name, &ids[..n], n, n, |_| {})
                .expect("perplexity")
                .ppl;
            if rel(got, want) > 0.005 {
                errors.push(format!(
                    "{name}: PPL of first {n} tokens {got:.4}, transformers {want:.4}"
                ));
            }
        }
    }
    assert!(errors.is_empty(), "{json}:\n{}", errors.join("\n"));
}

/// The mean NLL of the first `n` tokens of English UDHR from the candle forward equals the
/// f64 plain-loop reference's within 1e-3 relative.
pub fn against_own_reference(model: &Model, n: usize) {
    let ids = model
        .tokenizer()
        .unwrap()
        .encode(&read(&fixture("udhr-en.txt")))
        .unwrap();
    let ids = &ids[..n];
    let main: f64 = model
        .token_nll(&Model::ids_tensor(ids).unwrap(), false)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap();
    let t = std::time::Instant::now();
    let reference = super::reference::mean_nll(model, ids);
    eprintln!(
        "f64 reference forward of {n} tokens: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        rel(main, reference) < 1e-3,
        "mean NLL over {n} tokens: candle {main:.6}, f64 reference {reference:.6}"
    );
}
