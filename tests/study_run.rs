//! `broca reproduce` on a tiny config (SmolLM2, tiny budgets): a run finishes with every
//! output; a rerun does no stage work; changing one k recomputes only the region stage and
//! those after it that depend on it; a run interrupted inside and between stages resumes to
//! byte-identical outputs; the report has every section, is well-formed HTML and loads in
//! headless Chromium without console errors (with a negative control).

use broca::study::{self, cache, config::StudyConfig, html::SECTIONS, Options, Summary};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// Heavy tests run one at a time (each loads SmolLM2).
static HEAVY: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_assets() {
    let a = broca::data::assets_dir();
    for f in [
        "smollm2-135m-instruct-q4_1.gguf",
        "bible/en.txt",
        "bible/fr.txt",
        "udhr/en.txt",
        "udhr/fr.txt",
        "udhr/zh.txt",
    ] {
        assert!(
            a.join(f).exists(),
            "{}: missing asset (run scripts/fetch-assets)",
            a.join(f).display()
        );
    }
}

/// The tiny study: 2 importance languages × 64 tokens at seq 32, 3 eval languages × 32
/// tokens, k = 1%, a scan of 6 dims of layer 0, 4 generated tokens.
fn tiny() -> StudyConfig {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut c = StudyConfig::preset("quick").unwrap();
    c.importance.languages = v(&["en", "fr"]);
    c.importance.tokens = 64;
    c.importance.seq_len = 32;
    c.eval.languages = v(&["en", "fr", "zh"]);
    c.eval.max_tokens = 32;
    c.eval.seq_len = 32;
    c.regions.k = vec![0.01];
    c.regions.mono_k = 0.01;
    c.regions.ops = v(&["zero"]);
    c.regions.controls = v(&["random", "bottom", "top"]);
    c.dims.layers = vec![0];
    c.dims.dims = vec![0, 1, 2, 3, 4, 5];
    c.dims.languages = v(&["en", "zh"]);
    c.dims.screen_tokens = 16;
    c.dims.confirm_top = 3;
    c.dims.max_tokens = 32;
    c.structured.top_dims = 1;
    c.generation.prompts = v(&["The capital of France is"]);
    c.generation.max_tokens = 4;
    c.superweights.top = 2;
    c.superweights.eval_tokens = 32;
    c
}

fn fresh_dir(name: &str) -> PathBuf {
    // under target/ (cargo's per-package scratch folder), cleared at the start of each run
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("broca-study-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The uninterrupted tiny run, shared by the tests (run once per test binary).
fn fixture() -> &'static (PathBuf, Summary) {
    static F: OnceLock<(PathBuf, Summary)> = OnceLock::new();
    F.get_or_init(|| {
        check_assets();
        let _g = lock();
        let dir = fresh_dir("fixture");
        let s = study::run(&tiny(), &dir, &Options::default()).expect("tiny study");
        (dir, s)
    })
}

/// Every file under `dir` (relative path → (bytes, mtime)), skipping `skip` names.
fn files(dir: &Path, skip: &[&str]) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    fn walk(
        base: &Path,
        d: &Path,
        skip: &[&str],
        out: &mut BTreeMap<String, (Vec<u8>, SystemTime)>,
    ) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
            if skip
                .iter()
                .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
            {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, skip, out);
            } else {
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.insert(rel, (std::fs::read(&p).unwrap(), m));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

const STAGES: [&str; 9] = [
    "baseline",
    "importance",
    "regions",
    "ablation",
    "concentration",
    "dims",
    "structured",
    "generation",
    "superweights",
];

#[test]
fn tiny_run_finishes_and_rerun_does_no_stage_work() {
    let (dir, s) = fixture();
    assert_eq!(
        s.executed,
        STAGES.to_vec(),
        "first run executes every stage but forgetting"
    );
    for f in [
        "study.toml",
        "baseline.json",
        "baseline.csv",
        "scores/en.safetensors",
        "scores/fr.safetensors",
        "regions/core-k0.01.safetensors",
        "regions/mono-en.safetensors",
        "regions/mono-fr.safetensors",
        "regions/summary.json",
        "ablation.json",
        "ablation.csv",
        "concentration/stats.json",
        "concentration/overview.png",
        "dims/L0/dims.json",
        "dims/L0/dims.png",
        "structured.json",
        "generation.json",
        "superweights.json",
        "superweights.csv",
        "report.html",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert!(
        !dir.join("scores/.partial").exists(),
        "no resume state left beside the results"
    );
    // ablation JSON in the `ablate --json` shape
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ablation.json")).unwrap()).unwrap();
    let conds: Vec<&str> = a["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["condition"].as_str().unwrap())
        .collect();
    assert_eq!(
        conds,
        [
            "base",
            "core-k0.01",
            "random(core-k0.01)",
            "bottom(core-k0.01)",
            "top(core-k0.01)"
        ]
    );
    assert_eq!(a["languages"], serde_json::json!(["en", "fr", "zh"]));
    for c in a["conditions"].as_array().unwrap() {
        let r = c["results"].as_array().unwrap();
        assert_eq!(r.len(), 3);
        let g = (r
            .iter()
            .map(|x| x["ppl"].as_f64().unwrap().ln())
            .sum::<f64>()
            / 3.0)
            .exp();
        assert!((c["geomean_ppl"].as_f64().unwrap() / g - 1.0).abs() < 1e-9);
    }
    // region size: floor(1% · numel) per tensor
    let sum: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("regions/summary.json")).unwrap()).unwrap();
    let count = sum["core"][0]["count"].as_u64().unwrap();
    let numel = sum["core"][0]["numel"].as_u64().unwrap();
    assert!(
        count > 0 && count <= numel / 100 && count > numel / 100 - 300,
        "{count} of {numel}"
    );
    let dims: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("dims/L0/dims.json")).unwrap()).unwrap();
    assert_eq!(dims["dims"].as_array().unwrap().len(), 6);

    let _g = lock();
    let before = files(dir, &["report.html", "run.json"]);
    let t = std::time::Instant::now();
    let s2 = study::run(&tiny(), dir, &Options::default()).unwrap();
    assert!(s2.executed.is_empty(), "rerun executed {:?}", s2.executed);
    assert_eq!(s2.skipped, STAGES.to_vec());
    assert!(
        t.elapsed().as_secs_f64() < 60.0,
        "rerun took {:?}",
        t.elapsed()
    );
    let after = files(dir, &["report.html", "run.json"]);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert!(after[k] == *v, "{k} was rewritten by a rerun");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let t = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

#[test]
fn changing_one_k_recomputes_only_regions_and_later_dependents() {
    let (dir, _) = fixture();
    let _g = lock();
    let d = fresh_dir("k");
    copy_dir(dir, &d);
    let mut c = tiny();
    c.regions.k = vec![0.02];
    let s = study::run(&c, &d, &Options::default()).unwrap();
    assert_eq!(
        s.executed,
        ["regions", "ablation", "concentration", "generation"]
    );
    assert!(d.join("regions/core-k0.02.safetensors").exists());
    assert!(
        !d.join("regions/core-k0.01.safetensors").exists(),
        "stale region of the old k removed"
    );
    let a = std::fs::read_to_string(d.join("ablation.json")).unwrap();
    assert!(a.contains("core-k0.02") && !a.contains("core-k0.01"));
    for st in [
        "baseline",
        "importance",
        "dims",
        "structured",
        "superweights",
    ] {
        let a = cache::record(dir, st).unwrap();
        let b = cache::record(&d, st).unwrap();
        assert_eq!(
            (a.hash, a.finished_at),
            (b.hash, b.finished_at),
            "{st} must not rerun"
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn interrupted_run_resumes_to_the_same_outputs() {
    let (dir, _) = fixture();
    let _g = lock();
    let d = fresh_dir("interrupt");
    // killed inside importance, after the first window of the first language (checkpointed)
    let inside = Options {
        importance_stop_after_windows: Some(1),
        ..Options::default()
    };
    let e = study::run(&tiny(), &d, &inside).unwrap_err();
    assert!(
        format!("{e:#}").contains("stopped after 1 windows"),
        "{e:#}"
    );
    assert!(
        d.join("scores/.partial/en.state.safetensors").exists(),
        "resume state kept"
    );
    assert!(cache::record(&d, "importance").is_none());
    assert!(cache::record(&d, "baseline").is_some());
    // killed between stages, right after ablation
    let between = Options {
        stop_after_stage: Some("ablation".into()),
        ..Options::default()
    };
    let e = study::run(&tiny(), &d, &between).unwrap_err();
    assert!(format!("{e:#}").contains("stopped after stage ablation"));
    let s = study::run(&tiny(), &d, &Options::default()).unwrap();
    assert_eq!(
        s.executed,
        [
            "concentration",
            "dims",
            "structured",
            "generation",
            "superweights"
        ]
    );
    let skip = ["report.html", "run.json", "stages"];
    let (a, b) = (files(dir, &skip), files(&d, &skip));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let same = if k.ends_with(".safetensors") {
            same_safetensors(&v.0, &b[k].0)
        } else {
            v.0 == b[k].0
        };
        assert!(
            same,
            "{k} differs between the interrupted and the uninterrupted run"
        );
    }
    for st in STAGES {
        assert_eq!(
            cache::record(dir, st).unwrap().hash,
            cache::record(&d, st).unwrap().hash
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Two safetensors files hold the same tensors, bytes and metadata: equal headers as JSON
/// (the metadata map's key order is not fixed) and byte-equal data.
fn same_safetensors(a: &[u8], b: &[u8]) -> bool {
    let split = |x: &[u8]| {
        let n = u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        (
            serde_json::from_slice::<serde_json::Value>(&x[8..8 + n]).unwrap(),
            x[8 + n..].to_vec(),
        )
    };
    split(a) == split(b)
}

const VOID: [&str; 6] = ["meta", "img", "br", "hr", "input", "link"];

/// Checks that every tag is closed in order (void elements and `/>` excepted); returns the
/// problem found, if any.
fn tag_balance(html: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').ok_or("unclosed '<'")?;
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        if name.is_empty() {
            return Err(format!("bad tag <{tag}>"));
        }
        if tag.starts_with('/') {
            match stack.pop() {
                Some(open) if open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !(tag.ends_with('/') || VOID.contains(&name.as_str())) {
            stack.push(name);
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed {stack:?}"))
    }
}

#[test]
fn tag_balance_check_detects_errors() {
    assert!(tag_balance("<html><body><p>x</p><img src=a><svg><rect/></svg></body></html>").is_ok());
    assert!(tag_balance("<html><body><p>x</body></html>").is_err());
    assert!(tag_balance("<html><body>").is_err());
    assert!(tag_balance("<html></body>").is_err());
}

#[test]
fn report_has_every_section_and_is_well_formed() {
    let (dir, _) = fixture();
    let h = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(h.starts_with("<!DOCTYPE html>"));
    tag_balance(&h).unwrap();
    for s in &SECTIONS[..6] {
        assert_eq!(
            h.matches(&format!("<h2>{s}</h2>")).count(),
            1,
            "section {s}"
        );
    }
    assert!(!h.contains("<h2>Forgetting</h2>"), "forgetting did not run");
    assert!(
        !h.contains("has not run"),
        "every stage's data is in the report"
    );
    assert!(!h.contains("<script"), "no scripts");
    for bad in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!h.contains(bad), "network reference {bad}");
    }
    assert!(h.contains("data:image/png;base64,"), "inline heatmaps");
    assert!(h.matches("<svg").count() >= 2, "inline charts");
    assert!(h.contains("core-k0.01") && h.contains("random(core-k0.01)"));
}

/// Opens `page` in headless Chromium: (dumped DOM, console lines on stderr).
fn chromium(page: &Path) -> (String, Vec<String>) {
    let bin = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let bin = bin.expect("chromium is not installed (scripts/test installs it)");
    let profile = fresh_dir(&format!(
        "chromium-{}",
        page.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    let err = String::from_utf8_lossy(&out.stderr);
    let console = err
        .lines()
        .filter(|l| l.contains("CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&out.stdout).to_string(), console)
}

#[test]
fn report_loads_in_chromium_without_console_errors() {
    // negative control: a failing script must be detected
    let d = fresh_dir("chromium-control");
    std::fs::create_dir_all(&d).unwrap();
    let bad = d.join("bad.html");
    std::fs::write(&bad, "<!DOCTYPE html><html><body><h2>Summary</h2><script>throw new Error('boom')</script></body></html>").unwrap();
    let (dom, console) = chromium(&bad);
    assert!(dom.contains("<h2>Summary</h2>"), "DOM dumped: {dom}");
    assert!(
        console.iter().any(|l| l.contains("boom")),
        "the check must see the script error: {console:?}"
    );
    std::fs::remove_dir_all(&d).unwrap();

    let (dir, _) = fixture();
    let (dom, console) = chromium(&dir.join("report.html"));
    for s in &SECTIONS[..6] {
        assert!(
            dom.contains(&format!("<h2>{s}</h2>")),
            "section {s} not in the rendered DOM"
        );
    }
    assert!(console.is_empty(), "console messages: {console:?}");
}
