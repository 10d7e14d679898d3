//! The study configuration (TOML): model, corpora, budgets, k values, stages, seeds; and the
//! `quick` and `full` presets.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole study.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// Model path; `{assets}` expands to the assets folder.
    pub model: String,
    /// Seed for every random choice (random controls, randomize ops).
    #[serde(default)]
    pub seed: u64,
    /// Stages to run, in order (default: all but forgetting unless `forgetting.enabled`).
    #[serde(default)]
    pub stages: Vec<String>,
    pub importance: ImportanceConfig,
    pub eval: EvalConfig,
    pub regions: RegionsConfig,
    pub dims: DimsConfig,
    pub structured: StructuredConfig,
    pub generation: GenerationConfig,
    pub superweights: SuperweightsConfig,
    #[serde(default)]
    pub forgetting: ForgettingConfig,
}

/// Importance scoring: one score file per language.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImportanceConfig {
    pub languages: Vec<String>,
    /// Folder holding `<lang>.txt` (default: the Bible).
    pub corpus_dir: String,
    /// Token budget per language.
    pub tokens: usize,
    pub seq_len: usize,
    #[serde(default = "one")]
    pub batch: usize,
}

/// Perplexity evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Folder of `<lang>.txt` (default: the UDHR).
    pub dir: String,
    /// Languages to use (empty: every file in `dir`).
    #[serde(default)]
    pub languages: Vec<String>,
    pub max_tokens: usize,
    pub seq_len: usize,
}

/// Regions and the ablation table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionsConfig {
    /// Fractions for the core region (per tensor).
    pub k: Vec<f64>,
    /// Fraction for monolingual regions (0 disables them).
    pub mono_k: f64,
    /// Operations for the ablation table (`zero`, `randomize`, …).
    pub ops: Vec<String>,
    /// Controls: `random`, `bottom`, `top` (for a core region made from importance scores,
    /// `top` selects the region itself: a check that the controls are built right).
    pub controls: Vec<String>,
}

/// Single-dimension scans of RMSNorm weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DimsConfig {
    pub layers: Vec<usize>,
    pub norm: String,
    pub op: String,
    pub languages: Vec<String>,
    pub screen_tokens: usize,
    pub confirm_top: usize,
    pub max_tokens: usize,
    /// Dimensions to scan (empty: every hidden dimension).
    #[serde(default)]
    pub dims: Vec<usize>,
    /// Screen exactly only this many dims, those with the largest first-order prediction
    /// (unset: every dim when the hidden size is at most [`WIDE_MODEL_HIDDEN`], else
    /// [`WIDE_MODEL_EXACT_DIMS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_dims: Option<usize>,
}

/// Hidden size above which an unset `dims.exact_dims` screens only
/// [`WIDE_MODEL_EXACT_DIMS`] dims exactly (a full exact screen of a 1.5B model's 1536 dims
/// would take hours on 2 cores).
pub const WIDE_MODEL_HIDDEN: usize = 1024;
/// Dims screened exactly on a wide model when `dims.exact_dims` is unset.
pub const WIDE_MODEL_EXACT_DIMS: usize = 96;

impl DimsConfig {
    /// The number of dims to screen exactly on a model of hidden size `hidden`.
    pub fn exact_dims_for(&self, hidden: usize) -> Option<usize> {
        self.exact_dims
            .or((hidden > WIDE_MODEL_HIDDEN).then_some(WIDE_MODEL_EXACT_DIMS))
    }
}

/// Structured perturbation of the top dimensions found by the scan.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StructuredConfig {
    pub top_dims: usize,
    pub op: String,
}

/// Generation side by side.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    pub prompts: Vec<String>,
    pub max_tokens: usize,
}

/// Super-weight search.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuperweightsConfig {
    pub prompt: String,
    pub top: usize,
    /// Verification text: `<eval.dir>/<eval_lang>.txt`, first `eval_tokens` tokens.
    #[serde(default = "en")]
    pub eval_lang: String,
    #[serde(default = "two_five_six")]
    pub eval_tokens: usize,
}

/// Forgetting experiment (off unless enabled).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForgettingConfig {
    pub enabled: bool,
    pub train_lang: String,
    pub train_dir: String,
    pub eval_languages: Vec<String>,
    pub steps: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub eval_every: usize,
    pub eval_tokens: usize,
}

impl Default for ForgettingConfig {
    fn default() -> Self {
        ForgettingConfig {
            enabled: false,
            train_lang: "zh".into(),
            train_dir: "{assets}/bible".into(),
            eval_languages: vec![
                "en".into(),
                "fr".into(),
                "de".into(),
                "es".into(),
                "zh".into(),
            ],
            steps: 40,
            seq_len: 128,
            lr: 1e-4,
            eval_every: 10,
            eval_tokens: 128,
        }
    }
}

fn one() -> usize {
    1
}

fn en() -> String {
    "en".into()
}

fn two_five_six() -> usize {
    256
}

/// Every stage, in dependency order.
pub const ALL_STAGES: &[&str] = &[
    "baseline",
    "importance",
    "regions",
    "ablation",
    "concentration",
    "dims",
    "structured",
    "generation",
    "superweights",
    "forgetting",
];

impl StudyConfig {
    /// The named preset: `quick` (SmolLM2, ≤ 20 min on 2 cores) or `full` (Qwen2.5-Coder-0.5B,
    /// paper-sized budgets).
    pub fn preset(name: &str) -> Result<StudyConfig> {
        let six: Vec<String> = ["ar", "es", "ru", "zh", "ko", "vi"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let quick = StudyConfig {
            model: "{assets}/smollm2-135m-instruct-q4_1.gguf".into(),
            seed: 0,
            stages: Vec::new(),
            importance: ImportanceConfig {
                languages: six.clone(),
                corpus_dir: "{assets}/bible".into(),
                tokens: 2048,
                seq_len: 512,
                batch: 1,
            },
            eval: EvalConfig {
                dir: "{assets}/udhr".into(),
                languages: Vec::new(),
                max_tokens: 128,
                seq_len: 512,
            },
            regions: RegionsConfig {
                k: vec![0.01, 0.03],
                mono_k: 0.01,
                ops: vec!["zero".into()],
                controls: vec!["random".into(), "bottom".into(), "top".into()],
            },
            dims: DimsConfig {
                layers: vec![0, 15],
                norm: "input".into(),
                op: "scale:10".into(),
                languages: vec!["en".into(), "zh".into(), "ru".into(), "ar".into()],
                screen_tokens: 64,
                confirm_top: 16,
                max_tokens: 256,
                dims: Vec::new(),
                exact_dims: None,
            },
            structured: StructuredConfig {
                top_dims: 3,
                op: "zero".into(),
            },
            generation: GenerationConfig {
                prompts: vec![
                    "The capital of France is".into(),
                    "Fudan University is located in".into(),
                ],
                max_tokens: 24,
            },
            superweights: SuperweightsConfig {
                prompt: "The Universal Declaration of Human Rights was adopted in".into(),
                top: 5,
                eval_lang: en(),
                eval_tokens: 256,
            },
            forgetting: ForgettingConfig::default(),
        };
        match name {
            "quick" => Ok(quick),
            "full" => {
                let mut c = quick;
                c.model = "{assets}/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into();
                c.importance.tokens = 100_000;
                c.eval.max_tokens = 512;
                c.regions.k = vec![0.01, 0.03, 0.05];
                c.regions.ops = vec!["zero".into(), "randomize".into()];
                c.dims.layers = vec![0, 12];
                c.dims.confirm_top = 32;
                c.dims.max_tokens = 512;
                c.forgetting.enabled = true;
                c.forgetting.steps = 200;
                c.forgetting.seq_len = 512;
                Ok(c)
            }
            _ => bail!("unknown preset '{name}' (quick, full)"),
        }
    }

    /// Reads a TOML study file.
    pub fn from_file(path: &Path) -> Result<StudyConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let c: StudyConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid study config: {}",
                path.display(),
                e.to_string().replace('\n', " ")
            )
        })?;
        c.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Checks values that would otherwise fail deep inside a stage.
    pub fn validate(&self) -> Result<()> {
        for s in &self.stages {
            if !ALL_STAGES.contains(&s.as_str()) {
                bail!("unknown stage '{s}' (stages: {})", ALL_STAGES.join(", "));
            }
        }
        for k in self
            .regions
            .k
            .iter()
            .chain(std::iter::once(&self.regions.mono_k))
        {
            if !(0.0..=1.0).contains(k) {
                bail!("region fraction {k} outside [0, 1]");
            }
        }
        if self.dims.exact_dims == Some(0) {
            bail!("dims.exact_dims = 0: must be at least 1 (or unset)");
        }
        if self.importance.languages.is_empty() {
            bail!("importance.languages is empty");
        }
        // sequences a stage needs (a window makes n - 1 predictions), counts and rates,
        // checked as the command-line flags of the same meaning are
        use crate::validate::{at_least, finite_positive};
        let f = &self.forgetting;
        let g = &self.generation;
        for (key, v, min) in [
            ("importance.tokens", self.importance.tokens, 2),
            ("importance.seq_len", self.importance.seq_len, 2),
            ("importance.batch", self.importance.batch, 1),
            ("eval.max_tokens", self.eval.max_tokens, 2),
            ("eval.seq_len", self.eval.seq_len, 2),
            ("dims.screen_tokens", self.dims.screen_tokens, 2),
            ("dims.max_tokens", self.dims.max_tokens, 2),
            ("generation.max_tokens", g.max_tokens, 1),
            ("superweights.top", self.superweights.top, 1),
            ("superweights.eval_tokens", self.superweights.eval_tokens, 2),
            ("forgetting.steps", f.steps, if f.enabled { 1 } else { 0 }),
            (
                "forgetting.seq_len",
                f.seq_len,
                if f.enabled { 2 } else { 0 },
            ),
            (
                "forgetting.eval_tokens",
                f.eval_tokens,
                if f.enabled { 2 } else { 0 },
            ),
        ] {
            at_least(v, min).map_err(|e| anyhow::anyhow!("{key} = {v}: {e}"))?;
        }
        if f.enabled {
            finite_positive(f.lr).map_err(|e| anyhow::anyhow!("forgetting.lr = {}: {e}", f.lr))?;
        }
        if let Some(i) = g.prompts.iter().position(|p| p.trim().is_empty()) {
            bail!("generation.prompts[{i}] is empty");
        }
        if self.superweights.prompt.trim().is_empty() {
            bail!("superweights.prompt is empty");
        }
        Ok(())
    }

    /// The stages to run, in order.
    pub fn stage_list(&self) -> Vec<String> {
        if !self.stages.is_empty() {
            return ALL_STAGES
                .iter()
                .filter(|s| self.stages.iter().any(|x| x == *s))
                .map(|s| s.to_string())
                .collect();
        }
        ALL_STAGES
            .iter()
            .filter(|s| **s != "forgetting" || self.forgetting.enabled)
            .map(|s| s.to_string())
            .collect()
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// Expands `{assets}` in a configured path.
pub fn expand(p: &str) -> PathBuf {
    PathBuf::from(p.replace("{assets}", &crate::data::assets_dir().to_string_lossy()))
}
