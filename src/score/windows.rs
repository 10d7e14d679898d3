//! Which tokens a score run uses: the token budget (a prefix of the text's tokens), the
//! non-overlapping windows cut from it, and the contiguous slice of windows a shard owns.

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::str::FromStr;

/// Non-overlapping windows of `seq_len` tokens over `n` tokens. The trailing partial window
/// is dropped when at least one full window exists; with fewer than `seq_len` tokens there is
/// exactly one shorter window of all `n` tokens (never zero windows).
pub fn windows(n: usize, seq_len: usize) -> Result<Vec<Range<usize>>> {
    if seq_len < 2 {
        bail!("--seq-len must be at least 2, got {seq_len}");
    }
    if n < 2 {
        bail!("{n} token(s): a window needs at least 2");
    }
    if n < seq_len {
        return Ok(std::iter::once(0..n).collect());
    }
    Ok((0..n / seq_len)
        .map(|w| w * seq_len..(w + 1) * seq_len)
        .collect())
}

/// `--shard i/n`: the i-th (0-based) of n contiguous slices of the windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Shard> {
        let bad = || format!("--shard {s}: expected i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').with_context(bad)?;
        let index: usize = i.trim().parse().ok().with_context(bad)?;
        let count: usize = n.trim().parse().ok().with_context(bad)?;
        if count == 0 || index >= count {
            bail!("{}", bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Window indices `[i·W/n, (i+1)·W/n)` of this shard among `w` windows (may be empty).
    pub fn range(&self, w: usize) -> Range<usize> {
        self.index * w / self.count..(self.index + 1) * w / self.count
    }

    /// The file-name tag, `shard-i-of-n`.
    pub fn tag(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }

    /// Parses a file-name tag written by [`Shard::tag`].
    pub fn from_tag(tag: &str) -> Option<Shard> {
        let rest = tag.strip_prefix("shard-")?;
        let (i, n) = rest.split_once("-of-")?;
        let (index, count) = (i.parse().ok()?, n.parse().ok()?);
        (index < count).then_some(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The first `budget` tokens of `text` (all of them without a budget), equal to the first
/// `budget` tokens of encoding the whole text; only a prefix large enough for them is
/// tokenized ([`Tokenizer::encode_first`]), so a small budget does not pay for a whole book.
pub fn budget_tokens(tok: &Tokenizer, text: &str, budget: Option<usize>) -> Result<Vec<u32>> {
    match budget {
        None => tok.encode(text),
        Some(n) => tok
            .encode_first(text, n, true)?
            .context("a complete text always gives its first tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_and_drop_the_tail() {
        assert_eq!(windows(10, 4).unwrap(), vec![0..4, 4..8]);
        assert_eq!(windows(8, 4).unwrap(), vec![0..4, 4..8]);
        assert_eq!(windows(3, 4).unwrap(), vec![0..3]);
        assert_eq!(windows(4, 4).unwrap(), vec![0..4]);
        assert!(windows(1, 4).is_err());
        assert!(windows(10, 1).is_err());
    }

    #[test]
    fn shards_partition_the_windows() {
        for w in [1usize, 2, 7, 8, 100] {
            for n in 1..6 {
                let mut next = 0;
                for i in 0..n {
                    let r = Shard { index: i, count: n }.range(w);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, w);
            }
        }
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
        for bad in ["3/2", "2/2", "0/0", "a/2", "1", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let s = Shard { index: 2, count: 5 };
        assert_eq!(Shard::from_tag(&s.tag()), Some(s));
    }
}
