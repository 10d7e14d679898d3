//! Hostile input (issue 14): seeded mutations of real checkpoint headers, opened
//! with the library loader. Every case must end in `Ok` or in an `Err` naming the file (never
//! a panic), and no single allocation may exceed 4 × the checkpoint's bytes + 64 MiB (a
//! counting global allocator records the largest request of each case).
//!
//! Inputs: SmolLM2's GGUF (a copy mutated in place and restored after each case; only header
//! bytes change, so no weight is decoded beyond the norms) and tiny Hugging Face checkpoints
//! (one f32 `model.safetensors`; bf16 shards with an index; one with SmolLM2's
//! `tokenizer.json`). Everything runs in one test so that the allocator sees one case at a
//! time.

mod common;
mod fuzz;

use broca::model::{Arch, Config, Model, Residency};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Largest single allocation request since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, recording the largest request.
struct Counting;

// SAFETY: every call goes to `System` unchanged; the atomic is the only addition.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What the cases gave.
#[derive(Default)]
struct Tally {
    cases: usize,
    loaded: usize,
    refused: usize,
    /// Failures of the promise, each with its case.
    bad: Vec<String>,
    largest: usize,
}

impl Tally {
    /// Runs one case: `load` must not panic, must fail naming `named`, and must not ask for
    /// more than `bound` bytes at once.
    fn case(
        &mut self,
        what: &str,
        named: &Path,
        bound: usize,
        load: impl FnOnce() -> anyhow::Result<()>,
    ) {
        self.cases += 1;
        LARGEST.store(0, Ordering::Relaxed);
        let r = catch_unwind(AssertUnwindSafe(load));
        let largest = LARGEST.load(Ordering::Relaxed);
        self.largest = self.largest.max(largest);
        if largest > bound {
            self.bad.push(format!(
                "{what}: allocated {largest} bytes at once (bound {bound})"
            ));
        }
        match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.bad.push(format!("{what}: panicked: {msg}"));
            }
            Ok(Ok(())) => self.loaded += 1,
            Ok(Err(e)) => {
                self.refused += 1;
                let msg = format!("{e:#}");
                if !msg.contains(&named.display().to_string()) {
                    self.bad.push(format!(
                        "{what}: error does not name {}: {msg}",
                        named.display()
                    ));
                }
            }
        }
    }

    fn report(&self, name: &str, secs: f64) {
        eprintln!(
            "{name}: {} cases in {secs:.1} s: {} loaded, {} refused, {} broken promises, largest allocation {:.1} MiB",
            self.cases,
            self.loaded,
            self.refused,
            self.bad.len(),
            self.largest as f64 / (1 << 20) as f64
        );
    }
}

fn bound(bytes: u64) -> usize {
    4 * bytes as usize + (64 << 20)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Mutations of SmolLM2's GGUF header, each applied to a copy of the file and undone.
fn fuzz_gguf(rng: &mut StdRng, tmp: &Path, cases: usize, t: &mut Tally) {
    let src = common::asset(common::SMOLLM);
    let path = tmp.join("smol.gguf");
    std::fs::copy(&src, &path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut head = vec![0u8; 4 << 20];
    let n = std::fs::File::open(&path)
        .unwrap()
        .read_at(&mut head, 0)
        .unwrap();
    head.truncate(n);
    let layout = fuzz::gguf::layout(&head);
    assert!(layout.fields.len() > 1000, "{} fields", layout.fields.len());
    let head = head[..layout.end].to_vec();
    let cut = tmp.join("cut.gguf");
    let b = bound(len);
    // the unmutated copy loads
    t.case("original", &path, b, || load(&path));
    assert_eq!(t.loaded, 1, "{:?}", t.bad);
    // targeted: an array length that the rest of the file can hold (candle would read the
    // tensor data as ~24 million values: a 1 GiB vector), a zero alignment (candle divides by
    // it), a shape whose element count overflows
    let arrays: Vec<_> = layout
        .fields
        .iter()
        .filter(|f| f.kind == fuzz::gguf::Kind::ArrLen)
        .collect();
    let token_type = arrays[2];
    let most = (len - token_type.at as u64 - 8) / 4;
    let key_at = head
        .windows(17)
        .position(|w| w == b"general.file_type")
        .unwrap();
    let dim = layout
        .fields
        .iter()
        .find(|f| f.kind == fuzz::gguf::Kind::Dim)
        .unwrap();
    let targeted = [
        (
            vec![(token_type.at, most.to_le_bytes().to_vec())],
            "more than 256 MiB in memory",
        ),
        (
            vec![
                (key_at, b"general.alignment".to_vec()),
                (key_at + 21, 0u32.to_le_bytes().to_vec()),
            ],
            "general.alignment is 0",
        ),
        (
            vec![(dim.at, (1u64 << 62).to_le_bytes().to_vec())],
            "beyond 2^64 elements",
        ),
    ];
    for (w, expect) in targeted {
        for (at, bytes) in &w {
            file.write_all_at(bytes, *at as u64).unwrap();
        }
        let e = Model::load_with(&path, Residency::Mapped)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            e.as_deref().is_some_and(|e| e.contains(expect)),
            "{expect}: {e:?}"
        );
        t.case(expect, &path, b, || load(&path));
        for (at, bytes) in &w {
            file.write_all_at(&head[*at..*at + bytes.len()], *at as u64)
                .unwrap();
        }
    }
    for i in 0..cases {
        let (m, what) = fuzz::gguf::mutate(rng, &head, &layout, len);
        let what = format!("gguf case {i}: {what}");
        match m {
            fuzz::gguf::Mutation::Write(w) => {
                for (at, bytes) in &w {
                    file.write_all_at(bytes, *at as u64).unwrap();
                }
                t.case(&what, &path, b, || load(&path));
                for (at, bytes) in &w {
                    file.write_all_at(&head[*at..*at + bytes.len()], *at as u64)
                        .unwrap();
                }
            }
            fuzz::gguf::Mutation::Truncate(c) => {
                std::fs::write(&cut, &head[..c]).unwrap();
                t.case(&what, &cut, b, || load(&cut));
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<()> {
    Model::load_with(path, Residency::Mapped).map(drop)
}

/// A tiny checkpoint directory of each kind: (dir, files to mutate).
fn hf_dirs(tmp: &Path) -> Vec<(PathBuf, Vec<&'static str>)> {
    let plain = tmp.join("plain");
    Model::random(Config::tiny(Arch::Qwen2), candle_core::DType::F32, 1)
        .unwrap()
        .save_hf(&plain)
        .unwrap();
    let sharded = tmp.join("sharded");
    let opts = broca::synth::SynthOptions {
        out: sharded.clone(),
        config: broca::synth::Preset::Tiny.config(),
        tokenizer: None,
        seed: 2,
        shard_size: 40 << 10,
        dtype: broca::synth::SynthDtype::Bf16,
    };
    broca::synth::write_synthetic(&opts, &mut |_| {}).unwrap();
    let mut shards: Vec<&'static str> = vec!["model.safetensors.index.json", "config.json"];
    for e in std::fs::read_dir(&sharded).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".safetensors") {
            shards.push(Box::leak(name.into_boxed_str()));
        }
    }
    assert!(shards.len() > 3, "{shards:?}");
    let with_tok = tmp.join("with-tokenizer");
    let mut m = Model::random(Config::tiny(Arch::Llama), candle_core::DType::F32, 3).unwrap();
    m.tokenizer = Some(common::gguf_tokenizer(common::SMOLLM));
    m.save_hf(&with_tok).unwrap();
    vec![
        (plain, vec!["model.safetensors", "config.json"]),
        (sharded, shards),
        (with_tok, vec!["tokenizer.json"]),
    ]
}

/// Mutations of the files of tiny HF checkpoints, each written over a file and undone.
fn fuzz_hf(rng: &mut StdRng, tmp: &Path, cases: [usize; 3], t: &mut Tally) {
    for ((dir, files), n) in hf_dirs(tmp).into_iter().zip(cases) {
        let b = bound(dir_bytes(&dir));
        t.case("original", &dir, b, || Model::load(&dir).map(drop));
        assert!(t.bad.is_empty(), "{:?}", t.bad);
        for i in 0..n {
            let f = files[rng.gen_range(0..files.len())];
            let p = dir.join(f);
            let orig = std::fs::read(&p).unwrap();
            let (bytes, what) = match f {
                "config.json" => fuzz::hf::config(rng, &orig),
                "tokenizer.json" => fuzz::hf::tokenizer(rng, &orig),
                "model.safetensors.index.json" => fuzz::hf::index(rng, &orig),
                _ => fuzz::hf::safetensors(rng, &orig),
            };
            std::fs::write(&p, &bytes).unwrap();
            let what = format!("{} case {i}: {f}: {what}", dir.display());
            t.case(&what, &dir, b, || Model::load(&dir).map(drop));
            std::fs::write(&p, &orig).unwrap();
        }
    }
}

#[test]
fn mutated_headers_fail_cleanly_and_allocate_within_bounds() {
    // the allocator sees big requests
    LARGEST.store(0, Ordering::Relaxed);
    let v = std::hint::black_box(vec![1u8; 50 << 20]);
    assert!(LARGEST.load(Ordering::Relaxed) >= 50 << 20);
    drop(v);
    // the GGUF copy (98 MB, a few bytes rewritten per case) on disk; the small checkpoints,
    // rewritten whole thousands of times, in memory when there is a /dev/shm
    let disk = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm");
    let small = match shm.is_dir() {
        true => tempfile::tempdir_in(shm),
        false => tempfile::tempdir(),
    }
    .unwrap();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = StdRng::seed_from_u64(14);
    let start = Instant::now();
    let mut g = Tally::default();
    fuzz_gguf(&mut rng, disk.path(), 2000, &mut g);
    let gguf_secs = start.elapsed().as_secs_f64();
    let mut h = Tally::default();
    fuzz_hf(&mut rng, small.path(), [1500, 1000, 60], &mut h);
    std::panic::set_hook(quiet);
    g.report("gguf", gguf_secs);
    h.report("safetensors", start.elapsed().as_secs_f64() - gguf_secs);
    let bad: Vec<&String> = g.bad.iter().chain(&h.bad).collect();
    assert!(
        bad.is_empty(),
        "{} broken promises:\n{}",
        bad.len(),
        bad.iter()
            .take(40)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // the mutations reach past the first check: some load, many are refused
    assert!(g.refused > g.cases / 2 && h.refused > h.cases / 3);
    assert!(g.loaded > 10 && h.loaded > 10, "{} {}", g.loaded, h.loaded);
}
