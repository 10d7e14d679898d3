//! Hostile input, class by class (issue 14). The promise: bad input → exit code 1, the last
//! stderr line is `error: …` naming the flag or file, no panic, nothing new in the output
//! folder; `--help` and `--version` stay full text with exit 0; a closed stdout ends quietly;
//! no lock or temporary name survives any exit.
//!
//! Each test builds its bad input itself. Most refusals happen before a model loads; the rest
//! use a tiny random llama with SmolLM2's tokenizer (fast) or SmolLM2 itself.

mod common;

use broca::model::{Arch, Config, Model};
use broca::study::config::StudyConfig;
use candle_core::DType;
use common::{asset, fixture, SMOLLM};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn cmd(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_broca"));
    c.args(args)
        .current_dir(cwd)
        .env("BROCA_ASSETS", common::assets())
        .env("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0")
        // candle attaches backtraces to its errors when this is set: they must not leak
        .env("RUST_BACKTRACE", "1");
    c
}

fn run(args: &[&str], cwd: &Path) -> Output {
    cmd(args, cwd)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run broca")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Every entry below `dir`, recursively, sorted (empty when `dir` is missing).
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(listing(&p));
        }
        out.push(p);
    }
    out.sort();
    out
}

/// Checks a refusal: exit code 1, no panic, the last stderr line `error: …` containing every
/// string of `named`, nothing on stdout.
fn check_refusal(args: &[&str], out: &Output, named: &[&str]) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "broca {args:?}: exit {:?}; stderr: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "broca {args:?} panicked: {stderr}"
    );
    // informational lines before the error: memory plans only
    let last = common::error_line(&stderr);
    assert!(
        !last.contains(".rs:"),
        "broca {args:?}: a backtrace? {stderr}"
    );
    for n in named {
        assert!(
            last.contains(n),
            "broca {args:?}: error does not name {n}: {last}"
        );
    }
    assert!(
        out.stdout.is_empty(),
        "broca {args:?}: stdout not empty: {}",
        text(&out.stdout)
    );
    last
}

/// Runs `args` in `dir` and checks the refusal, and that nothing appeared in `dir`.
fn refused(dir: &Path, args: &[&str], named: &[&str]) -> String {
    let before = listing(dir);
    let out = run(args, dir);
    let line = check_refusal(args, &out, named);
    assert_eq!(
        listing(dir),
        before,
        "broca {args:?}: files appeared in {}",
        dir.display()
    );
    line
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny random llama with SmolLM2's tokenizer, saved once per test binary as an HF
/// checkpoint: loads and runs in milliseconds, tokenizes like SmolLM2.
fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-tiny-llama");
        let mut cfg = Config::tiny(Arch::Llama);
        let tok = common::gguf_tokenizer(SMOLLM);
        cfg.vocab_size = tok.inner.get_vocab_size(true);
        let mut m = Model::random(cfg, DType::F32, 5).unwrap();
        m.tokenizer = Some(tok);
        m.save_hf(&p).unwrap();
        p
    })
}

/// A pid that belonged to a process that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Class 2: sequences shorter than a command needs are refused by the flag's name, before any
/// kernel sees them (an empty prompt, a zero sequence length, …), and a text with too few
/// tokens is refused by its file name.
#[test]
fn empty_sequences_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let en = fixture("udhr-en.txt");
    let en = s(&en);
    let out = d.join("out");
    let out = s(&out);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--prompt", ""], "--prompt"),
        (vec!["generate", "--prompt", "   "], "--prompt"),
        (
            vec!["generate", "--prompt", "Hi", "--max-tokens", "0"],
            "--max-tokens",
        ),
        (vec!["bench", "--seq-len", "0"], "--seq-len"),
        (vec!["bench", "--seq-len", "1"], "--seq-len"),
        (vec!["bench", "--reps", "0"], "--reps"),
        (vec!["ppl", "--text", en, "--seq-len", "0"], "--seq-len"),
        (vec!["ppl", "--text", en, "--seq-len", "1"], "--seq-len"),
        (vec!["ppl", "--text", en, "--stride", "0"], "--stride"),
        (
            vec!["ppl", "--text", en, "--max-tokens", "0"],
            "--max-tokens",
        ),
        (
            vec!["ppl", "--text", en, "--max-tokens", "1"],
            "--max-tokens",
        ),
        (
            vec!["score", "--text", en, "--out", out, "--tokens", "0"],
            "--tokens",
        ),
        (
            vec!["score", "--text", en, "--out", out, "--seq-len", "1"],
            "--seq-len",
        ),
        (
            vec!["score", "--text", en, "--out", out, "--batch", "0"],
            "--batch",
        ),
        (
            vec![
                "score",
                "--text",
                en,
                "--out",
                out,
                "--checkpoint-windows",
                "0",
            ],
            "--checkpoint-windows",
        ),
        (
            vec!["ablate", "--region", "a=b.safetensors", "--seq-len", "0"],
            "--seq-len",
        ),
        (
            vec!["ablate", "--region", "a=b.safetensors", "--max-tokens", "1"],
            "--max-tokens",
        ),
        (
            vec![
                "dims",
                "--norm",
                "input",
                "--layer",
                "0",
                "--op",
                "zero",
                "--screen-tokens",
                "1",
            ],
            "--screen-tokens",
        ),
        (
            vec![
                "dims",
                "--norm",
                "input",
                "--layer",
                "0",
                "--op",
                "zero",
                "--max-tokens",
                "0",
            ],
            "--max-tokens",
        ),
        (
            vec![
                "dims", "--norm", "input", "--layer", "0", "--op", "zero", "--batch", "0",
            ],
            "--batch",
        ),
        (
            vec![
                "dims",
                "structured",
                "--dim",
                "1",
                "--op",
                "zero",
                "--max-tokens",
                "1",
            ],
            "--max-tokens",
        ),
        (vec!["superweights", "--max-tokens", "1"], "--max-tokens"),
        (vec!["superweights", "--top", "0"], "--top"),
        (vec!["superweights", "--prompt", ""], "--prompt"),
        (
            vec!["train", "--data", en, "--out", out, "--steps", "0"],
            "--steps",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--seq-len",
                "1",
            ],
            "--seq-len",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--batch", "0",
            ],
            "--batch",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--grad-accum",
                "0",
            ],
            "--grad-accum",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--data-tokens",
                "1",
            ],
            "--data-tokens",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--eval-tokens",
                "0",
            ],
            "--eval-tokens",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--keep-checkpoints",
                "0",
            ],
            "--keep-checkpoints",
        ),
        (
            vec![
                "forget",
                "--train",
                en,
                "--freeze-region",
                "m.safetensors",
                "--out",
                out,
                "--steps",
                "0",
            ],
            "--steps",
        ),
        (vec!["region", "bench", "--numel", "0"], "--numel"),
    ];
    for (args, flag) in &cases {
        refused(d, args, &[flag]);
    }
    // the same limits hold for a study config's values
    for (key, edit) in [
        (
            "importance.seq_len",
            (|c| c.importance.seq_len = 0) as fn(&mut StudyConfig),
        ),
        ("eval.max_tokens", |c| c.eval.max_tokens = 1),
        ("generation.max_tokens", |c| c.generation.max_tokens = 0),
        ("generation.prompts[0]", |c| {
            c.generation.prompts[0] = String::new()
        }),
    ] {
        let mut c = StudyConfig::preset("quick").unwrap();
        edit(&mut c);
        let f = d.join("study.toml");
        std::fs::write(&f, c.to_toml().unwrap()).unwrap();
        refused(
            d,
            &["reproduce", "--config", s(&f), "--out", out],
            &[s(&f), key],
        );
        std::fs::remove_file(&f).unwrap();
    }
    // a text of one token: refused by its file name once the tokenizer has seen it
    let one = d.join("one.txt");
    std::fs::write(&one, "a").unwrap();
    let tiny = tiny_model();
    refused(
        d,
        &["ppl", "--model", s(tiny), "--text", s(&one)],
        &[s(&one), "fewer than 2 tokens"],
    );
    refused(
        d,
        &["score", "--model", s(tiny), "--text", s(&one), "--out", out],
        &[s(&one), "fewer than 2 tokens"],
    );
}

/// Class 7: every argument-parser error is one line `error: …` naming the flag, exit 1;
/// negative numbers reach the range checks; NaN and infinities are refused by name;
/// `--help` and `--version` keep their full text and exit 0.
#[test]
fn usage_errors_are_one_line_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let en = fixture("udhr-en.txt");
    let en = s(&en);
    let m = d.join("m.safetensors");
    let m = s(&m);
    let out = d.join("out");
    let out = s(&out);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "region",
                "core",
                "--scores",
                "a.safetensors",
                "--out",
                m,
                "--k",
                "abc",
            ],
            "--k",
        ),
        (
            vec![
                "region",
                "core",
                "--scores",
                "a.safetensors",
                "--out",
                m,
                "--k",
                "-0.1",
            ],
            "--k",
        ),
        (
            vec![
                "region",
                "core",
                "--scores",
                "a.safetensors",
                "--out",
                m,
                "--k",
                "0",
            ],
            "--k",
        ),
        (
            vec![
                "region",
                "core",
                "--scores",
                "a.safetensors",
                "--out",
                m,
                "--k",
                "1.5",
            ],
            "--k",
        ),
        (
            vec![
                "region",
                "core",
                "--scores",
                "a.safetensors",
                "--out",
                m,
                "--k",
                "nan",
            ],
            "--k",
        ),
        (
            vec![
                "region", "mono", "--target", "ar", "--scores", "a", "--out", m, "--k", "inf",
            ],
            "--k",
        ),
        (vec!["region", "bench", "--k", "-inf"], "--k"),
        (
            vec![
                "region", "random", "--like", "a", "--out", m, "--seed", "-1",
            ],
            "--seed",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--temperature", "nan"],
            "--temperature",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--temperature", "-1"],
            "--temperature",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--temperature", "inf"],
            "--temperature",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--top-p", "0"],
            "--top-p",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--top-p", "1.01"],
            "--top-p",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--top-p", "NaN"],
            "--top-p",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--max-tokens", "-3"],
            "--max-tokens",
        ),
        (
            vec!["generate", "--prompt", "Hi", "--max-tokens", "2.5"],
            "--max-tokens",
        ),
        (vec!["ppl", "--text", en, "--seq-len", "-1"], "--seq-len"),
        (vec!["ppl", "--text", en, "--stride", "x"], "--stride"),
        (vec!["ppl", "--text", en, "--bogus"], "--bogus"),
        (vec!["ppl", "--text", en, "--json", "extra"], "extra"),
        (
            vec![
                "score",
                "--text",
                en,
                "--out",
                out,
                "--checkpoint-secs",
                "nan",
            ],
            "--checkpoint-secs",
        ),
        (
            vec![
                "score",
                "--text",
                en,
                "--out",
                out,
                "--checkpoint-secs",
                "-5",
            ],
            "--checkpoint-secs",
        ),
        (vec!["score", "--text", en], "--out"),
        (
            vec![
                "score", "diff", "--base", "a", "--tuned", "b", "--out", m, "--eps", "-1",
            ],
            "--eps",
        ),
        (
            vec![
                "score", "diff", "--base", "a", "--tuned", "b", "--out", m, "--eps", "0",
            ],
            "--eps",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--lr", "-1e-3",
            ],
            "--lr",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--lr", "inf",
            ],
            "--lr",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--eps", "nan",
            ],
            "--eps",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--weight-decay",
                "-0.1",
            ],
            "--weight-decay",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--clip", "-1",
            ],
            "--clip",
        ),
        (
            vec![
                "train", "--data", en, "--out", out, "--steps", "1", "--betas", "0.9,nan",
            ],
            "--betas",
        ),
        (
            vec![
                "train",
                "--data",
                en,
                "--out",
                out,
                "--steps",
                "1",
                "--schedule",
                "sideways",
            ],
            "--schedule",
        ),
        (vec!["train", "--data", en, "--out", out], "--steps"),
        (
            vec!["perturb", "--region", m, "--op", "scale:nan", "--save", out],
            "--op",
        ),
        (
            vec!["perturb", "--region", m, "--op", "noise:-1", "--save", out],
            "--op",
        ),
        (
            vec!["ablate", "--region", "a=b", "--op", "scale:inf"],
            "--op",
        ),
        (
            vec![
                "dims",
                "--norm",
                "input",
                "--layer",
                "0",
                "--op",
                "noise:nan",
            ],
            "--op",
        ),
        (
            vec!["dims", "--norm", "input", "--layer", "-1", "--op", "zero"],
            "--layer",
        ),
        (
            vec!["dims", "structured", "--dim", "-4", "--op", "zero"],
            "--dim",
        ),
        (
            vec![
                "reproduce",
                "--preset",
                "quick",
                "--config",
                "x.toml",
                "--out",
                out,
            ],
            "--config",
        ),
        (vec!["nosuchcommand"], "nosuchcommand"),
        (vec![], "subcommand"),
    ];
    for (args, flag) in &cases {
        let line = refused(d, args, &[flag]);
        assert_eq!(line.lines().count(), 1);
    }
    // string flags whose values are checked after parsing name the flag too
    let tiny = tiny_model();
    let t = s(tiny);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["ppl", "--lang", "x"], "--lang"),
        (vec!["ppl", "--data", "x=", "--model", t], "--data"),
        (vec!["ablate", "--model", t, "--region", "x"], "--region"),
        (
            vec!["ablate", "--region", "a=b", "--controls", "sideways"],
            "--controls",
        ),
        (
            vec!["ablate", "--region", "a=b", "--eval", "nosuchdir"],
            "--eval",
        ),
        (
            vec![
                "dims", "--model", t, "--norm", "input", "--layer", "0", "--op", "zero", "--dims",
                "1,x",
            ],
            "--dims",
        ),
        (
            vec![
                "dims", "--model", t, "--norm", "input", "--layer", "9", "--op", "zero",
            ],
            "--layer 9",
        ),
        (
            vec![
                "dims",
                "structured",
                "--model",
                t,
                "--dim",
                "1",
                "--op",
                "zero",
                "--layers",
                "0-x",
            ],
            "--layers",
        ),
        (
            vec!["reproduce", "--preset", "sideways", "--out", out],
            "--preset",
        ),
        (
            vec!["train", "--data", "x=", "--steps", "1", "--out", out],
            "--data",
        ),
        (
            vec![
                "forget",
                "--train",
                "x=",
                "--freeze-region",
                m,
                "--steps",
                "1",
                "--out",
                out,
            ],
            "--train",
        ),
    ];
    for (args, flag) in &cases {
        refused(d, args, &[flag]);
    }
    // help and version: full text on stdout, exit 0
    for args in [
        vec!["--help"],
        vec!["ppl", "--help"],
        vec!["region", "core", "--help"],
    ] {
        let o = run(&args, d);
        let stdout = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o.stderr));
        assert!(
            stdout.contains("Usage:") && stdout.lines().count() > 5,
            "{args:?}: {stdout}"
        );
    }
    let o = run(&["--version"], d);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        text(&o.stdout).trim(),
        format!("broca {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Class 3: a closed stdout (`broca … | head -1`) ends quietly with exit 0 and no error line;
/// any other write error on stdout (a full disk) is one error line and exit 1.
#[test]
fn closed_stdout_is_quiet_and_a_full_stdout_is_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = tiny_model();
    let en = fixture("udhr-en.txt");
    let jobs: Vec<Vec<&str>> = vec![
        vec!["region", "bench", "--numel", "20000", "--k", "0.1"],
        vec![
            "region", "bench", "--numel", "20000", "--k", "0.1", "--json",
        ],
        vec![
            "ppl",
            "--model",
            s(tiny),
            "--text",
            s(&en),
            "--max-tokens",
            "64",
            "--seq-len",
            "32",
        ],
        vec![
            "ppl",
            "--model",
            s(tiny),
            "--text",
            s(&en),
            "--max-tokens",
            "64",
            "--json",
        ],
        vec![
            "generate",
            "--model",
            s(tiny),
            "--prompt",
            "Hello",
            "--max-tokens",
            "3",
        ],
    ];
    for args in &jobs {
        // the reader has gone before anything is written
        let mut child = cmd(args, d)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{args:?} with stdout closed: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("error:"), "{args:?}: {stderr}");

        // a full disk
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = cmd(args, d)
            .stdin(Stdio::null())
            .stdout(Stdio::from(full))
            .output()
            .unwrap();
        let stderr = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?} > /dev/full: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let last = stderr.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("error: stdout:"), "{args:?}: {stderr}");
        assert!(
            last.contains("No space left on device"),
            "{args:?}: {stderr}"
        );
    }
}

/// Class 9: each input is read once (a pipe works as a text), and a command that needs only N
/// tokens reads and tokenizes only a prefix, with the same result as the whole file gives.
#[test]
fn inputs_are_read_once_and_only_as_far_as_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = tiny_model();
    let en_path = fixture("udhr-en.txt");
    let en = std::fs::read(&en_path).unwrap();
    let ppl_json = |o: &Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", text(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };

    // --lang x=/dev/stdin, with and without a budget
    let pair = format!("x={}", s(&en_path));
    for budget in [None, Some("100")] {
        let mut args = vec![
            "ppl",
            "--model",
            s(tiny),
            "--lang",
            "x=/dev/stdin",
            "--json",
        ];
        let mut file_args = vec!["ppl", "--model", s(tiny), "--lang", &pair, "--json"];
        if let Some(b) = budget {
            args.extend(["--max-tokens", b]);
            file_args.extend(["--max-tokens", b]);
        }
        let mut child = cmd(&args, d)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let bytes = en.clone();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
        let o = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let from_pipe = ppl_json(&o);
        let from_file = ppl_json(&run(&file_args, d));
        assert_eq!(from_pipe["results"], from_file["results"], "{budget:?}");
    }

    // 50 MB through a pipe with --max-tokens 256: broca stops reading after a small prefix
    // (the writer sees the pipe close), and scores exactly what the file's start gives
    let mut child = cmd(
        &[
            "ppl",
            "--model",
            s(tiny),
            "--lang",
            "x=/dev/stdin",
            "--max-tokens",
            "256",
            "--json",
        ],
        d,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let chunk = en.clone();
    let writer = std::thread::spawn(move || {
        let mut written = 0usize;
        while written < 50 << 20 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    });
    let t0 = Instant::now();
    let o = child.wait_with_output().unwrap();
    let written = writer.join().unwrap();
    let big = ppl_json(&o);
    assert!(
        written < 4 << 20,
        "broca read {written} bytes of a 50 MB pipe for 256 tokens"
    );
    assert!(t0.elapsed() < Duration::from_secs(120));
    let small = ppl_json(&run(
        &[
            "ppl",
            "--model",
            s(tiny),
            "--text",
            s(&en_path),
            "--max-tokens",
            "256",
            "--json",
        ],
        d,
    ));
    assert_eq!(big["results"][0]["tokens"], 256);
    for k in ["tokens", "nll", "bits_per_byte"] {
        assert_eq!(big["results"][0][k], small["results"][0][k], "{k}");
    }
}

/// The prefix tokenization behind class 9 equals the whole text's tokens, for both
/// tokenizers, every UDHR and Bible text, texts without line breaks and texts without spaces.
#[test]
fn token_prefixes_equal_the_whole_encoding() {
    let toks = [
        common::gguf_tokenizer(SMOLLM),
        common::gguf_tokenizer(common::QWEN),
    ];
    let mut texts: Vec<(String, String)> = Vec::new();
    for sub in ["udhr", "bible"] {
        let dir = common::assets().join(sub);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no texts", dir.display());
        for p in files {
            let t = common::read(&p);
            // the Bible texts are long: their first 60 KB stand for "the whole text"
            let mut end = t.len().min(60_000);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            texts.push((format!("{sub}/{}", p.display()), t[..end].to_string()));
        }
    }
    let en = common::read(&fixture("udhr-en.txt"));
    texts.push(("one line".into(), en.replace('\n', " ")));
    texts.push(("tabs".into(), en.replace('\n', "\t").replace(' ', "  ")));
    let zh = common::read(&fixture("udhr-zh.txt"));
    texts.push(("no spaces".into(), zh.replace(['\n', ' '], "")));
    texts.push(("crlf".into(), en.replace('\n', "\r\n")));
    for tok in &toks {
        for (name, t) in &texts {
            let whole = tok.encode(t).unwrap();
            for n in [2usize, 7, 100, 513, 2000, 5000] {
                let first = tok.encode_first(t, n, true).unwrap().unwrap();
                let want = &whole[..n.min(whole.len())];
                assert_eq!(first, want, "{name}: first {n} tokens differ");
                // an incomplete text: a prefix of it, when it says it knows, agrees too
                let mut cut = (t.len() * 2 / 3).max(1);
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                if let Some(part) = tok.encode_first(&t[..cut], n, false).unwrap() {
                    assert_eq!(
                        part, want,
                        "{name}: first {n} tokens of a partial read differ"
                    );
                }
            }
        }
    }
}

/// Class 5: a second run on a locked output fails at once (exit 1, `…: in use by broca pid N`),
/// a stale lock (its process gone) is taken over, and no lock file remains after any exit.
#[test]
fn locked_outputs_are_refused_at_once_and_no_lock_remains() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = tiny_model();
    let en = fixture("udhr-en.txt");
    let ar = fixture("udhr-ar.txt");
    let me = std::process::id().to_string();
    let pid_msg = format!("in use by broca pid {me}");

    // folders: train, forget, reproduce, perturb --save, region stats
    let out = d.join("run");
    let mask = d.join("mask.safetensors");
    {
        let m = Model::load(tiny).unwrap();
        let mut mk = broca::mask::Mask::new();
        let p = &m.params[1];
        let ones = vec![1u8; p.shape.iter().product()];
        let t = broca::mask::MaskTensor::from_bits(&p.name, &p.shape, &ones).unwrap();
        mk.insert(p.name.clone(), t);
        broca::mask::save(&mask, &mk, serde_json::json!({})).unwrap();
    }
    let held = broca::lock::Lock::dir(&out).unwrap();
    let t = s(&out);
    let pair = format!("en={}", s(&en));
    for args in [
        vec![
            "train",
            "--model",
            s(tiny),
            "--data",
            &pair,
            "--steps",
            "1",
            "--seq-len",
            "16",
            "--out",
            t,
        ],
        vec![
            "forget",
            "--model",
            s(tiny),
            "--train",
            &pair,
            "--eval",
            &pair,
            "--freeze-region",
            s(&mask),
            "--steps",
            "1",
            "--out",
            t,
        ],
        vec!["reproduce", "--preset", "quick", "--out", t],
        vec![
            "perturb",
            "--model",
            s(tiny),
            "--region",
            s(&mask),
            "--op",
            "zero",
            "--save",
            t,
        ],
        vec!["region", "stats", s(&mask), "--out", t],
    ] {
        let t0 = Instant::now();
        refused(d, &args, &[t, &pid_msg]);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{args:?} did not fail at once"
        );
    }
    drop(held);
    assert!(!out.exists(), "the lock's folder outlived it");

    // files: region masks and score diff
    let mask2 = d.join("m2.safetensors");
    let held = broca::lock::Lock::file(&mask2).unwrap();
    refused(
        d,
        &["region", "random", "--like", s(&mask), "--out", s(&mask2)],
        &[s(&mask2), &pid_msg],
    );
    refused(
        d,
        &[
            "region",
            "ops",
            "union",
            s(&mask),
            s(&mask),
            "--out",
            s(&mask2),
        ],
        &[s(&mask2), &pid_msg],
    );
    refused(
        d,
        &[
            "score",
            "diff",
            "--base",
            s(tiny),
            "--tuned",
            s(tiny),
            "--out",
            s(&mask2),
        ],
        &[s(&mask2), &pid_msg],
    );
    drop(held);

    // score: the unit is (language, shard); other languages and shards of the folder go on
    let sc = d.join("scores");
    let held = broca::lock::Lock::part(&sc.join(".partial"), "ar", &sc).unwrap();
    let common_args = |lang: &str, file: &Path| -> Vec<String> {
        [
            "score",
            "--model",
            s(tiny),
            "--lang",
            &format!("{lang}={}", s(file)),
            "--tokens",
            "64",
            "--seq-len",
            "32",
            "--out",
            s(&sc),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let v = common_args("ar", &ar);
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    refused(d, &args, &[s(&sc), "ar", &pid_msg]);
    let v = common_args("en", &en);
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    let o = run(&args, d);
    assert!(o.status.success(), "another language: {}", text(&o.stderr));
    let v2 = common_args("ar", &ar);
    let mut shard: Vec<&str> = v2.iter().map(String::as_str).collect();
    shard.extend(["--shard", "1/2"]);
    let o = run(&shard, d);
    assert!(o.status.success(), "another shard: {}", text(&o.stderr));
    drop(held);

    // a stale lock (written by a process that is gone, no lock held) is taken over and removed
    let dead = dead_pid();
    std::fs::write(sc.join(".partial/.ar.broca.lock"), format!("{dead}\n")).unwrap();
    std::fs::write(d.join(".m2.safetensors.broca.lock"), format!("{dead}\n")).unwrap();
    let v = common_args("ar", &ar);
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    let o = run(&args, d);
    assert!(o.status.success(), "stale lock: {}", text(&o.stderr));
    let o = run(
        &["region", "random", "--like", s(&mask), "--out", s(&mask2)],
        d,
    );
    assert!(o.status.success(), "stale lock: {}", text(&o.stderr));
    let locks: Vec<PathBuf> = listing(d)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(locks.is_empty(), "lock files left: {locks:?}");
}

/// Class 4: what a killed run leaves (temporary files and checkpoint folders, a half-pruned
/// checkpoint) is removed by the next run once its process is gone; Ctrl-C and SIGTERM leave
/// no lock or temporary name at all.
#[test]
fn leftovers_of_killed_runs_are_swept() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = tiny_model();
    let en = fixture("udhr-en.txt");
    let out = d.join("train");
    let pair = format!("en={}", s(&en));
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(tiny),
            "--data",
            &pair,
            "--steps",
            "4",
            "--seq-len",
            "16",
            "--data-tokens",
            "200",
            "--warmup",
            "0",
            "--checkpoint-every",
            "1",
            "--out",
            s(&out),
        ];
        args.extend(extra);
        let o = run(&args, d);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    };
    train(&["--stop-after", "2"]);
    let ck = out.join("checkpoints");
    assert!(ck.join("step-2").is_dir());
    let dead = dead_pid();
    // a killed save, a killed prune (old and new names), a killed file write; and a live one
    let planted = [
        ck.join(format!(".step-3.broca-{dead}.tmp")),
        ck.join(format!(".step-1.tmp-{dead}")),
        ck.join(format!(".step-0.{dead}.tmp")),
    ];
    for p in &planted {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("model.safetensors"), b"half").unwrap();
    }
    let tmp_file = out.join(format!(".eval.csv.{dead}.tmp"));
    std::fs::write(&tmp_file, b"half").unwrap();
    let alive = out.join(format!(
        ".keep.safetensors.broca-{}.tmp",
        std::process::id()
    ));
    std::fs::write(&alive, b"a live process's").unwrap();
    // not a name of ours: never touched
    let foreign = out.join(format!(".notes.{dead}.tmp"));
    std::fs::write(&foreign, b"someone else's").unwrap();
    train(&["--resume"]);
    for p in planted.iter().chain([&tmp_file]) {
        assert!(!p.exists(), "{} survived the next run", p.display());
    }
    assert!(
        alive.exists(),
        "a live process's temporary file was removed"
    );
    assert!(foreign.exists(), "another tool's file was removed");
    std::fs::remove_file(&alive).unwrap();
    std::fs::remove_file(&foreign).unwrap();
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    // step 3 was written by the resumed run, step 2 pruned by rename-then-delete (the final
    // step writes the model, not a checkpoint)
    assert_eq!(names, vec!["step-3"], "only the newest checkpoint stays");
    let left: Vec<PathBuf> = listing(&out)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.ends_with(".tmp") || n.contains(".tmp-") || n.ends_with(".lock")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // SIGTERM and SIGINT in the middle of a run: nothing of ours remains
    let sc = d.join("scores");
    let bible = asset("bible/en.txt");
    for sig in ["TERM", "INT"] {
        let mut child = cmd(
            &[
                "score",
                "--model",
                s(tiny),
                "--text",
                s(&bible),
                "--seq-len",
                "32",
                "--checkpoint-windows",
                "1",
                "--out",
                s(&sc),
            ],
            d,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let lock = sc.join(".partial/.en.broca.lock");
        let state = sc.join(".partial/en.state.safetensors");
        let t0 = Instant::now();
        while !(lock.exists() && state.exists()) {
            assert!(child.try_wait().unwrap().is_none(), "score ended early");
            assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        assert!(!status.success(), "{sig}: exited 0");
        let left: Vec<PathBuf> = listing(&sc)
            .into_iter()
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                n.ends_with(".lock") || n.ends_with(".tmp")
            })
            .collect();
        assert!(left.is_empty(), "{sig}: left {left:?}");
    }
}

/// `tiny_model()`'s shapes with every layer matrix scaled by 1e30: finite weights whose
/// attention scores overflow f32 in layer 0, so every result is NaN.
fn huge_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-huge-llama");
        let tok = common::gguf_tokenizer(SMOLLM);
        let mut cfg = Config::tiny(Arch::Llama);
        cfg.vocab_size = tok.inner.get_vocab_size(true);
        let m = Model::random(cfg.clone(), DType::F32, 5).unwrap();
        let w = m
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let v = m.values(i).unwrap();
                let layer_matrix = p.name.starts_with("model.layers.") && p.shape.len() == 2;
                let v = if layer_matrix { (v * 1e30).unwrap() } else { v };
                (p.name.clone(), v)
            })
            .collect();
        let mut h = Model::from_weights(cfg, w).unwrap();
        h.tokenizer = Some(tok);
        h.save_hf(&p).unwrap();
        p
    })
}

/// Files (not folders) below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    listing(dir).into_iter().filter(|p| p.is_file()).collect()
}

/// Non-finite results: a command whose result is non-finite exits 1 naming the text, the token and
/// window, and the first step of the forward that went non-finite (with the model); a
/// perturbation that overflows a weight is not saved; an overflowed score sum names its
/// tensor.
#[test]
fn non_finite_results_exit_1_naming_the_first_place() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let huge = s(huge_model());
    let tiny = s(tiny_model());
    let en = d.join("en.txt");
    std::fs::write(
        &en,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let en = s(&en);
    let pair = format!("en={en}");
    let first = format!("the output of layer 0 of {huge}");
    let nll = "non-finite NLL (NaN) at token 1 (window 0: tokens 0..16)";
    let mask = d.join("mask.safetensors");
    let o = run(
        &[
            "region",
            "random",
            "--model",
            tiny,
            "--k",
            "0.05",
            "--out",
            s(&mask),
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mask_pair = format!("m={}", s(&mask));
    let sixteen = ["--max-tokens", "40", "--seq-len", "16"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            [&["ppl", "--model", huge, "--text", en][..], &sixteen].concat(),
            vec!["error: ppl: ", en, nll, &first],
        ),
        (
            vec![
                "generate",
                "--model",
                huge,
                "--prompt",
                "Hello",
                "--max-tokens",
                "2",
            ],
            vec![
                "error: generate: non-finite logit (NaN)",
                "of new token 0 (position 1)",
                &first,
            ],
        ),
        (
            [
                &[
                    "ablate", "--model", huge, "--region", &mask_pair, "--eval", &pair,
                ][..],
                &sixteen,
            ]
            .concat(),
            vec!["error: ablate: condition base: text en: ", nll, &first],
        ),
        (
            vec![
                "dims",
                "--model",
                huge,
                "--norm",
                "input",
                "--layer",
                "0",
                "--op",
                "zero",
                "--dims",
                "0-1",
                "--eval",
                &pair,
                "--max-tokens",
                "16",
                "--screen-tokens",
                "16",
                "--confirm-top",
                "1",
            ],
            vec!["error: dims: unperturbed model: text en: ", nll, &first],
        ),
        (
            vec![
                "dims",
                "structured",
                "--model",
                huge,
                "--dim",
                "0",
                "--op",
                "zero",
                "--eval",
                &pair,
                "--max-tokens",
                "16",
            ],
            vec![
                "error: dims structured: condition base: text en: ",
                nll,
                &first,
            ],
        ),
        (
            vec![
                "superweights",
                "--model",
                huge,
                "--eval",
                en,
                "--max-tokens",
                "16",
                "--top",
                "1",
            ],
            vec!["error: superweights: ", en, nll, &first],
        ),
        // a perturbed norm entry of 1e30 overflows the attention of layer 0
        (
            vec![
                "dims",
                "--model",
                tiny,
                "--norm",
                "input",
                "--layer",
                "0",
                "--op",
                "scale:1e30",
                "--dims",
                "0-1",
                "--eval",
                &pair,
                "--max-tokens",
                "16",
                "--screen-tokens",
                "16",
                "--confirm-top",
                "1",
            ],
            vec![
                "error: dims: dimension ",
                "of model.layers.0.input_layernorm.weight",
                "non-finite result",
            ],
        ),
    ];
    for (args, named) in &cases {
        refused(d, args, named);
    }
    // score: nothing is left but the (empty) output folder
    let out = d.join("scores");
    let args = [
        "score",
        "--model",
        huge,
        "--lang",
        &pair,
        "--tokens",
        "32",
        "--seq-len",
        "16",
        "--out",
        s(&out),
    ];
    let o = run(&args, d);
    check_refusal(&args, &o, &["error: score: ", en, nll, &first]);
    assert_eq!(files_below(&out), Vec::<PathBuf>::new());
    // a perturbation that overflows f32 is refused by tensor and not saved
    let save = d.join("perturbed");
    let args = [
        "perturb",
        "--model",
        tiny,
        "--region",
        s(&mask),
        "--op",
        "scale:1e45",
        "--save",
        s(&save),
    ];
    let o = run(&args, d);
    check_refusal(
        &args,
        &o,
        &["model.safetensors", "non-finite value (", "not saved"],
    );
    assert_eq!(files_below(&save), Vec::<PathBuf>::new());
    // an overflowed gradient sum names its tensor
    let m = Model::load(tiny_model()).unwrap();
    let i = 1;
    let sums = vec![f64::MAX; m.params[i].elem_count()];
    let e = broca::score::accumulate::times_param(&m, i, &sums).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.starts_with(&format!("{}: non-finite score", m.params[i].name)),
        "{e}"
    );
}

/// Class 8: a tokenizer whose ids exceed the model's vocabulary is refused naming the
/// tokenizer file and the model (dense and mapped weights; ppl, generate and score, which
/// creates nothing), and a model folder without tokenizer.json names the folder and the file.
#[test]
fn a_foreign_tokenizer_and_a_missing_one_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // SmolLM2's tokenizer on a model of 37 rows
    let small = d.join("small-vocab");
    let mut m = Model::random(Config::tiny(Arch::Llama), DType::F32, 3).unwrap();
    m.tokenizer = Some(common::gguf_tokenizer(SMOLLM));
    m.save_hf(&small).unwrap();
    let tok = small.join("tokenizer.json");
    let en = fixture("udhr-en.txt");
    let (en, small_s) = (s(&en), s(&small));
    let pair = format!("en={en}");
    let out = d.join("scores");
    let named = [
        s(&tok),
        "is outside the vocabulary of",
        small_s,
        "(37 rows in model.embed_tokens.weight): the tokenizer does not belong to this model",
    ];
    for weights in ["dense", "mapped"] {
        let runs: [&[&str]; 3] = [
            &[
                "ppl",
                "--model",
                small_s,
                "--text",
                en,
                "--max-tokens",
                "40",
            ],
            &[
                "generate",
                "--model",
                small_s,
                "--prompt",
                "Hello world",
                "--max-tokens",
                "2",
            ],
            &[
                "score",
                "--model",
                small_s,
                "--lang",
                &pair,
                "--tokens",
                "32",
                "--seq-len",
                "16",
                "--out",
                s(&out),
            ],
        ];
        for args in runs {
            let o = cmd(args, d)
                .env("BROCA_WEIGHTS", weights)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            check_refusal(args, &o, &named);
        }
        assert_eq!(files_below(&out), Vec::<PathBuf>::new(), "{weights}");
    }
    // a model folder without tokenizer.json
    let bare = d.join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_model().join(f), bare.join(f)).unwrap();
    }
    refused(
        d,
        &["ppl", "--model", s(&bare), "--text", en],
        &[&format!(
            "error: {}: no tokenizer.json in this model folder",
            s(&bare)
        )],
    );
}

/// Class 11: a corrupt earlier result under `score --out DIR` (the result, a shard's result,
/// the resume state, a multi-pass run's `.result.part` or `.passes.json`) is said on stderr in
/// one line and computed again, giving the clean run's bytes; `score merge` names the job
/// that recomputes an unreadable shard. A truncated mask given as input is one error line
/// naming it.
#[test]
fn corrupt_earlier_results_are_recomputed_or_named() {
    use broca::score::plan::{self, Include};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = s(tiny_model());
    let en = fixture("udhr-en.txt");
    let pair = format!("en={}", s(&en));
    // the smallest limit of a one-layer pass at the bottom: several passes
    let model = Model::load(tiny_model()).unwrap();
    let limit = plan::plan(&model, Include::Layers, Some((0, 0)), 1, 16, u64::MAX)
        .unwrap()
        .plan
        .peak()
        .to_string();
    let split = plan::plan(&model, Include::Layers, None, 1, 16, limit.parse().unwrap()).unwrap();
    assert!(split.groups.len() > 1, "{:?}", split.groups);
    let score = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "score",
            "--model",
            tiny,
            "--lang",
            &pair,
            "--tokens",
            "64",
            "--seq-len",
            "16",
            "--checkpoint-windows",
            "1",
            "--out",
            s(out),
        ];
        args.extend(extra);
        run(&args, d)
    };
    let ok = |o: &Output| {
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let result = |out: &Path| read(out.join("en.safetensors"));
    let clean = d.join("clean");
    ok(&score(&clean, &[]));
    let clean = result(&clean);
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();

    // the result itself, truncated or garbage
    for (k, bad) in [&clean[..100], &garbage[..]].into_iter().enumerate() {
        let out = d.join(format!("result-{k}"));
        ok(&score(&out, &[]));
        let f = out.join("en.safetensors");
        std::fs::write(&f, bad).unwrap();
        let err = ok(&score(&out, &[]));
        let line = format!("score: {}: not a valid safetensors file", s(&f));
        assert!(
            err.contains(&line) && err.contains("; computing it again"),
            "{err}"
        );
        assert_eq!(result(&out), clean);
    }
    // the resume state of a run stopped after two windows
    let out = d.join("state");
    let o = score(&out, &["--stop-after-windows", "2"]);
    assert!(
        text(&o.stderr).contains("stopped after"),
        "{}",
        text(&o.stderr)
    );
    let state = out.join(".partial/en.state.safetensors");
    std::fs::write(&state, &garbage).unwrap();
    let err = ok(&score(&out, &[]));
    assert!(
        err.contains(&format!("score: {}: not a valid", s(&state))),
        "{err}"
    );
    assert!(err.contains("; starting this part over"), "{err}");
    assert_eq!(result(&out), clean);

    // a multi-pass run stopped in its second pass: its result part and pass record
    let mp = ["--mem-limit", &limit];
    let reference = d.join("passes");
    ok(&score(&reference, &mp));
    let reference = result(&reference);
    let stopped = |name: &str| {
        let out = d.join(name);
        let mut extra = mp.to_vec();
        extra.extend(["--stop-after-windows", "5"]);
        let o = score(&out, &extra);
        assert!(
            text(&o.stderr).contains("stopped after"),
            "{}",
            text(&o.stderr)
        );
        assert!(out.join(".partial/en.passes.json").is_file());
        out
    };
    let out = stopped("part");
    let part = out.join(".partial/en.result.part");
    let bytes = read(part.clone());
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    let err = ok(&score(&out, &mp));
    let line = format!("score: {}: unusable", s(&part));
    assert!(
        err.contains(&line) && err.contains("computing every pass again"),
        "{err}"
    );
    assert_eq!(result(&out), reference);
    let out = stopped("record");
    let record = out.join(".partial/en.passes.json");
    std::fs::write(&record, b"{\"header_sha\": 7").unwrap();
    let err = ok(&score(&out, &mp));
    let line = format!("score: {}: unreadable pass record", s(&record));
    assert!(err.contains(&line), "{err}");
    assert_eq!(result(&out), reference);

    // score merge with an unreadable shard: the job that recomputes it
    let out = d.join("shards");
    for sh in ["0/2", "1/2"] {
        ok(&score(&out, &["--shard", sh]));
    }
    let shard = out.join(".partial/en.shard-1-of-2.safetensors");
    std::fs::write(&shard, &garbage[..64]).unwrap();
    let args = ["score", "merge", "--out", s(&out)];
    let o = run(&args, d);
    let fix = format!(
        "recompute it with `broca score --lang en=TEXT --shard 1/2 --out {}` (the job's other arguments as before), then rerun `broca score merge --out {}`",
        s(&out),
        s(&out)
    );
    check_refusal(&args, &o, &[s(&shard), &fix]);

    // a truncated mask as input
    let mask = d.join("mask.safetensors");
    ok(&run(
        &[
            "region",
            "random",
            "--model",
            tiny,
            "--k",
            "0.05",
            "--out",
            s(&mask),
        ],
        d,
    ));
    let m = read(mask.clone());
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &m[..m.len() / 2]).unwrap();
    let cut_s = s(&cut);
    let region = format!("r={cut_s}");
    let perturb = format!("{cut_s}:zero");
    let (train_out, stats_out, save) = (d.join("t"), d.join("st"), d.join("p"));
    let runs: [&[&str]; 6] = [
        &[
            "ablate", "--model", tiny, "--region", &region, "--eval", &pair,
        ],
        &[
            "generate",
            "--model",
            tiny,
            "--prompt",
            "Hi",
            "--perturb",
            &perturb,
        ],
        &[
            "perturb",
            "--model",
            tiny,
            "--region",
            cut_s,
            "--op",
            "zero",
            "--save",
            s(&save),
        ],
        &[
            "train",
            "--model",
            tiny,
            "--data",
            &pair,
            "--steps",
            "1",
            "--freeze",
            cut_s,
            "--out",
            s(&train_out),
        ],
        &["region", "stats", cut_s, "--out", s(&stats_out)],
        &["region", "compare", s(&mask), cut_s],
    ];
    for args in runs {
        let o = run(args, d);
        check_refusal(args, &o, &[cut_s]);
    }
}
