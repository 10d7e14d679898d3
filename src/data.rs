//! Text inputs: `--text FILE…`, `--lang NAME=FILE…`, `--data`/`--eval DIR|NAME=FILE…`,
//! strict UTF-8 reading, and the assets folder.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One named text (a language and the file holding it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextInput {
    pub lang: String,
    pub path: PathBuf,
}

/// The assets folder: `$BROCA_ASSETS`, default `./assets`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("BROCA_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("assets"))
}

/// The default evaluation folder (the 30 UDHR languages written by `scripts/fetch-assets`).
pub fn default_eval_dir() -> PathBuf {
    assets_dir().join("udhr")
}

/// Flattens repeated and comma-separated flag values.
pub fn split_values(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// `--text FILE…`: the language is the file stem.
pub fn from_files(values: &[String]) -> Vec<TextInput> {
    split_values(values)
        .into_iter()
        .map(|v| TextInput {
            lang: stem(Path::new(&v)),
            path: PathBuf::from(v),
        })
        .collect()
}

/// `NAME=FILE…` pairs.
pub fn from_pairs(values: &[String]) -> Result<Vec<TextInput>> {
    split_values(values)
        .into_iter()
        .map(|v| {
            let (l, p) = v
                .split_once('=')
                .with_context(|| format!("'{v}': expected NAME=FILE"))?;
            if l.is_empty() || p.is_empty() {
                bail!("'{v}': expected NAME=FILE");
            }
            Ok(TextInput {
                lang: l.to_string(),
                path: PathBuf::from(p),
            })
        })
        .collect()
}

/// Every `*.txt` in a folder, sorted by name; the language is the file stem.
pub fn from_dir(dir: &Path) -> Result<Vec<TextInput>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.txt files", dir.display());
    }
    Ok(files
        .into_iter()
        .map(|p| TextInput {
            lang: stem(&p),
            path: p,
        })
        .collect())
}

/// `--data`/`--eval` values: one DIR, or NAME=FILE pairs (a value containing `=` is a pair).
pub fn from_dir_or_pairs(values: &[String]) -> Result<Vec<TextInput>> {
    let vals = split_values(values);
    let mut out = Vec::new();
    for v in vals {
        if v.contains('=') {
            out.extend(from_pairs(&[v])?);
        } else {
            let p = PathBuf::from(&v);
            if p.is_dir() {
                out.extend(from_dir(&p)?);
            } else if p.exists() {
                out.push(TextInput {
                    lang: stem(&p),
                    path: p,
                });
            } else {
                bail!("{v}: no such file or directory");
            }
        }
    }
    Ok(out)
}

/// Gathers the inputs of `--text`, `--lang` and `--data`; with none, `default` (if given).
pub fn gather(
    text: &[String],
    lang: &[String],
    data: &[String],
    default: Option<&Path>,
) -> Result<Vec<TextInput>> {
    let mut out = from_files(text);
    out.extend(from_pairs(lang)?);
    out.extend(from_dir_or_pairs(data)?);
    if out.is_empty() {
        match default {
            Some(d) => {
                if !d.is_dir() {
                    bail!(
                        "{}: default evaluation folder missing (run scripts/fetch-assets)",
                        d.display()
                    );
                }
                out = from_dir(d)?;
            }
            None => bail!("no input text given (use --text, --lang or --data)"),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for t in &out {
        if !seen.insert(t.lang.clone()) {
            bail!("language '{}' given twice ({})", t.lang, t.path.display());
        }
    }
    Ok(out)
}

/// Reads a text file strictly: it must exist, be valid UTF-8 and hold non-whitespace text.
pub fn read_text(path: &Path) -> Result<String> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("{}: empty text", path.display());
    }
    Ok(text)
}
