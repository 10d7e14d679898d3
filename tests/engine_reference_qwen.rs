//! Qwen2.5's forward (q/k/v biases, GQA, tied head) against Hugging Face transformers'
//! answers stored in tests/fixtures and our own plain-loop f64 forward. A binary of its
//! own, so the 2.5 GB f32 model is the only one in this process.

mod common;

use common::{checks, qwen};

#[test]
fn qwen2_matches_transformers() {
    checks::against_transformers(qwen(), "qwen2.5-0.5b.json");
}

#[test]
fn qwen2_matches_own_f64_reference() {
    checks::against_own_reference(qwen(), 64);
}
