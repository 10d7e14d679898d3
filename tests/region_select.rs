//! Region selection, mono, random and set operations against brute force.

use broca::mask::Coverage;
use broca::region::ops::{apply, compare, SetOp};
use broca::region::select::{select, Direction, Scope};
use broca::region::{self, region_size, Bits, Dense, Region, Scores};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random values with many ties: small integers (some negative, some -0.0) mixed with
/// continuous values.
fn tied_values(n: usize, r: &mut impl Rng) -> Vec<f32> {
    (0..n)
        .map(|_| match r.gen_range(0..4) {
            0 => r.gen_range(0..4) as f32,
            1 => -(r.gen_range(0..3) as f32),
            2 => r.gen::<f32>() * 3.0,
            _ => (r.gen_range(0..8) as f32) * 0.5,
        })
        .collect()
}

/// Scores with a few shapes (1-D and 2-D), names in a fixed order.
fn random_scores(seed: u64, ties: bool) -> Scores {
    let mut r = rng(seed);
    let shapes: [&[usize]; 6] = [&[7, 13], &[16], &[3, 5], &[1], &[40, 9], &[101]];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let data = if ties {
                tied_values(n, &mut r)
            } else {
                (0..n).map(|_| r.gen::<f32>()).collect()
            };
            (
                format!("model.layers.{i}.w"),
                Dense {
                    shape: s.to_vec(),
                    data,
                },
            )
        })
        .collect()
}

/// Brute force: sort every (value, tensor, index) by value (descending for top), then tensor,
/// then index, and take the first `count`.
fn brute_select(values: &[&[f32]], count: usize, dir: Direction) -> Vec<Vec<u8>> {
    let mut all: Vec<(f32, usize, usize)> = values
        .iter()
        .enumerate()
        .flat_map(|(t, v)| v.iter().enumerate().map(move |(i, &x)| (x, t, i)))
        .collect();
    all.sort_by(|a, b| {
        let c = a.0.total_cmp(&b.0);
        let c = if dir == Direction::Top {
            c.reverse()
        } else {
            c
        };
        c.then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    });
    let mut out: Vec<Vec<u8>> = values.iter().map(|v| vec![0; v.len()]).collect();
    for &(_, t, i) in &all[..count] {
        out[t][i] = 1;
    }
    out
}

fn brute_region(scores: &Scores, k: f64, dir: Direction, scope: Scope) -> Region {
    let values: Vec<&[f32]> = scores.values().map(|d| d.data.as_slice()).collect();
    let masks = match scope {
        Scope::PerTensor => values
            .iter()
            .map(|v| brute_select(&[v], region_size(k, v.len() as u64) as usize, dir).remove(0))
            .collect(),
        Scope::Global => {
            let total: usize = values.iter().map(|v| v.len()).sum();
            brute_select(&values, region_size(k, total as u64) as usize, dir)
        }
    };
    scores
        .iter()
        .zip(masks)
        .map(|((n, d), data)| {
            (
                n.clone(),
                Bits {
                    shape: d.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

#[test]
fn region_sizes_are_exactly_floor_k_numel_per_tensor() {
    let scores = random_scores(1, false);
    for k in [0.01, 0.03, 0.05, 0.1, 0.29, 0.5, 0.999, 1.0] {
        for dir in [Direction::Top, Direction::Bottom] {
            let r = select(&scores, k, dir, Scope::PerTensor);
            for (n, d) in &scores {
                let want = (k * d.data.len() as f64).floor() as u64;
                assert_eq!(r[n].count(), want, "{n} k={k} {dir:?}");
                assert_eq!(r[n].shape, d.shape);
            }
            let g = select(&scores, k, dir, Scope::Global);
            let total: usize = scores.values().map(|d| d.data.len()).sum();
            assert_eq!(
                region::total_count(&g),
                (k * total as f64).floor() as u64,
                "global k={k}"
            );
        }
    }
}

#[test]
fn selection_equals_full_sort_top_bottom_per_tensor_global_with_ties() {
    for seed in 0..25 {
        for ties in [false, true] {
            let scores = random_scores(100 + seed, ties);
            for k in [0.01, 0.07, 0.2, 0.5, 0.93] {
                for dir in [Direction::Top, Direction::Bottom] {
                    for scope in [Scope::PerTensor, Scope::Global] {
                        let got = select(&scores, k, dir, scope);
                        let want = brute_region(&scores, k, dir, scope);
                        assert_eq!(got, want, "seed {seed} ties {ties} k {k} {dir:?} {scope:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_flat_index_across_tensors() {
    // every value equal: top and bottom both take the first entries in name order
    let scores: Scores = [("a", 5usize), ("b", 5)]
        .iter()
        .map(|(n, len)| {
            (
                n.to_string(),
                Dense {
                    shape: vec![*len],
                    data: vec![1.0; *len],
                },
            )
        })
        .collect();
    for dir in [Direction::Top, Direction::Bottom] {
        let g = select(&scores, 0.7, dir, Scope::Global);
        assert_eq!(g["a"].data, vec![1, 1, 1, 1, 1]);
        assert_eq!(g["b"].data, vec![1, 1, 0, 0, 0]);
        let p = select(&scores, 0.5, dir, Scope::PerTensor);
        assert_eq!(p["a"].data, vec![1, 1, 0, 0, 0]);
    }
}

/// Writes a score file with metadata `lang`.
fn write_scores(path: &Path, lang: &str, scores: &Scores) {
    let tensors: Vec<(String, Tensor)> = scores
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                Tensor::from_vec(d.data.clone(), d.shape.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [
        ("lang".to_string(), lang.to_string()),
        ("method".to_string(), "test".to_string()),
    ]
    .into();
    broca::model::hf::save_safetensors(path, &tensors, Some(meta)).unwrap();
}

/// Score files for three languages with some signed values (selection uses |score|) and an
/// uncovered tensor that must be ignored.
fn score_files(dir: &Path) -> (Vec<std::path::PathBuf>, Vec<Scores>) {
    let mut paths = Vec::new();
    let mut all = Vec::new();
    for (i, lang) in ["ar", "es", "zh"].iter().enumerate() {
        let mut s = random_scores(500 + i as u64, true);
        s.insert(
            "model.embed_tokens.weight".into(),
            Dense {
                shape: vec![4, 3],
                data: vec![9.0; 12],
            },
        );
        let p = dir.join(format!("file{i}.safetensors"));
        write_scores(&p, lang, &s);
        s.remove("model.embed_tokens.weight");
        paths.push(p);
        all.push(s);
    }
    (paths, all)
}

fn abs_scores(s: &Scores) -> Scores {
    s.iter()
        .map(|(n, d)| {
            (
                n.clone(),
                Dense {
                    shape: d.shape.clone(),
                    data: d.data.iter().map(|x| x.abs()).collect(),
                },
            )
        })
        .collect()
}

#[test]
fn core_from_files_sums_abs_scores_and_skips_uncovered() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, all) = score_files(dir.path());
    let (langs, sum) = region::scores::sum_abs(&paths, Coverage::Layers).unwrap();
    assert_eq!(langs, vec!["ar", "es", "zh"]);
    assert!(!sum.contains_key("model.embed_tokens.weight"));
    for (n, d) in &sum {
        for (i, &v) in d.data.iter().enumerate() {
            let want: f32 = all.iter().map(|s| s[n].data[i].abs()).sum();
            assert!(
                (v - want).abs() <= 1e-6 * want.max(1.0),
                "{n}[{i}]: {v} vs {want}"
            );
        }
    }
    let (_, with_all) = region::scores::sum_abs(&paths, Coverage::All).unwrap();
    assert_eq!(with_all["model.embed_tokens.weight"].data, vec![27.0; 12]);
}

#[test]
fn mono_equals_own_top_minus_union_of_others_by_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, all) = score_files(dir.path());
    for (t, target) in ["ar", "es", "zh"].iter().enumerate() {
        for k in [0.05, 0.2] {
            let (langs, got) =
                region::build::mono(&paths, target, k, Coverage::Layers, Scope::PerTensor).unwrap();
            assert_eq!(langs.len(), 3);
            let tops: Vec<Region> = all
                .iter()
                .map(|s| brute_region(&abs_scores(s), k, Direction::Top, Scope::PerTensor))
                .collect();
            for (n, b) in &got {
                let b = b.to_bits();
                for (i, &bit) in b.iter().enumerate() {
                    let own = tops[t][n].data[i] == 1;
                    let other = (0..3).any(|j| j != t && tops[j][n].data[i] == 1);
                    assert_eq!(bit == 1, own && !other, "{target} {n}[{i}] k={k}");
                }
            }
        }
    }
    let err = region::build::mono(&paths, "ko", 0.1, Coverage::Layers, Scope::PerTensor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ko") && err.contains("ar, es, zh"), "{err}");
}

#[test]
fn score_files_of_different_layouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = score_files(dir.path());
    let mut s = random_scores(9, false);
    s.insert(
        "model.layers.0.w".into(),
        Dense {
            shape: vec![13, 7],
            data: vec![1.0; 91],
        },
    );
    let odd = dir.path().join("odd.safetensors");
    write_scores(&odd, "ru", &s);
    let err = region::scores::sum_abs(&[paths[0].clone(), odd.clone()], Coverage::Layers)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("odd.safetensors")
            && err.contains("model.layers.0.w")
            && err.contains("shape"),
        "{err}"
    );
}

fn random_region(seed: u64, p: f64) -> Region {
    let mut r = rng(seed);
    [
        ("model.layers.0.a", vec![9, 11]),
        ("model.layers.0.b", vec![30]),
        ("model.layers.1.c", vec![5, 5]),
    ]
    .into_iter()
    .map(|(n, s)| {
        let len: usize = s.iter().product();
        (
            n.to_string(),
            Bits {
                shape: s,
                data: (0..len).map(|_| r.gen_bool(p) as u8).collect(),
            },
        )
    })
    .collect()
}

#[test]
fn random_like_has_exact_counts_and_is_seed_reproducible() {
    let like = region::to_mask(&random_region(3, 0.3)).unwrap();
    let a = region::random::random_like(&like, 42).unwrap();
    let b = region::random::random_like(&like, 42).unwrap();
    let c = region::random::random_like(&like, 43).unwrap();
    assert_eq!(a, b, "same seed, same region");
    assert_ne!(a, c, "another seed, another region");
    for (n, x) in &like {
        assert_eq!(a[n].count(), x.count(), "{n}");
        assert_eq!(a[n].shape, x.shape);
    }
    // the index draw selects exactly the entries of the byte draw with the same seed
    for (n, x) in &like {
        let s = 42 ^ region::random::name_hash(n).rotate_left(17);
        let bits = region::random::random_bits(&x.shape, x.count(), s);
        assert_eq!(a[n].to_bits(), bits.data, "{n}");
    }
    // uniform: over many seeds every entry of a 30-entry tensor with 9 picked is chosen ~30%
    let one = region::to_mask(
        &[(
            "x".to_string(),
            Bits {
                shape: vec![30],
                data: [vec![1u8; 9], vec![0; 21]].concat(),
            },
        )]
        .into(),
    )
    .unwrap();
    let mut hits = [0u32; 30];
    for s in 0..4000 {
        for (i, &v) in region::random::random_like(&one, s).unwrap()["x"]
            .to_bits()
            .iter()
            .enumerate()
        {
            hits[i] += v as u32;
        }
    }
    for (i, &h) in hits.iter().enumerate() {
        assert!(
            (1000..1400).contains(&h),
            "entry {i} chosen {h} times of 4000 (expected ~1200)"
        );
    }
}

#[test]
fn ops_and_compare_match_brute_force() {
    let a = random_region(10, 0.4);
    let b = random_region(11, 0.25);
    let u = apply(SetOp::Union, &a, &b);
    let i = apply(SetOp::Intersect, &a, &b);
    let m = apply(SetOp::Minus, &a, &b);
    let (per, total) = compare(&a, &b);
    let (mut ta, mut tb, mut tboth) = (0u64, 0u64, 0u64);
    for (o, (n, x)) in per.iter().zip(&a) {
        let y = &b[n];
        let (mut ca, mut cb, mut both, mut either) = (0u64, 0u64, 0u64, 0u64);
        for j in 0..x.data.len() {
            let (p, q) = (x.data[j] == 1, y.data[j] == 1);
            assert_eq!(u[n].data[j] == 1, p || q);
            assert_eq!(i[n].data[j] == 1, p && q);
            assert_eq!(m[n].data[j] == 1, p && !q);
            ca += p as u64;
            cb += q as u64;
            both += (p && q) as u64;
            either += (p || q) as u64;
        }
        assert_eq!(o.name, *n);
        assert_eq!((o.a, o.b, o.both), (ca, cb, both));
        assert!((o.jaccard - both as f64 / either as f64).abs() < 1e-12);
        assert!((o.of_a - both as f64 / ca as f64).abs() < 1e-12);
        assert!((o.of_b - both as f64 / cb as f64).abs() < 1e-12);
        ta += ca;
        tb += cb;
        tboth += both;
    }
    assert_eq!((total.a, total.b, total.both), (ta, tb, tboth));
    assert!((total.jaccard - tboth as f64 / (ta + tb - tboth) as f64).abs() < 1e-12);
    let (_, self_total) = compare(&a, &a);
    assert_eq!(self_total.jaccard, 1.0);
}

#[test]
fn masks_of_different_layouts_are_refused() {
    let a = random_region(1, 0.5);
    let mut b = a.clone();
    b.insert("model.layers.0.b".into(), Bits::zeros(&[31]));
    let err = region::check_same_layout(&a, &b, "A.safetensors", "B.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("B.safetensors") && err.contains("model.layers.0.b") && err.contains("[31]"),
        "{err}"
    );
    let mut c = a.clone();
    c.remove("model.layers.1.c");
    let err = region::check_same_layout(&a, &c, "A.safetensors", "C.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("C.safetensors") && err.contains("model.layers.1.c"),
        "{err}"
    );
}

#[test]
fn both_cut_methods_equal_full_sort() {
    use broca::region::select::{apply, cut_using, CutMethod};
    for seed in 0..20 {
        for ties in [false, true] {
            let scores = random_scores(900 + seed, ties);
            let values: Vec<&[f32]> = scores.values().map(|d| d.data.as_slice()).collect();
            let total: usize = values.iter().map(|v| v.len()).sum();
            for count in [1, 2, total / 10, total / 2, total - 1, total] {
                for dir in [Direction::Top, Direction::Bottom] {
                    let want = brute_select(&values, count, dir);
                    for method in [CutMethod::Candidates, CutMethod::Radix, CutMethod::Auto] {
                        let c = cut_using(&values, count as u64, dir, method);
                        let got: Vec<Vec<u8>> = values
                            .iter()
                            .zip(&c.ties)
                            .map(|(v, &t)| apply(v, c.rank, t, dir))
                            .collect();
                        assert_eq!(
                            got, want,
                            "seed {seed} ties {ties} count {count} {dir:?} {method:?}"
                        );
                    }
                }
            }
        }
    }
    // a mass of equal values too big to gather still selects exactly, lower index first
    let big = vec![2.0f32; 300_000];
    let c = cut_using(&[&big], 1234, Direction::Top, CutMethod::Auto);
    let m = apply(&big, c.rank, c.ties[0], Direction::Top);
    assert_eq!(m.iter().map(|&b| b as usize).sum::<usize>(), 1234);
    assert!(m[..1234].iter().all(|&b| b == 1));
}

/// The tensor-by-tensor recipe selects exactly what the whole-in-memory selection does, for
/// core regions (both directions) and the monolingual regions, per tensor and global.
#[test]
fn streamed_regions_equal_the_in_memory_selection() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = score_files(dir.path());
    let (_, sum) = region::scores::sum_abs(&paths, Coverage::Layers).unwrap();
    for scope in [Scope::PerTensor, Scope::Global] {
        for dir in [Direction::Top, Direction::Bottom] {
            let ks = [0.05, 0.2];
            let (langs, got) =
                region::build::core(&paths, &ks, dir, scope, Coverage::Layers).unwrap();
            assert_eq!(langs, vec!["ar", "es", "zh"]);
            for (k, m) in ks.iter().zip(&got) {
                let want = region::select::select(&sum, *k, dir, scope);
                assert_eq!(region::from_mask(m), want, "{scope:?} {dir:?} k={k}");
            }
        }
        let m = region::build::mono_all(&paths, 0.2, scope, Coverage::Layers).unwrap();
        for (i, f) in paths.iter().enumerate() {
            let (_, s) = region::scores::read_abs(f, Coverage::Layers).unwrap();
            let top = region::select::select(&s, 0.2, Direction::Top, scope);
            assert_eq!(region::from_mask(&m.tops[i]), top, "{scope:?} top {i}");
            let (per, total) = region::build::compare(&m.monos[i], &m.tops[i]);
            assert_eq!(total.both, total.a, "a mono region lies inside its top-k");
            assert!(per.iter().all(|o| o.both <= o.b));
        }
    }
}
