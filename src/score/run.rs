//! One language's importance run on disk: resumable, shardable, and the merge of shards.
//!
//! Layout under `--out DIR`: the result `DIR/<lang>.safetensors`; under `DIR/.partial/` the
//! resume state `<lang>[.shard-i-of-n].state.safetensors` (the f64 running sum Σg and the
//! number of windows it holds, rewritten atomically at each checkpoint and removed when the
//! language is done) and, for `--shard i/n`, the shard's result
//! `<lang>.shard-i-of-n.safetensors` (θ ⊙ Σg over its windows, f64, plus its window count).
//!
//! Bit-identical resume: checkpoints fall only on batch boundaries, batches are always cut
//! from the start of the slice, and the running sum is stored exactly (f64), so a resumed run
//! adds the same batch gradients in the same order as an uninterrupted one. Every state and
//! result carries a hash of (model sha256, language, token ids, seq-len, batch); a mismatch is
//! refused rather than mixed.

use super::accumulate::{score_from_product, times_param, GradSum};
use super::files::{self, Mapped, Store};
use super::windows::{windows, Shard};
use super::METHOD_IMPORTANCE;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a language is scored.
#[derive(Clone, Debug)]
pub struct Options {
    pub seq_len: usize,
    pub batch: usize,
    pub shard: Option<Shard>,
    /// Checkpoint when this many seconds passed since the last one.
    pub checkpoint_secs: f64,
    /// Also checkpoint every this many windows.
    pub checkpoint_windows: Option<usize>,
    /// Tests: fail (without saving) once this many windows were processed in this call,
    /// as a kill would.
    pub stop_after_windows: Option<usize>,
}

/// The model being scored, and where results go.
pub struct Job<'a> {
    pub model: &'a Model,
    pub model_sha256: &'a str,
    pub out: &'a Path,
}

/// What happened to one language.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub lang: String,
    /// `scored`, `resumed`, `skipped` (already done), `shard` (partial written) or `merged`.
    pub status: String,
    pub windows: usize,
    pub tokens: usize,
    /// Windows taken over from a checkpoint.
    pub resumed_windows: usize,
    /// Tokens run through forward/backward by this call.
    pub computed_tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub file: PathBuf,
}

/// `DIR/<lang>.safetensors`.
pub fn final_path(out: &Path, lang: &str) -> PathBuf {
    out.join(format!("{lang}.safetensors"))
}

/// `DIR/.partial`.
pub fn partial_dir(out: &Path) -> PathBuf {
    out.join(".partial")
}

fn stem(lang: &str, shard: Option<Shard>) -> String {
    match shard {
        Some(s) => format!("{lang}.{}", s.tag()),
        None => lang.to_string(),
    }
}

/// Resume state of a language (or of one shard of it).
pub fn state_path(out: &Path, lang: &str, shard: Option<Shard>) -> PathBuf {
    partial_dir(out).join(format!("{}.state.safetensors", stem(lang, shard)))
}

/// A shard's result.
pub fn shard_path(out: &Path, lang: &str, shard: Shard) -> PathBuf {
    partial_dir(out).join(format!("{}.safetensors", stem(lang, Some(shard))))
}

/// Hash of everything that decides the bits of a result.
pub fn args_hash(
    model_sha256: &str,
    lang: &str,
    ids: &[u32],
    seq_len: usize,
    batch: usize,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "broca-score-v1|{model_sha256}|{lang}|{seq_len}|{batch}|{}|",
        ids.len()
    ));
    for id in ids {
        h.update(id.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Rejects language names that cannot be file names.
pub fn check_lang(lang: &str) -> Result<()> {
    if lang.is_empty()
        || lang.starts_with('.')
        || lang.contains(['/', '\\'])
        || lang.contains(".shard-")
    {
        bail!("'{lang}': not usable as a language name (it names the output file)");
    }
    Ok(())
}

/// Whether `path` exists and was made with `hash`; an error when it exists with another.
fn done_with(path: &Path, hash: &str) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let m = Mapped::open(path)?;
    if m.meta.get("args_hash").map(String::as_str) != Some(hash) {
        bail!(
            "{}: exists but was made with a different model, text, --tokens, --seq-len or --batch; remove it or use another --out",
            path.display()
        );
    }
    Ok(true)
}

fn base_meta(
    lang: &str,
    model_sha256: &str,
    seq_len: usize,
    batch: usize,
    hash: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("lang".into(), lang.to_string());
    m.insert("seq_len".into(), seq_len.to_string());
    m.insert("batch".into(), batch.to_string());
    m.insert("model_sha256".into(), model_sha256.to_string());
    m.insert("args_hash".into(), hash.to_string());
    m.insert("version".into(), env!("CARGO_PKG_VERSION").to_string());
    m
}

fn entries(model: &Model) -> Vec<(String, Vec<usize>)> {
    model
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.dims().to_vec()))
        .collect()
}

/// Scores one language (or one shard of it), resuming from `DIR/.partial/` when a state is
/// there and skipping when the result already exists. `progress(tokens)` is called per batch
/// (and once with the tokens taken over from a checkpoint or a finished result).
pub fn score_language(
    job: &Job,
    lang: &str,
    ids: &[u32],
    opts: &Options,
    progress: &mut dyn FnMut(usize),
) -> Result<Outcome> {
    check_lang(lang)?;
    if opts.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let start = Instant::now();
    let wins = windows(ids.len(), opts.seq_len).with_context(|| format!("language {lang}"))?;
    let hash = args_hash(job.model_sha256, lang, ids, opts.seq_len, opts.batch);
    let slice = &wins[opts
        .shard
        .map(|s| s.range(wins.len()))
        .unwrap_or(0..wins.len())];
    let slice_tokens: usize = slice.iter().map(|w| w.len()).sum();
    let target = match opts.shard {
        Some(s) => shard_path(job.out, lang, s),
        None => final_path(job.out, lang),
    };
    let outcome = |status: &str, resumed: usize, secs: f64, done_tokens: usize| Outcome {
        lang: lang.to_string(),
        status: status.to_string(),
        windows: slice.len(),
        tokens: slice_tokens,
        resumed_windows: resumed,
        computed_tokens: done_tokens,
        seconds: secs,
        tokens_per_second: if secs > 0.0 {
            done_tokens as f64 / secs
        } else {
            0.0
        },
        file: target.clone(),
    };
    if done_with(&target, &hash)? {
        progress(slice_tokens);
        return Ok(outcome("skipped", 0, 0.0, 0));
    }

    let state = state_path(job.out, lang, opts.shard);
    let mut acc = GradSum::zeros(job.model);
    if state.exists() {
        load_state(&state, &hash, job.model, slice.len(), opts.batch, &mut acc)?;
        acc.tokens = slice[..acc.windows].iter().map(|w| w.len()).sum();
        progress(acc.tokens);
    }
    let resumed = acc.windows;
    let mut meta = base_meta(lang, job.model_sha256, opts.seq_len, opts.batch, &hash);
    let mut last_ckpt = (Instant::now(), acc.windows);
    let mut processed = 0;
    for chunk in slice[acc.windows..].chunks(opts.batch) {
        acc.add_batch(job.model, ids, chunk)?;
        progress(chunk.iter().map(|w| w.len()).sum());
        processed += chunk.len();
        let by_time = last_ckpt.0.elapsed().as_secs_f64() >= opts.checkpoint_secs;
        let by_count = opts
            .checkpoint_windows
            .is_some_and(|k| acc.windows - last_ckpt.1 >= k);
        if acc.windows < slice.len() && (by_time || by_count) {
            save_state(&state, job.model, &acc, slice.len(), &meta)?;
            last_ckpt = (Instant::now(), acc.windows);
        }
        if opts.stop_after_windows.is_some_and(|k| processed >= k) && acc.windows < slice.len() {
            bail!("{lang}: stopped after {processed} windows (--stop-after-windows)");
        }
    }

    meta.insert("tokens".into(), slice_tokens.to_string());
    meta.insert("windows".into(), slice.len().to_string());
    let names = entries(job.model);
    match opts.shard {
        Some(s) => {
            meta.insert("method".into(), format!("{METHOD_IMPORTANCE}-partial"));
            meta.insert("shard".into(), s.to_string());
            meta.insert("total_windows".into(), wins.len().to_string());
            files::write(&target, &names, Store::F64, &meta, |i| {
                times_param(job.model, i, &acc.sums[i])
            })?;
        }
        None => {
            meta.insert("method".into(), METHOD_IMPORTANCE.into());
            files::write(&target, &names, Store::F32, &meta, |i| {
                Ok(score_from_product(
                    times_param(job.model, i, &acc.sums[i])?,
                    acc.windows,
                ))
            })?;
        }
    }
    if state.exists() {
        std::fs::remove_file(&state)
            .with_context(|| format!("{}: cannot remove", state.display()))?;
    }
    // leaves nothing beside the results once no state or shard result is left
    let _ = std::fs::remove_dir(partial_dir(job.out));
    let secs = start.elapsed().as_secs_f64();
    let status = match (opts.shard, resumed) {
        (Some(_), _) => "shard",
        (None, 0) => "scored",
        _ => "resumed",
    };
    Ok(outcome(
        status,
        resumed,
        secs,
        slice_tokens - slice[..resumed].iter().map(|w| w.len()).sum::<usize>(),
    ))
}

fn save_state(
    path: &Path,
    model: &Model,
    acc: &GradSum,
    slice_windows: usize,
    meta: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = meta.clone();
    meta.insert("kind".into(), "broca-score-state".into());
    meta.insert("next_window".into(), acc.windows.to_string());
    meta.insert("slice_windows".into(), slice_windows.to_string());
    files::write(path, &entries(model), Store::F64, &meta, |i| {
        Ok(acc.sums[i].clone())
    })
}

fn load_state(
    path: &Path,
    hash: &str,
    model: &Model,
    slice_windows: usize,
    batch: usize,
    acc: &mut GradSum,
) -> Result<()> {
    let m = Mapped::open(path)?;
    if m.meta("args_hash")? != hash {
        bail!(
            "{}: resume state was made with a different model, text, --tokens, --seq-len or --batch; rerun with the same arguments or delete it",
            path.display()
        );
    }
    let next: usize = m
        .meta("next_window")?
        .parse()
        .with_context(|| format!("{}: bad next_window", path.display()))?;
    let stored: usize = m
        .meta("slice_windows")?
        .parse()
        .with_context(|| format!("{}: bad slice_windows", path.display()))?;
    if stored != slice_windows
        || next > slice_windows
        || (!next.is_multiple_of(batch) && next != slice_windows)
    {
        bail!(
            "{}: resume state does not fit this run (window {next} of {stored}); delete it",
            path.display()
        );
    }
    for (i, p) in model.params.iter().enumerate() {
        if m.shape(&p.name) != Some(p.var.dims()) {
            bail!(
                "{}: tensor {} missing or of another shape; delete it",
                path.display(),
                p.name
            );
        }
        acc.sums[i] = m.f64s(&p.name)?;
    }
    acc.windows = next;
    Ok(())
}

/// `broca score merge`: for each language with shard results under `DIR/.partial/`, checks
/// that shards 0..n are all there and agree, adds their θ ⊙ Σg in shard order and writes
/// `DIR/<lang>.safetensors` as a one-shot run would.
pub fn merge(out: &Path) -> Result<Vec<Outcome>> {
    let dir = partial_dir(out);
    let rd = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "{}: no shard results here (run score --shard i/n --out {} first)",
            dir.display(),
            out.display()
        )
    })?;
    let mut by_lang: BTreeMap<String, BTreeMap<usize, (Shard, PathBuf)>> = BTreeMap::new();
    for e in rd {
        let p = e?.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if name.ends_with(".state") || name.starts_with('.') {
            continue;
        }
        let Some((lang, tag)) = name.rsplit_once(".shard-") else {
            continue;
        };
        let Some(shard) = Shard::from_tag(&format!("shard-{tag}")) else {
            continue;
        };
        by_lang
            .entry(lang.to_string())
            .or_default()
            .insert(shard.index, (shard, p.clone()));
    }
    if by_lang.is_empty() {
        bail!(
            "{}: no shard results (<lang>.shard-i-of-n.safetensors)",
            dir.display()
        );
    }
    by_lang
        .into_iter()
        .map(|(lang, shards)| merge_language(out, &lang, &shards))
        .collect()
}

fn merge_language(
    out: &Path,
    lang: &str,
    shards: &BTreeMap<usize, (Shard, PathBuf)>,
) -> Result<Outcome> {
    let start = Instant::now();
    let count = shards.values().next().map(|s| s.0.count).unwrap_or(0);
    if shards.values().any(|s| s.0.count != count) {
        let found: Vec<String> = shards.values().map(|s| s.0.to_string()).collect();
        bail!(
            "{}: {lang} has shards of different counts ({})",
            partial_dir(out).display(),
            found.join(", ")
        );
    }
    let missing: Vec<String> = (0..count)
        .filter(|i| !shards.contains_key(i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: {lang} is missing shard(s) {} (run score --shard {} with the same arguments)",
            partial_dir(out).display(),
            missing.join(", "),
            missing[0]
        );
    }
    let maps: Vec<Mapped> = shards
        .values()
        .map(|(_, p)| Mapped::open(p))
        .collect::<Result<_>>()?;
    let first = &maps[0];
    let hash = first.meta("args_hash")?.to_string();
    let mut windows = 0usize;
    let mut tokens = 0usize;
    for (m, (_, p)) in maps.iter().zip(shards.values()) {
        if m.meta("args_hash")? != hash {
            bail!(
                "{}: made with different arguments or model than {}",
                p.display(),
                shards[&0].1.display()
            );
        }
        if m.names != first.names || m.names.iter().any(|n| m.shape(n) != first.shape(n)) {
            bail!(
                "{}: tensor names or shapes differ from {}",
                p.display(),
                shards[&0].1.display()
            );
        }
        windows += m
            .meta("windows")?
            .parse::<usize>()
            .context("bad windows metadata")?;
        tokens += m
            .meta("tokens")?
            .parse::<usize>()
            .context("bad tokens metadata")?;
    }
    let total: usize = first
        .meta("total_windows")?
        .parse()
        .context("bad total_windows metadata")?;
    if windows != total {
        bail!(
            "{}: {lang}'s shards hold {windows} windows, expected {total}",
            partial_dir(out).display()
        );
    }
    let target = final_path(out, lang);
    let outcome = |status: &str, secs: f64| Outcome {
        lang: lang.to_string(),
        status: status.to_string(),
        windows,
        tokens,
        resumed_windows: 0,
        computed_tokens: 0,
        seconds: secs,
        tokens_per_second: 0.0,
        file: target.clone(),
    };
    if done_with(&target, &hash)? {
        return Ok(outcome("skipped", 0.0));
    }
    let keep = ["lang", "seq_len", "batch", "model_sha256", "args_hash"];
    let mut meta: BTreeMap<String, String> = first
        .meta
        .iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("method".into(), METHOD_IMPORTANCE.into());
    meta.insert("tokens".into(), tokens.to_string());
    meta.insert("windows".into(), windows.to_string());
    meta.insert("version".into(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("merged_shards".into(), count.to_string());
    let names: Vec<(String, Vec<usize>)> = first
        .names
        .iter()
        .map(|n| (n.clone(), first.shape(n).unwrap_or(&[]).to_vec()))
        .collect();
    files::write(&target, &names, Store::F32, &meta, |i| {
        let mut sum = maps[0].f64s(&names[i].0)?;
        for m in &maps[1..] {
            for (s, v) in sum.iter_mut().zip(m.f64s(&names[i].0)?) {
                *s += v;
            }
        }
        Ok(score_from_product(sum, windows))
    })?;
    Ok(outcome("merged", start.elapsed().as_secs_f64()))
}
