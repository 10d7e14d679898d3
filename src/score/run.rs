//! One language's importance run on disk: resumable, shardable, in planned passes over
//! layer groups, and the merge of shards and groups.
//!
//! Layout under `--out DIR`: the result `DIR/<lang>.safetensors`; under `DIR/.partial/`, per
//! unit of work (language, shard, layer group; the group's tag `.layers-A-B` is left out
//! when it is the whole model): the resume state `<unit>.state.safetensors` (the f64 running
//! sums of the group's parameters and the number of windows they hold, rewritten atomically
//! at each checkpoint and removed when the unit is done); for `--shard i/n` or `--layers A-B`
//! the unit's result `<unit>.safetensors` (θ ⊙ Σg over its windows, f64, plus its window
//! count) for `score merge`. A plain run in several passes fills `<lang>.result.part` (the
//! final file, created at full size with its header) pass by pass at each tensor's offset,
//! records finished passes in `<lang>.passes.json`, and renames it into place at the end.
//!
//! Bit-identical resume: checkpoints fall only on batch boundaries, batches are always cut
//! from the start of the slice, and the running sum is stored exactly (f64), so a resumed run
//! adds the same batch gradients in the same order as an uninterrupted one. A parameter's sum
//! does not depend on which others are summed with it, so passes, groups and shards give the
//! scores of one pass. Every state and result carries a hash of (model sha256, language,
//! token ids, seq-len, batch, included parameters); a mismatch is refused rather than mixed.

use super::accumulate::{score_from_product, times_param, GradSum};
use super::files::{self, Mapped, ResultFile, Store};
use super::plan::{layer_of, Group, Include};
use super::recover;
use super::windows::{windows, Shard};
use super::METHOD_IMPORTANCE;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;
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
    /// Which parameters get scores.
    pub include: Include,
    /// The passes ([`super::plan::plan`]); empty: one pass over the whole model.
    pub groups: Vec<Group>,
    /// The groups were forced by `--layers`: results are partials for `score merge`.
    pub forced_layers: bool,
    /// How result scores are stored (F32 or BF16).
    pub dtype: Store,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            seq_len: 512,
            batch: 1,
            shard: None,
            checkpoint_secs: 300.0,
            checkpoint_windows: None,
            stop_after_windows: None,
            include: Include::Layers,
            groups: Vec::new(),
            forced_layers: false,
            dtype: Store::F32,
        }
    }
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
    /// `scored`, `resumed`, `skipped` (already done), `shard` or `partial` (a unit result for
    /// `score merge` written) or `merged`.
    pub status: String,
    pub windows: usize,
    pub tokens: usize,
    /// Windows taken over from checkpoints (summed over passes).
    pub resumed_windows: usize,
    /// Tokens run through forward/backward by this call (summed over passes).
    pub computed_tokens: usize,
    /// Passes over the windows (layer groups).
    pub passes: usize,
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

/// A unit's file stem: `<lang>[.shard-i-of-n][.layers-A-B]` (`tag` empty for the whole model).
fn stem(lang: &str, shard: Option<Shard>, tag: &str) -> String {
    let mut s = lang.to_string();
    if let Some(sh) = shard {
        s = format!("{s}.{}", sh.tag());
    }
    if !tag.is_empty() {
        s = format!("{s}.{tag}");
    }
    s
}

/// Resume state of a whole-model unit (one pass; or one shard of it).
pub fn state_path(out: &Path, lang: &str, shard: Option<Shard>) -> PathBuf {
    unit_state_path(out, lang, shard, "")
}

fn unit_state_path(out: &Path, lang: &str, shard: Option<Shard>, tag: &str) -> PathBuf {
    partial_dir(out).join(format!("{}.state.safetensors", stem(lang, shard, tag)))
}

/// A whole-model shard's result.
pub fn shard_path(out: &Path, lang: &str, shard: Shard) -> PathBuf {
    unit_path(out, lang, Some(shard), "")
}

fn unit_path(out: &Path, lang: &str, shard: Option<Shard>, tag: &str) -> PathBuf {
    partial_dir(out).join(format!("{}.safetensors", stem(lang, shard, tag)))
}

/// The result being filled by a multi-pass run, and its record of finished passes.
fn result_part(out: &Path, lang: &str) -> PathBuf {
    partial_dir(out).join(format!("{lang}.result.part"))
}

fn passes_path(out: &Path, lang: &str) -> PathBuf {
    partial_dir(out).join(format!("{lang}.passes.json"))
}

/// Hash of everything that decides the bits of a result.
pub fn args_hash(
    model_sha256: &str,
    lang: &str,
    ids: &[u32],
    seq_len: usize,
    batch: usize,
    include: Include,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "broca-score-v2|{model_sha256}|{lang}|{seq_len}|{batch}|{include}|{}|",
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
        || lang.contains(".layers-")
    {
        bail!("'{lang}': not usable as a language name (it names the output file)");
    }
    Ok(())
}

/// Whether `path` exists and was made with `hash`; an error when it exists with another;
/// `false` (said on stderr) when it is unreadable, so that it is computed again.
fn done_with(path: &Path, hash: &str) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let Some(m) = recover::open_or_redo(path, "computing it again") else {
        return Ok(false);
    };
    if m.meta.get("args_hash").map(String::as_str) != Some(hash) {
        bail!(
            "{}: exists but was made with a different model, text, --tokens, --seq-len, --batch or --include; `rm {}` or use another --out",
            path.display(),
            path.display()
        );
    }
    Ok(true)
}

fn base_meta(
    lang: &str,
    model_sha256: &str,
    opts: &Options,
    hash: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("lang".into(), lang.to_string());
    m.insert("seq_len".into(), opts.seq_len.to_string());
    m.insert("batch".into(), opts.batch.to_string());
    m.insert("model_sha256".into(), model_sha256.to_string());
    m.insert("args_hash".into(), hash.to_string());
    m.insert("include".into(), opts.include.to_string());
    m.insert("dtype".into(), opts.dtype.meta_name().to_string());
    m.insert("version".into(), env!("CARGO_PKG_VERSION").to_string());
    m
}

/// The whole model as one group.
fn whole(model: &Model, include: Include) -> Group {
    Group {
        first: 0,
        last: model.config.num_layers - 1,
        extras: include == Include::All,
    }
}

/// A group's file-name tag, empty for the whole model.
fn tag_of(model: &Model, g: Group) -> String {
    if g.first == 0 && g.last + 1 == model.config.num_layers {
        String::new()
    } else {
        g.tag()
    }
}

/// `(index, name, shape)` of the parameters `scored` marks, in model order.
fn entries(model: &Model, scored: &[bool]) -> Vec<(usize, String, Vec<usize>)> {
    model
        .params
        .iter()
        .enumerate()
        .filter(|(i, _)| scored[*i])
        .map(|(i, p)| (i, p.name.clone(), p.shape.clone()))
        .collect()
}

fn names_shapes(e: &[(usize, String, Vec<usize>)]) -> Vec<(String, Vec<usize>)> {
    e.iter().map(|(_, n, s)| (n.clone(), s.clone())).collect()
}

/// Finished passes of a multi-pass run, valid for one result header.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct PassRecord {
    header_sha: String,
    done: Vec<String>,
}

/// The work of one unit: windows `slice` of `ids` accumulated for group `g`, resumed from
/// and checkpointed to the unit's state.
struct Unit<'a> {
    job: &'a Job<'a>,
    lang: &'a str,
    ids: &'a [u32],
    slice: &'a [Range<usize>],
    opts: &'a Options,
    hash: &'a str,
    meta: &'a BTreeMap<String, String>,
}

impl Unit<'_> {
    /// Accumulates group `g`; returns the sums and how many windows came from a checkpoint.
    /// `processed` counts windows computed in this call (for `stop_after_windows`).
    fn run(
        &self,
        g: Group,
        processed: &mut usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(GradSum, usize)> {
        let model = self.job.model;
        let opts = self.opts;
        let tag = tag_of(model, g);
        let state = unit_state_path(self.job.out, self.lang, opts.shard, &tag);
        let scored = g.scored(model);
        let mut acc = GradSum::zeros_for(model, &scored);
        let readable = match state.exists() {
            true => recover::open_or_redo(&state, "starting this part over"),
            false => None,
        };
        if let Some(m) = readable {
            load_state(
                &m,
                &state,
                self.hash,
                model,
                self.slice.len(),
                opts.batch,
                &mut acc,
            )?;
            acc.tokens = self.slice[..acc.windows].iter().map(|w| w.len()).sum();
            progress(acc.tokens);
        }
        let resumed = acc.windows;
        let mut last_ckpt = (Instant::now(), acc.windows);
        for chunk in self.slice[acc.windows..].chunks(opts.batch) {
            acc.add_batch(model, self.ids, chunk)?;
            progress(chunk.iter().map(|w| w.len()).sum());
            *processed += chunk.len();
            let by_time = last_ckpt.0.elapsed().as_secs_f64() >= opts.checkpoint_secs;
            let by_count = opts
                .checkpoint_windows
                .is_some_and(|k| acc.windows - last_ckpt.1 >= k);
            if acc.windows < self.slice.len() && (by_time || by_count) {
                save_state(&state, model, &acc, self.slice.len(), self.meta)?;
                last_ckpt = (Instant::now(), acc.windows);
            }
            if opts.stop_after_windows.is_some_and(|k| *processed >= k)
                && acc.windows < self.slice.len()
            {
                bail!(
                    "{}: stopped after {processed} windows (--stop-after-windows)",
                    self.lang
                );
            }
        }
        Ok((acc, resumed))
    }

    /// Removes the unit's resume state once its result is safely written.
    fn done(&self, g: Group) -> Result<()> {
        let state = unit_state_path(
            self.job.out,
            self.lang,
            self.opts.shard,
            &tag_of(self.job.model, g),
        );
        if state.exists() {
            std::fs::remove_file(&state)
                .with_context(|| format!("{}: cannot remove", state.display()))?;
        }
        Ok(())
    }
}

/// Scores one language (or one shard or layer group of it) in the planned passes, resuming
/// from `DIR/.partial/` and skipping when the result already exists. `progress(tokens)` is
/// called per batch of every pass (and with the tokens taken over from checkpoints or
/// finished passes).
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
    if !matches!(opts.dtype, Store::F32 | Store::BF16) {
        bail!("--dtype: scores are stored as f32 or bf16");
    }
    let model = job.model;
    // before any file is created
    model.check_token_ids(ids)?;
    let start = Instant::now();
    let wins = windows(ids.len(), opts.seq_len).with_context(|| format!("language {lang}"))?;
    let hash = args_hash(
        job.model_sha256,
        lang,
        ids,
        opts.seq_len,
        opts.batch,
        opts.include,
    );
    let slice = &wins[opts
        .shard
        .map(|s| s.range(wins.len()))
        .unwrap_or(0..wins.len())];
    let slice_tokens: usize = slice.iter().map(|w| w.len()).sum();
    let groups = match opts.groups.is_empty() {
        true => vec![whole(model, opts.include)],
        false => opts.groups.clone(),
    };
    let partial = opts.shard.is_some() || opts.forced_layers;
    let mut meta = base_meta(lang, job.model_sha256, opts, &hash);
    meta.insert("tokens".into(), slice_tokens.to_string());
    meta.insert("windows".into(), slice.len().to_string());
    let unit = Unit {
        job,
        lang,
        ids,
        slice,
        opts,
        hash: &hash,
        meta: &meta,
    };
    let (mut resumed, mut processed, mut computed) = (0, 0, 0);
    // a unit that resumed `res` windows computed the rest of the slice
    let mut count = |res: usize| {
        computed += slice_tokens - slice[..res].iter().map(|w| w.len()).sum::<usize>();
        resumed += res;
    };
    let target;
    if partial {
        target = unit_path(job.out, lang, opts.shard, &tag_of(model, groups[0]));
        for &g in &groups {
            let path = unit_path(job.out, lang, opts.shard, &tag_of(model, g));
            if done_with(&path, &hash)? {
                progress(slice_tokens);
                continue;
            }
            let (acc, res) = unit.run(g, &mut processed, progress)?;
            count(res);
            let e = entries(model, &g.scored(model));
            let mut m = meta.clone();
            m.insert("method".into(), format!("{METHOD_IMPORTANCE}-partial"));
            m.insert("total_windows".into(), wins.len().to_string());
            m.insert("layers".into(), format!("{}-{}", g.first, g.last));
            m.insert("num_layers".into(), model.config.num_layers.to_string());
            if let Some(s) = opts.shard {
                m.insert("shard".into(), s.to_string());
            }
            files::write(&path, &names_shapes(&e), Store::F64, &m, |k| {
                let i = e[k].0;
                times_param(model, i, acc.sums[i].as_deref().context("scored")?)
            })?;
            unit.done(g)?;
        }
    } else {
        target = final_path(job.out, lang);
        if done_with(&target, &hash)? {
            progress(slice_tokens * groups.len());
            return Ok(outcome(
                lang,
                "skipped",
                slice,
                0,
                0,
                groups.len(),
                0.0,
                &target,
            ));
        }
        let mut all = vec![false; model.params.len()];
        for g in &groups {
            for (a, s) in all.iter_mut().zip(g.scored(model)) {
                *a |= s;
            }
        }
        let e = entries(model, &all);
        let mut m = meta.clone();
        m.insert("method".into(), METHOD_IMPORTANCE.into());
        let mut result = ResultFile::open(
            &result_part(job.out, lang),
            &names_shapes(&e),
            opts.dtype,
            &m,
        )?;
        let record_path = passes_path(job.out, lang);
        let mut record = pass_record(&record_path, &result);
        record.header_sha = result.header_sha.clone();
        for &g in &groups {
            if record.done.contains(&g.tag()) {
                progress(slice_tokens);
                continue;
            }
            let (acc, res) = match unit.run(g, &mut processed, progress) {
                Ok(r) => r,
                Err(e) if record.done.is_empty() => {
                    // no pass is in the result file yet: nothing there to resume from
                    let _ = std::fs::remove_file(result.path());
                    let _ = std::fs::remove_file(&record_path);
                    let _ = std::fs::remove_dir(partial_dir(job.out));
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            count(res);
            for (k, (i, _, _)) in e.iter().enumerate() {
                if let Some(sum) = acc.sums[*i].as_deref() {
                    let scores = score_from_product(times_param(model, *i, sum)?, acc.windows);
                    result.write_tensor(k, &scores)?;
                }
            }
            result.sync()?;
            record.done.push(g.tag());
            crate::io::write_json(&record_path, &record)?;
            unit.done(g)?;
        }
        result.finish(&target)?;
        let _ = std::fs::remove_file(&record_path);
    }
    // leaves nothing beside the results once no state or partial is left
    let _ = std::fs::remove_dir(partial_dir(job.out));
    let status = match (opts.shard, partial, resumed) {
        (Some(_), _, _) => "shard",
        (None, true, _) => "partial",
        (None, false, 0) => "scored",
        _ => "resumed",
    };
    Ok(outcome(
        lang,
        status,
        slice,
        resumed,
        computed,
        groups.len(),
        start.elapsed().as_secs_f64(),
        &target,
    ))
}

/// The finished passes recorded for `result`: none when it was just created (a pass record
/// beside a result file that is gone or unusable counts nothing) or when the record is
/// unreadable (said on stderr).
fn pass_record(path: &Path, result: &ResultFile) -> PassRecord {
    if result.replaced {
        eprintln!(
            "score: {}: unusable (truncated, or made by other arguments); computing every pass again",
            result.path().display()
        );
    }
    if result.fresh {
        return PassRecord::default();
    }
    let Ok(bytes) = std::fs::read(path) else {
        return PassRecord::default();
    };
    match serde_json::from_slice::<PassRecord>(&bytes) {
        Ok(r) if r.header_sha == result.header_sha => r,
        Ok(_) => PassRecord::default(),
        Err(e) => {
            eprintln!(
                "score: {}: unreadable pass record ({e}); computing every pass again",
                path.display()
            );
            PassRecord::default()
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn outcome(
    lang: &str,
    status: &str,
    slice: &[Range<usize>],
    resumed: usize,
    computed: usize,
    passes: usize,
    secs: f64,
    file: &Path,
) -> Outcome {
    Outcome {
        lang: lang.to_string(),
        status: status.to_string(),
        windows: slice.len(),
        tokens: slice.iter().map(|w| w.len()).sum(),
        resumed_windows: resumed,
        computed_tokens: computed,
        passes,
        seconds: secs,
        tokens_per_second: if secs > 0.0 {
            computed as f64 / secs
        } else {
            0.0
        },
        file: file.to_path_buf(),
    }
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
    let scored: Vec<bool> = acc.sums.iter().map(Option::is_some).collect();
    let e = entries(model, &scored);
    files::write(path, &names_shapes(&e), Store::F64, &meta, |k| {
        Ok(acc.sums[e[k].0].clone().unwrap_or_default())
    })
}

fn load_state(
    m: &Mapped,
    path: &Path,
    hash: &str,
    model: &Model,
    slice_windows: usize,
    batch: usize,
    acc: &mut GradSum,
) -> Result<()> {
    if m.meta("args_hash")? != hash {
        bail!(
            "{}: resume state was made with a different model, text, --tokens, --seq-len, --batch or --include; rerun with the same arguments, or `rm {}` to start over",
            path.display(),
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
            "{}: resume state does not fit this run (window {next} of {stored}); `rm {}` to start over",
            path.display(),
            path.display()
        );
    }
    for (i, p) in model.params.iter().enumerate() {
        let Some(sum) = acc.sums[i].as_mut() else {
            continue;
        };
        if m.shape(&p.name) != Some(p.shape.as_slice()) {
            bail!(
                "{}: tensor {} missing or of another shape; `rm {}` to start over",
                path.display(),
                p.name,
                path.display()
            );
        }
        *sum = m.f64s(&p.name)?;
    }
    acc.windows = next;
    Ok(())
}

/// One unit result found under `.partial/`.
struct PartialFile {
    shard: Option<Shard>,
    path: PathBuf,
    map: Mapped,
}

/// `(lang, shard, tag)` of a unit result's file name, or `None` for other files.
pub fn parse_partial_name(name: &str) -> Option<(String, Option<Shard>, String)> {
    let stem = name.strip_suffix(".safetensors")?;
    if stem.ends_with(".state") || stem.starts_with('.') {
        return None;
    }
    let (rest, tag) = match stem.rsplit_once(".layers-") {
        Some((r, t)) => (r, format!("layers-{t}")),
        None => (stem, String::new()),
    };
    let (lang, shard) = match rest.rsplit_once(".shard-") {
        Some((l, t)) => (l, Some(Shard::from_tag(&format!("shard-{t}"))?)),
        None => (rest, None),
    };
    if shard.is_none() && tag.is_empty() {
        return None;
    }
    Some((lang.to_string(), shard, tag))
}

/// A language's partial files: by layer-group tag, each shard's file.
type GroupFiles = BTreeMap<String, Vec<(Option<Shard>, PathBuf)>>;

/// A layer group's range (`None`: every layer) and its checked partial files.
type CheckedGroup = (Option<(usize, usize)>, Vec<PartialFile>);

/// `broca score merge`: for each language with unit results under `DIR/.partial/` (shards
/// and/or layer groups), checks that they agree, that every group has all its shards and
/// that the groups cover every layer once, adds each group's θ ⊙ Σg in shard order, writes
/// `DIR/<lang>.safetensors` as a one-shot run would, and removes the partials it used.
pub fn merge(out: &Path) -> Result<Vec<Outcome>> {
    let dir = partial_dir(out);
    let rd = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "{}: no shard or layer-group results here (run score --shard i/n or --layers A-B --out {} first)",
            dir.display(),
            out.display()
        )
    })?;
    let mut by_lang: BTreeMap<String, GroupFiles> = BTreeMap::new();
    for e in rd {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some((lang, shard, tag)) = parse_partial_name(name) {
            by_lang
                .entry(lang)
                .or_default()
                .entry(tag)
                .or_default()
                .push((shard, p.clone()));
        }
    }
    if by_lang.is_empty() {
        bail!(
            "{}: no shard or layer-group results (<lang>.shard-i-of-n.safetensors, <lang>.layers-A-B.safetensors)",
            dir.display()
        );
    }
    by_lang
        .into_iter()
        .map(|(lang, groups)| merge_language(out, &lang, groups))
        .collect()
}

fn meta_usize(m: &Mapped, key: &str) -> Result<usize> {
    m.meta(key)?
        .parse()
        .with_context(|| format!("bad {key} metadata"))
}

/// Checks one group's partials (one per shard, all shards there) and orders them by shard.
fn check_group(
    out: &Path,
    lang: &str,
    tag: &str,
    mut files: Vec<PartialFile>,
) -> Result<Vec<PartialFile>> {
    let what = if tag.is_empty() {
        lang.to_string()
    } else {
        format!("{lang} ({tag})")
    };
    let count = files[0].shard.map_or(1, |s| s.count);
    if files
        .iter()
        .any(|f| f.shard.map_or(1, |s| s.count) != count)
    {
        let found: Vec<String> = files
            .iter()
            .map(|f| f.shard.map_or("unsharded".into(), |s| s.to_string()))
            .collect();
        bail!(
            "{}: {what} has shards of different counts ({})",
            partial_dir(out).display(),
            found.join(", ")
        );
    }
    files.sort_by_key(|f| f.shard.map_or(0, |s| s.index));
    let missing: Vec<String> = (0..count)
        .filter(|i| !files.iter().any(|f| f.shard.map_or(0, |s| s.index) == *i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if files[0].shard.is_some() && !missing.is_empty() {
        bail!(
            "{}: {what} is missing shard(s) {} (run score --shard {} with the same arguments)",
            partial_dir(out).display(),
            missing.join(", "),
            missing[0]
        );
    }
    let first = &files[0].map;
    let mut windows = 0;
    for f in &files {
        if f.map.names != first.names
            || f.map.names.iter().any(|n| f.map.shape(n) != first.shape(n))
        {
            bail!(
                "{}: tensor names or shapes differ from {}",
                f.path.display(),
                files[0].path.display()
            );
        }
        windows +=
            meta_usize(&f.map, "windows").with_context(|| format!("{}", f.path.display()))?;
    }
    let total = meta_usize(first, "total_windows")?;
    if windows != total {
        bail!(
            "{}: {what}'s shards hold {windows} windows, expected {total}",
            partial_dir(out).display()
        );
    }
    Ok(files)
}

fn merge_language(out: &Path, lang: &str, groups: GroupFiles) -> Result<Outcome> {
    let start = Instant::now();
    let mut checked: Vec<CheckedGroup> = Vec::new();
    for (tag, files) in groups {
        let files = files
            .into_iter()
            .map(|(shard, path)| {
                Ok(PartialFile {
                    shard,
                    map: recover::open_partial(&path, out, lang, shard, &tag)?,
                    path,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let range = Group::from_tag(&tag);
        checked.push((range, check_group(out, lang, &tag, files)?));
    }
    // every partial agrees on the run; the groups tile the layers
    checked.sort_by_key(|(r, _)| r.map_or(0, |r| r.0));
    let first = &checked[0].1[0];
    let hash = first.map.meta("args_hash")?.to_string();
    for (_, files) in &checked {
        for f in files {
            if f.map.meta("args_hash")? != hash {
                bail!(
                    "{}: made with different arguments or model than {}",
                    f.path.display(),
                    first.path.display()
                );
            }
        }
    }
    if checked.iter().any(|(r, _)| r.is_some()) {
        let layers = meta_usize(&first.map, "num_layers")?;
        let mut next = 0;
        for (r, files) in &checked {
            let (a, b) = r.with_context(|| {
                format!(
                    "{}: a whole-model partial beside layer groups",
                    files[0].path.display()
                )
            })?;
            if a != next {
                bail!(
                    "{}: {lang}: layers {next}-{} have no result (run score --layers {next}-{} with the same arguments)",
                    partial_dir(out).display(),
                    a.max(next + 1) - 1,
                    a.max(next + 1) - 1
                );
            }
            next = b + 1;
        }
        if next != layers {
            bail!(
                "{}: {lang}: layers {next}-{} have no result (run score --layers {next}-{} with the same arguments)",
                partial_dir(out).display(),
                layers - 1,
                layers - 1
            );
        }
    }
    let windows = meta_usize(&first.map, "total_windows")?;
    let tokens: usize = checked[0]
        .1
        .iter()
        .map(|f| meta_usize(&f.map, "tokens"))
        .sum::<Result<usize>>()?;
    let target = final_path(out, lang);
    let slice: Vec<Range<usize>> = vec![0..0; windows];
    let mut o = outcome(lang, "skipped", &slice, 0, 0, checked.len(), 0.0, &target);
    o.tokens = tokens;
    if done_with(&target, &hash)? {
        return Ok(o);
    }
    let dtype = match first.map.meta.get("dtype").map(String::as_str) {
        Some("bf16") => Store::BF16,
        _ => Store::F32,
    };
    let keep = [
        "lang",
        "seq_len",
        "batch",
        "model_sha256",
        "args_hash",
        "include",
        "dtype",
    ];
    let mut meta: BTreeMap<String, String> = first
        .map
        .meta
        .iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("method".into(), METHOD_IMPORTANCE.into());
    meta.insert("tokens".into(), tokens.to_string());
    meta.insert("windows".into(), windows.to_string());
    meta.insert("version".into(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("merged_shards".into(), checked[0].1.len().to_string());
    if checked.len() > 1 {
        meta.insert("merged_groups".into(), checked.len().to_string());
    }
    // (group, tensor name, shape) in layer order
    let mut names: Vec<(usize, String, Vec<usize>)> = Vec::new();
    for (gi, (_, files)) in checked.iter().enumerate() {
        let m = &files[0].map;
        let mut ns: Vec<&String> = m.names.iter().collect();
        ns.sort_by_key(|n| layer_of(n).map_or((1, usize::MAX), |l| (0, l)));
        for n in ns {
            names.push((gi, n.clone(), m.shape(n).unwrap_or(&[]).to_vec()));
        }
    }
    let entries: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|(_, n, s)| (n.clone(), s.clone()))
        .collect();
    files::write(&target, &entries, dtype, &meta, |i| {
        let (gi, name, _) = &names[i];
        let maps = &checked[*gi].1;
        let mut sum = maps[0].map.f64s(name)?;
        for f in &maps[1..] {
            for (s, v) in sum.iter_mut().zip(f.map.f64s(name)?) {
                *s += v;
            }
        }
        Ok(score_from_product(sum, windows))
    })?;
    for (_, files) in &checked {
        for f in files {
            std::fs::remove_file(&f.path)
                .with_context(|| format!("{}: cannot remove", f.path.display()))?;
        }
    }
    let _ = std::fs::remove_dir(partial_dir(out));
    o.status = "merged".into();
    o.seconds = start.elapsed().as_secs_f64();
    Ok(o)
}
