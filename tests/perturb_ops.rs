//! Perturbation operations: exact restore, seeded reproducibility, control sizes.

use broca::mask::{Mask, MaskTensor};
use broca::model::{Arch, Config, Model};
use broca::perturb::ops::{self, Op};
use broca::perturb::select::{self, Control};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn tiny(dtype: DType) -> Model {
    Model::random(Config::tiny(Arch::Llama), dtype, 3).unwrap()
}

/// Every parameter's raw bits (f32 and f64 models).
fn bits(model: &Model) -> Vec<(String, Vec<u64>)> {
    model
        .params
        .iter()
        .map(|p| {
            let t = p.var().unwrap().as_tensor().flatten_all().unwrap();
            let b = match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect(),
                DType::F64 => t
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            (p.name.clone(), b)
        })
        .collect()
}

/// A random mask over a few tensors of each kind (matrices, norms, embeddings), ~20% dense.
fn random_mask(model: &Model, seed: u64) -> Mask {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Mask::new();
    for p in &model.params {
        if !(p.name.contains("layers.0.")
            || p.name.contains("layers.1.mlp")
            || p.name == "model.norm.weight")
        {
            continue;
        }
        let v: Vec<u8> = (0..p.var().unwrap().elem_count())
            .map(|_| (rng.gen::<f64>() < 0.2) as u8)
            .collect();
        m.insert(
            p.name.clone(),
            MaskTensor::from_bits(&p.name, &p.shape, &v).unwrap(),
        );
    }
    m
}

fn all_ops() -> Vec<Op> {
    [
        "zero",
        "randomize",
        "randomize-uniform",
        "scale:10",
        "scale:-0.5",
        "noise:0.1",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

#[test]
fn perturb_then_restore_is_bitwise_exact_for_every_op() {
    for dtype in [DType::F32, DType::F64] {
        let model = tiny(dtype);
        let before = bits(&model);
        let mask = random_mask(&model, 11);
        let n_masked: usize = mask.values().map(|t| t.count()).sum();
        for op in all_ops() {
            let saved = ops::apply(&model, &mask, &op, 5).unwrap();
            assert_eq!(saved.count(), n_masked);
            let during = bits(&model);
            // only masked entries may change, and (for these ops) most of them do
            let mut changed = 0;
            for ((name, a), (_, b)) in before.iter().zip(&during) {
                let idx: std::collections::HashSet<usize> = mask
                    .get(name)
                    .map(|t| t.indices().into_iter().collect())
                    .unwrap_or_default();
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    if x != y {
                        assert!(idx.contains(&i), "{op}: unmasked entry {name}[{i}] changed");
                        changed += 1;
                    }
                }
            }
            assert!(
                changed * 10 >= n_masked * 9,
                "{op}: only {changed} of {n_masked} entries changed"
            );
            ops::restore(&model, saved).unwrap();
            assert!(
                bits(&model) == before,
                "{op} ({dtype:?}): restore is not bitwise exact"
            );
        }
    }
}

#[test]
fn zero_and_scale_set_the_expected_values() {
    let model = tiny(DType::F64);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let w = ops::values_f64(model.param(name).unwrap().var().unwrap().as_tensor()).unwrap();
    let mask = ops::entries_mask(&model, name, &[0, 5, 17]).unwrap();
    let s = ops::apply(&model, &mask, &"scale:4".parse().unwrap(), 0).unwrap();
    let v = ops::values_f64(model.param(name).unwrap().var().unwrap().as_tensor()).unwrap();
    assert_eq!(
        (v[0], v[5], v[17], v[1]),
        (w[0] * 4.0, w[5] * 4.0, w[17] * 4.0, w[1])
    );
    ops::restore(&model, s).unwrap();
    let s = ops::apply(&model, &mask, &Op::Zero, 0).unwrap();
    let v = ops::values_f64(model.param(name).unwrap().var().unwrap().as_tensor()).unwrap();
    assert_eq!((v[0], v[5], v[17], v[2]), (0.0, 0.0, 0.0, w[2]));
    ops::restore(&model, s).unwrap();
}

#[test]
fn seeded_randomize_is_reproducible_and_matches_the_tensor_statistics() {
    let model = tiny(DType::F64);
    let name = "model.layers.1.mlp.up_proj.weight";
    let n = model.param(name).unwrap().elem_count();
    let w = ops::values_f64(model.param(name).unwrap().var().unwrap().as_tensor()).unwrap();
    let (m0, s0) = ops::mean_std(&w);
    let all: Vec<usize> = (0..n).collect();
    let mask = ops::entries_mask(&model, name, &all).unwrap();
    let draw = |op: &Op, seed: u64| {
        let s = ops::apply(&model, &mask, op, seed).unwrap();
        let v = ops::values_f64(model.param(name).unwrap().var().unwrap().as_tensor()).unwrap();
        ops::restore(&model, s).unwrap();
        v
    };
    for op in [Op::Randomize, Op::RandomizeUniform] {
        let a = draw(&op, 42);
        assert_eq!(a, draw(&op, 42), "{op}: same seed, different values");
        assert_ne!(a, draw(&op, 43), "{op}: different seeds, same values");
        let (m, s) = ops::mean_std(&a);
        assert!(
            (m - m0).abs() < 0.1 * s0,
            "{op}: mean {m} vs tensor mean {m0}"
        );
        assert!(
            (s / s0 - 1.0).abs() < 0.1,
            "{op}: std {s} vs tensor std {s0}"
        );
    }
    // uniform stays within mean ± sqrt(3)·std
    let u = draw(&Op::RandomizeUniform, 1);
    assert!(u.iter().all(|x| (x - m0).abs() <= 3f64.sqrt() * s0 + 1e-12));
}

#[test]
fn op_parsing_accepts_the_forms_and_rejects_the_rest() {
    assert_eq!("scale:10".parse::<Op>().unwrap(), Op::Scale(10.0));
    assert_eq!("noise:0.5".parse::<Op>().unwrap(), Op::Noise(0.5));
    assert_eq!(
        ops::parse_ops(&["zero,randomize".into()]).unwrap(),
        vec![Op::Zero, Op::Randomize]
    );
    for (bad, msg) in [
        ("explode", "unknown op"),
        ("scale", "needs a value"),
        ("scale:x", "not a number"),
        ("noise:-1", "negative"),
    ] {
        let e = bad.parse::<Op>().unwrap_err().to_string();
        assert!(e.contains(msg), "'{bad}' gave '{e}'");
    }
}

#[test]
fn controls_have_the_regions_per_tensor_counts_and_the_right_entries() {
    let model = tiny(DType::F32);
    let region = random_mask(&model, 2);
    let dir = tempfile::tempdir().unwrap();
    // two score files; bottom/top use the sum of |score|
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut files = Vec::new();
    let mut shapes = BTreeMap::new();
    let mut sum: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for f in 0..2 {
        let mut ts = Vec::new();
        for p in &model.params {
            // coarse values so that ties occur
            let v: Vec<f32> = (0..p.var().unwrap().elem_count())
                .map(|_| rng.gen_range(-3i32..=3) as f32)
                .collect();
            let acc = sum
                .entry(p.name.clone())
                .or_insert_with(|| vec![0.0; v.len()]);
            acc.iter_mut().zip(&v).for_each(|(a, x)| *a += x.abs());
            ts.push((
                p.name.clone(),
                Tensor::from_vec(v, p.var().unwrap().dims(), &Device::Cpu).unwrap(),
            ));
            shapes.insert(p.name.clone(), p.var().unwrap().dims().to_vec());
        }
        let path = dir.path().join(format!("l{f}.safetensors"));
        broca::model::hf::save_safetensors(&path, &ts, None).unwrap();
        files.push(path);
    }
    let region_shapes: BTreeMap<String, Vec<usize>> = region
        .keys()
        .map(|n| (n.clone(), shapes[n].clone()))
        .collect();
    let sf = broca::region::scores::ScoreFiles::open(&files).unwrap();
    let mut scores = BTreeMap::new();
    for (n, shape) in &region_shapes {
        let s = sf.abs_sum(n, shape).unwrap();
        assert_eq!(s, sum[n], "{n}: summed |score| wrong");
        scores.insert(n.clone(), s);
    }
    for kind in [Control::Random, Control::Bottom, Control::Top] {
        let c = select::control(&region, kind, Some(&sf), 4).unwrap();
        // the in-memory sums select the same entries as the mapped files
        let c2 = select::control(&region, kind, Some(&scores), 4).unwrap();
        assert_eq!(c, c2, "{kind:?}: file and in-memory scores differ");
        assert_eq!(
            c.keys().collect::<Vec<_>>(),
            region.keys().collect::<Vec<_>>()
        );
        for (n, m) in &region {
            let want = m.count();
            let got = c[n].indices();
            assert_eq!(
                got.len(),
                want,
                "{}: {n} has {} entries, region has {want}",
                kind.label("r"),
                got.len()
            );
            if kind != Control::Random {
                // brute force: sort by (score, index), ascending for bottom, descending for top
                let s = &scores[n];
                let mut idx: Vec<usize> = (0..s.len()).collect();
                idx.sort_by(|&a, &b| {
                    let o = s[a].total_cmp(&s[b]);
                    (if kind == Control::Top { o.reverse() } else { o }).then(a.cmp(&b))
                });
                let mut exp = idx[..want].to_vec();
                exp.sort_unstable();
                assert_eq!(got, exp, "{n}: {kind:?} selection differs from brute force");
            }
        }
    }
    // random control: reproducible per seed
    let a = select::control(&region, Control::Random, None, 4).unwrap();
    let b = select::control(&region, Control::Random, None, 4).unwrap();
    let c = select::control(&region, Control::Random, None, 5).unwrap();
    let idx = |m: &Mask| m.values().map(|t| t.indices()).collect::<Vec<_>>();
    assert_eq!(idx(&a), idx(&b));
    assert_ne!(idx(&a), idx(&c));
    assert!(select::control(&region, Control::Top, None, 0).is_err());
}
