//! Stage bookkeeping for resumable studies: a stage is done when `DIR/stages/<name>.json`
//! holds the hash of its inputs (config section + upstream hashes). The marker is written
//! last and atomically, so a stage killed midway simply runs again.

use crate::io::write_json;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What a finished stage leaves behind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub hash: String,
    pub outputs: Vec<String>,
    pub seconds: f64,
    /// Unix time (seconds) the stage finished.
    #[serde(default)]
    pub finished_at: u64,
}

/// Hash of a stage's inputs: any serialisable values, in order.
pub fn input_hash(parts: &[serde_json::Value]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.to_string().as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())[..16].to_string()
}

fn marker(dir: &Path, stage: &str) -> PathBuf {
    dir.join("stages").join(format!("{stage}.json"))
}

/// The record of a finished stage whose hash equals `hash` and whose outputs all exist.
pub fn finished(dir: &Path, stage: &str, hash: &str) -> Option<StageRecord> {
    let text = std::fs::read_to_string(marker(dir, stage)).ok()?;
    let rec: StageRecord = serde_json::from_str(&text).ok()?;
    (rec.hash == hash && rec.outputs.iter().all(|o| dir.join(o).exists())).then_some(rec)
}

/// The record of a stage whatever its hash (for the report).
pub fn record(dir: &Path, stage: &str) -> Option<StageRecord> {
    serde_json::from_str(&std::fs::read_to_string(marker(dir, stage)).ok()?).ok()
}

/// Marks a stage finished.
pub fn mark(dir: &Path, rec: &StageRecord) -> Result<()> {
    write_json(&marker(dir, &rec.stage), rec)
}
