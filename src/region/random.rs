//! Random control regions: the same number of entries per tensor as a given region, chosen
//! uniformly without replacement, reproducible from a seed.

use super::Bits;
use crate::mask::{Mask, MaskTensor};
use anyhow::Result;
use rand::SeedableRng;
use rayon::prelude::*;

/// A stable 64-bit hash of a tensor name (FNV-1a), so each tensor's draw depends only on
/// the seed and its name, not on order or threads.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Exactly `count` of `numel` entries, uniformly chosen.
pub fn random_bits(shape: &[usize], count: usize, seed: u64) -> Bits {
    let mut b = Bits::zeros(shape);
    let n = b.data.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in rand::seq::index::sample(&mut rng, n, count.min(n)).into_iter() {
        b.data[i] = 1;
    }
    b
}

/// Exactly `count` of the entries of a parameter of `shape`, uniformly chosen: the same
/// entries as [`random_bits`] with the same seed, as an index list.
pub fn random_indices(name: &str, shape: &[usize], count: usize, seed: u64) -> Result<MaskTensor> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let idx = rand::seq::index::sample(&mut rng, n, count.min(n)).into_iter();
    MaskTensor::from_indices(name, shape, idx)
}

/// A mask with `like`'s per-tensor counts, uniformly placed, from `seed`.
pub fn random_like(like: &Mask, seed: u64) -> Result<Mask> {
    like.par_iter()
        .map(|(n, t)| {
            let s = seed ^ name_hash(n).rotate_left(17);
            Ok((n.clone(), random_indices(n, &t.shape, t.count(), s)?))
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().collect())
}

/// A mask of floor(k · numel) uniformly placed entries in each of `shapes`' tensors that
/// `cov` covers, from `seed`: a random region made from a model's shapes alone, in memory
/// proportional to its size.
pub fn random_fraction(
    shapes: &[(String, Vec<usize>)],
    k: f64,
    seed: u64,
    cov: crate::mask::Coverage,
) -> Result<Mask> {
    shapes
        .par_iter()
        .filter(|(n, _)| crate::mask::is_covered(n, cov))
        .map(|(n, shape)| {
            let s = seed ^ name_hash(n).rotate_left(17);
            let count = super::region_size(k, shape.iter().product::<usize>() as u64);
            Ok((n.clone(), random_indices(n, shape, count as usize, s)?))
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().collect())
}
