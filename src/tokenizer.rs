//! Tokenizers: built from GGUF metadata (byte-level BPE with the model's pre-tokenizer) or
//! read from `tokenizer.json`. A BOS token is prepended exactly when the model says so.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// The GPT-2 pre-tokenizer pattern (used by SmolLM2 after splitting digits).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer pattern.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Prepended to every encoded text when set.
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl Tokenizer {
    /// Builds the tokenizer that a GGUF file describes.
    pub fn from_gguf(
        meta: &std::collections::HashMap<String, Value>,
        path: &Path,
    ) -> Result<Tokenizer> {
        let p = path.display();
        let model = meta
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned();
        if model.as_deref() != Some("gpt2") {
            bail!(
                "{p}: unsupported GGUF tokenizer model {model:?} (supported: gpt2 byte-level BPE)"
            );
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.to_string()
                            .cloned()
                            .map_err(|e| anyhow::anyhow!("{p}: {key}: {e}"))
                    })
                    .collect(),
                _ => bail!("{p}: missing GGUF metadata {key}"),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("{p}: cannot build BPE: {e}"))?;
        let pre = meta
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let mut tk = tokenizers::Tokenizer::new(bpe);
        let pre_tok: PreTokenizerWrapper = match pre.as_str() {
            "qwen2" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(QWEN2_PATTERN.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            // "gpt2", "default" and others: the GPT-2 pattern inside ByteLevel.
            _ => ByteLevel::new(false, true, true).into(),
        };
        tk.with_pre_tokenizer(Some(pre_tok));
        tk.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        tk.add_special_tokens(&specials);
        let id = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos = if add_bos {
            id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        Ok(Tokenizer {
            inner: tk,
            bos,
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Reads `tokenizer.json` (its post-processor decides BOS; we detect it) from a directory.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let mut bos = None;
        let cfg = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", cfg.display()))?;
            if v["add_bos_token"].as_bool() == Some(true) {
                if let Some(tok) = v["bos_token"]
                    .as_str()
                    .or(v["bos_token"]["content"].as_str())
                {
                    bos = inner.token_to_id(tok);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            bos,
            eos: None,
        })
    }

    /// Encodes a whole text: BOS (if the model adds one) followed by the text's tokens.
    /// Long texts are cut at line breaks that no pre-token can span and encoded in parallel;
    /// the result equals encoding the text in one piece.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        use rayon::prelude::*;
        let chunks = split_safe(text, 32 * 1024);
        let parts: Vec<Result<Vec<u32>>> = chunks
            .par_iter()
            .map(|c| {
                Ok(self
                    .inner
                    .encode_fast(*c, false)
                    .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
                    .get_ids()
                    .to_vec())
            })
            .collect();
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        for p in parts {
            ids.extend(p?);
        }
        Ok(ids)
    }

    /// The first `n` tokens (BOS included) of a text of which `text` is a prefix, equal to
    /// the first `n` of encoding the whole text; `complete` says that `text` is all of it.
    /// Only prefixes that end where no pre-token can span ([`prefix_cut`]) are encoded, growing
    /// until they give `n` tokens, so a small `n` does not pay for a whole book. `None` when
    /// `text` is not complete and too short to tell.
    pub fn encode_first(&self, text: &str, n: usize, complete: bool) -> Result<Option<Vec<u32>>> {
        // a first guess of about 4 bytes per token, then doubling
        let mut from = n.saturating_mul(4).max(1024);
        let mut tried = 0;
        loop {
            let cut = if from < text.len() {
                prefix_cut(text, from)
            } else {
                None
            };
            let Some(c) = cut else {
                if complete {
                    let mut ids = self.encode(text)?;
                    ids.truncate(n);
                    return Ok(Some(ids));
                }
                // all that is loaded: the last point where it may be cut
                return match last_prefix_cut(text).filter(|&c| c > tried) {
                    Some(c) => {
                        let mut ids = self.encode(&text[..c])?;
                        Ok((ids.len() >= n).then(|| {
                            ids.truncate(n);
                            ids
                        }))
                    }
                    None => Ok(None),
                };
            };
            let mut ids = self.encode(&text[..c])?;
            if ids.len() >= n {
                ids.truncate(n);
                return Ok(Some(ids));
            }
            tried = c;
            from = c.saturating_mul(2);
        }
    }

    /// Decodes ids back to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    /// The UTF-8 byte length of each token's byte string (for bits per byte).
    pub fn token_bytes(&self, ids: &[u32]) -> Vec<usize> {
        ids.iter().map(|&i| self.token_byte_len(i)).collect()
    }

    fn token_byte_len(&self, id: u32) -> usize {
        match self.inner.id_to_token(id) {
            Some(tok) => tok.chars().map(byte_level_len).sum(),
            None => 0,
        }
    }

    /// Writes the tokenizer as `tokenizer.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let s = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        crate::io::atomic_write(path, s.as_bytes())
    }
}

/// Bytes represented by one character of a byte-level BPE token: every byte-level
/// character stands for exactly one byte; characters of added (special) tokens count as
/// their UTF-8 length.
fn byte_level_len(c: char) -> usize {
    let u = c as u32;
    // The byte-level alphabet maps the 256 bytes to chars in [0x21, 0x143].
    if (0x21..=0x7e).contains(&u)
        || (0xa1..=0xac).contains(&u)
        || (0xae..=0xff).contains(&u)
        || (0x100..=0x143).contains(&u)
    {
        1
    } else {
        c.len_utf8()
    }
}

/// Splits `text` into pieces of roughly `target` bytes, only right after a `\n` that
/// follows a non-space character and precedes a non-space character, where neither
/// pre-tokenizer pattern can join the two sides.
fn split_safe(text: &str, target: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let mut i = start + target;
        while i < b.len() {
            if b[i] == b'\n' && i > start && i + 1 < b.len() && solid_around(text, i) {
                cut = Some(i + 1);
                break;
            }
            i += 1;
        }
        match cut {
            Some(c) => {
                out.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

/// Whether the characters on both sides of byte `i` (a `\n`) are not whitespace.
fn solid_around(text: &str, i: usize) -> bool {
    let before = text[..i].chars().next_back();
    let after = text[i + 1..].chars().next();
    matches!((before, after), (Some(a), Some(b)) if !a.is_whitespace() && !b.is_whitespace())
}

/// Whether a text may be cut at byte `i` without changing any token before the cut: right
/// after a `\n` with non-space characters on both sides, or right before a space or tab that
/// follows a non-space character. No pre-tokenizer pattern of the supported models (GPT-2,
/// SmolLM, Qwen2) lets a pre-token cross either point, and each pattern decides the
/// pre-tokens before it from characters before it; special tokens hold no spaces.
fn is_prefix_cut(text: &str, i: usize) -> bool {
    let b = text.as_bytes();
    if i == 0 || i >= b.len() || !text.is_char_boundary(i) {
        return false;
    }
    let before = |j: usize| text[..j].chars().next_back();
    match b[i] {
        b' ' | b'\t' => before(i).is_some_and(|c| !c.is_whitespace()),
        _ if b[i - 1] == b'\n' => {
            i >= 2
                && before(i - 1).is_some_and(|c| !c.is_whitespace())
                && text[i..].chars().next().is_some_and(|c| !c.is_whitespace())
        }
        _ => false,
    }
}

/// The first point at or after byte `from` where `text` may be cut ([`is_prefix_cut`]).
pub fn prefix_cut(text: &str, from: usize) -> Option<usize> {
    (from.max(1)..text.len()).find(|&i| is_prefix_cut(text, i))
}

/// The last point where `text` may be cut ([`is_prefix_cut`]).
pub fn last_prefix_cut(text: &str) -> Option<usize> {
    (1..text.len()).rev().find(|&i| is_prefix_cut(text, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cuts_only_where_no_pre_token_spans() {
        let t = "ab\n\ncd\nef gh  ij\tk";
        let cuts: Vec<usize> = (0..t.len()).filter(|&i| is_prefix_cut(t, i)).collect();
        // after "cd\n" (solid on both sides), before the space after "ef", before the two
        // spaces after "gh" (only the first: the second follows a space), before the tab
        assert_eq!(cuts, vec![7, 9, 12, 16]);
        assert_eq!(prefix_cut(t, 0), Some(7));
        assert_eq!(prefix_cut(t, 13), Some(16));
        assert_eq!(prefix_cut(t, 17), None);
        assert_eq!(last_prefix_cut(t), Some(16));
        assert_eq!(prefix_cut("中文。中文", 0), None);
    }
}
