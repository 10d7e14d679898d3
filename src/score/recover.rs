//! What a rerun does with a corrupt earlier result under `score --out DIR` (issue 14, class
//! 11): an unreadable result, unit result or resume state is reported on stderr (one line)
//! and computed again; what cannot be recomputed here (a shard's result at `score merge`)
//! is an error naming the command that recomputes it.

use super::files::Mapped;
use super::windows::Shard;
use anyhow::Result;
use std::path::Path;

/// Opens `path` as a score file; `None` (after one line on stderr saying it will be
/// `redone`) when it is unreadable (truncated, garbage).
pub fn open_or_redo(path: &Path, redone: &str) -> Option<Mapped> {
    match Mapped::open(path) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("score: {e:#}; {redone}");
            None
        }
    }
}

/// Opens a unit result for `score merge`; unreadable, an error naming the job that
/// recomputes it.
pub fn open_partial(
    path: &Path,
    out: &Path,
    lang: &str,
    shard: Option<Shard>,
    tag: &str,
) -> Result<Mapped> {
    Mapped::open(path).map_err(|e| {
        let mut job = format!("broca score --lang {lang}=TEXT");
        if let Some(s) = shard {
            job.push_str(&format!(" --shard {s}"));
        }
        if let Some(l) = tag.strip_prefix("layers-") {
            job.push_str(&format!(" --layers {l}"));
        }
        anyhow::anyhow!(
            "{e:#}; recompute it with `{job} --out {}` (the job's other arguments as before), then rerun `broca score merge --out {}`",
            out.display(),
            out.display()
        )
    })
}
