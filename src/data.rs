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

/// Gathers the inputs of `--text`, `--lang` and `--data` (whose flag is called `data_flag` in
/// errors: `--data`, `--eval`); with none, `default` (if given).
pub fn gather(
    text: &[String],
    lang: &[String],
    data: &[String],
    data_flag: &str,
    default: Option<&Path>,
) -> Result<Vec<TextInput>> {
    let mut out = from_files(text);
    out.extend(from_pairs(lang).context("--lang")?);
    out.extend(from_dir_or_pairs(data).with_context(|| data_flag.to_string())?);
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

/// Reads a whole text file strictly: it must exist, be valid UTF-8 and hold non-whitespace
/// text. Read once per process ([`open_text`]), so `/dev/stdin` works too.
pub fn read_text(path: &Path) -> Result<String> {
    let src = open_text(path, None)?;
    let mut s = src.lock().unwrap_or_else(|e| e.into_inner());
    s.fill(usize::MAX)?;
    Ok(s.text.clone())
}

/// Checks a text input before anything heavy runs: it exists, is UTF-8 and not empty.
/// With `budget` (tokens), only a prefix large enough for them is read (more is read when
/// tokenizing needs it).
pub fn check_text(path: &Path, budget: Option<usize>) -> Result<()> {
    open_text(path, budget).map(|_| ())
}

/// The tokens of a text input: all of them, or the first `budget` (equal to the first
/// `budget` of the whole text's tokens; only a prefix of the file is read and tokenized).
/// Fewer than 2 tokens is an error naming the file.
pub fn text_tokens(
    tok: &crate::tokenizer::Tokenizer,
    path: &Path,
    budget: Option<usize>,
) -> Result<Vec<u32>> {
    let src = open_text(path, budget)?;
    let mut s = src.lock().unwrap_or_else(|e| e.into_inner());
    let ids = match budget {
        None => {
            s.fill(usize::MAX)?;
            tok.encode(&s.text)?
        }
        Some(n) => loop {
            if let Some(ids) = tok.encode_first(&s.text, n, s.eof())? {
                break ids;
            }
            let more = s.text.len().saturating_mul(2);
            s.fill(more)?;
        },
    };
    if ids.len() < 2 {
        bail!("{}: fewer than 2 tokens ({})", path.display(), ids.len());
    }
    Ok(ids)
}

/// A text file being read: the valid UTF-8 read so far, and the open file while more remains.
/// Each path is opened once per process and shared ([`open_text`]), so checking a text and
/// tokenizing it later never read it twice (a pipe could not be read twice).
#[derive(Debug)]
pub struct TextSource {
    path: PathBuf,
    /// Text read so far (valid UTF-8).
    pub text: String,
    /// Bytes of an incomplete UTF-8 character at the end of what was read.
    pending: Vec<u8>,
    /// The file while it has not been read to its end.
    file: Option<std::fs::File>,
}

impl TextSource {
    /// Whether the whole file has been read.
    pub fn eof(&self) -> bool {
        self.file.is_none()
    }

    /// Reads until at least `bytes` bytes of text are held or the file ends; checks the
    /// UTF-8 of what it reads.
    pub fn fill(&mut self, bytes: usize) -> Result<()> {
        use std::io::Read;
        while self.text.len() < bytes {
            let Some(f) = self.file.as_mut() else {
                return Ok(());
            };
            let want = (bytes - self.text.len()).clamp(64 << 10, 64 << 20);
            let mut buf = std::mem::take(&mut self.pending);
            let got = f
                .take(want as u64)
                .read_to_end(&mut buf)
                .with_context(|| format!("{}: cannot read", self.path.display()))?;
            let at_end = got == 0;
            if at_end {
                self.file = None;
            }
            match std::str::from_utf8(&buf) {
                Ok(s) => self.text.push_str(s),
                Err(e) if e.error_len().is_none() && !at_end => {
                    let ok = e.valid_up_to();
                    // the first `ok` bytes were just checked to be valid UTF-8
                    self.text
                        .push_str(std::str::from_utf8(&buf[..ok]).unwrap_or_default());
                    self.pending = buf[ok..].to_vec();
                }
                Err(e) => bail!(
                    "{}: not valid UTF-8 (invalid byte at offset {})",
                    self.path.display(),
                    self.text.len() + e.valid_up_to()
                ),
            }
        }
        Ok(())
    }
}

/// The process-wide table of opened text inputs.
type Sources = std::sync::Mutex<
    std::collections::HashMap<PathBuf, std::sync::Arc<std::sync::Mutex<TextSource>>>,
>;
static SOURCES: std::sync::OnceLock<Sources> = std::sync::OnceLock::new();

/// Opens a text input (once per process: later calls share the first one's reading) and
/// reads enough of it to check it: all of it without `budget`, else a prefix of about 16
/// bytes per token (at least 64 KiB). Errors: missing, a folder, unreadable, not UTF-8, or
/// empty (whitespace only).
pub fn open_text(
    path: &Path,
    budget: Option<usize>,
) -> Result<std::sync::Arc<std::sync::Mutex<TextSource>>> {
    let table = SOURCES.get_or_init(Default::default);
    let src = {
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        match t.get(path) {
            Some(s) => s.clone(),
            None => {
                if !path.exists() {
                    bail!("{}: no such file", path.display());
                }
                if path.is_dir() {
                    bail!("{}: is a directory, not a text file", path.display());
                }
                let file = std::fs::File::open(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                let s = std::sync::Arc::new(std::sync::Mutex::new(TextSource {
                    path: path.to_path_buf(),
                    text: String::new(),
                    pending: Vec::new(),
                    file: Some(file),
                }));
                t.insert(path.to_path_buf(), s.clone());
                s
            }
        }
    };
    {
        let mut s = src.lock().unwrap_or_else(|e| e.into_inner());
        let want = budget.map_or(usize::MAX, |n| n.saturating_mul(16).max(64 << 10));
        s.fill(want)?;
        // whitespace so far: read on until there is text or the file ends
        while s.text.trim().is_empty() && !s.eof() {
            let more = s.text.len().saturating_mul(2).max(64 << 10);
            s.fill(more)?;
        }
        if s.text.trim().is_empty() {
            bail!("{}: empty text", path.display());
        }
    }
    Ok(src)
}
