//! The training data stream: each language's token ids are cut into consecutive windows of
//! `seq_len` tokens (the tail shorter than a window is dropped), all languages' windows are
//! pooled, and their order is shuffled once per epoch with a seeded RNG, so languages mix.
//! The stream's whole state is (seed, epoch, position): epoch `e`'s order comes from an RNG
//! seeded with `(seed, e)`, which makes resuming exact.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// Where the stream stands (saved in checkpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub seed: u64,
    /// Completed passes over the windows.
    pub epoch: u64,
    /// Next window of the current epoch's order.
    pub position: usize,
}

/// Shuffled windows over one or more tokenized texts.
pub struct Stream {
    texts: Vec<(String, Vec<u32>)>,
    /// (text index, start token) of every window.
    windows: Vec<(usize, usize)>,
    seq_len: usize,
    order: Vec<usize>,
    pub state: StreamState,
}

/// The RNG seed of epoch `epoch` (a splitmix64 mix of seed and epoch).
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Stream {
    /// A stream over `texts` (language, ids) in windows of `seq_len`, at epoch 0.
    pub fn new(texts: Vec<(String, Vec<u32>)>, seq_len: usize, seed: u64) -> Result<Stream> {
        if seq_len < 2 {
            bail!("--seq-len must be at least 2");
        }
        let mut windows = Vec::new();
        for (i, (lang, ids)) in texts.iter().enumerate() {
            let n = ids.len() / seq_len;
            if n == 0 {
                bail!(
                    "{lang}: {} tokens, fewer than one window of --seq-len {seq_len}",
                    ids.len()
                );
            }
            windows.extend((0..n).map(|w| (i, w * seq_len)));
        }
        let mut s = Stream {
            texts,
            windows,
            seq_len,
            order: Vec::new(),
            state: StreamState {
                seed,
                epoch: 0,
                position: 0,
            },
        };
        s.shuffle();
        Ok(s)
    }

    fn shuffle(&mut self) {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(epoch_seed(self.state.seed, self.state.epoch));
        self.order = (0..self.windows.len()).collect();
        self.order.shuffle(&mut rng);
    }

    /// Moves to a saved state.
    pub fn restore(&mut self, state: StreamState) -> Result<()> {
        if state.position > self.windows.len() {
            bail!(
                "data position {} is past the {} windows of the data (different data?)",
                state.position,
                self.windows.len()
            );
        }
        self.state = state;
        self.shuffle();
        Ok(())
    }

    /// Number of windows per epoch.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether the stream has no windows (never true once built).
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Windows per language: (lang, count).
    pub fn windows_per_lang(&self) -> Vec<(String, usize)> {
        self.texts
            .iter()
            .map(|(l, ids)| (l.clone(), ids.len() / self.seq_len))
            .collect()
    }

    /// The next window's ids (starting a new, reshuffled epoch when one ends).
    pub fn next_window(&mut self) -> &[u32] {
        if self.state.position >= self.order.len() {
            self.state.epoch += 1;
            self.state.position = 0;
            self.shuffle();
        }
        let (t, start) = self.windows[self.order[self.state.position]];
        self.state.position += 1;
        &self.texts[t].1[start..start + self.seq_len]
    }

    /// The next `b` windows as a `[b, seq_len]` u32 tensor.
    pub fn next_batch(&mut self, b: usize) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(b * self.seq_len);
        for _ in 0..b {
            ids.extend_from_slice(self.next_window());
        }
        Ok(Tensor::from_vec(ids, (b, self.seq_len), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_full_window_once_per_epoch() {
        let texts = vec![
            ("a".to_string(), (0..50).collect()),
            ("b".to_string(), (100..125).collect()),
        ];
        let mut s = Stream::new(texts, 10, 7).unwrap();
        assert_eq!(s.len(), 7);
        let mut starts: Vec<u32> = (0..7).map(|_| s.next_window()[0]).collect();
        starts.sort();
        assert_eq!(starts, vec![0, 10, 20, 30, 40, 100, 110]);
        let st = s.state;
        let after: Vec<u32> = (0..9).map(|_| s.next_window()[0]).collect();
        let mut s2 = Stream::new(
            vec![
                ("a".to_string(), (0..50).collect()),
                ("b".to_string(), (100..125).collect()),
            ],
            10,
            7,
        )
        .unwrap();
        s2.restore(st).unwrap();
        let again: Vec<u32> = (0..9).map(|_| s2.next_window()[0]).collect();
        assert_eq!(after, again);
    }
}
