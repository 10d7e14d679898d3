//! SmolLM2's forward against two references: Hugging Face transformers' answers stored in
//! tests/fixtures, and our own plain-loop f64 forward (tests/common/reference.rs).

mod common;

use common::{checks, smollm};

#[test]
fn smollm2_matches_transformers() {
    checks::against_transformers(smollm(), "smollm2.json");
}

#[test]
fn smollm2_matches_own_f64_reference() {
    checks::against_own_reference(smollm(), 128);
}
