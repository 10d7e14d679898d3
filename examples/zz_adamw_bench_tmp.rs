use broca::train::adamw::*;
fn main() {
    let n = 134_000_000usize;
    let mut w = vec![0.1f32; n];
    let g = vec![0.01f32; n];
    let mut m = vec![0.0f32; n];
    let mut v = vec![0.0f32; n];
    let mask: Vec<u8> = (0..n).map(|i| (i % 97 == 0) as u8).collect();
    let cfg = AdamWConfig::default();
    for t in 1..=4u64 {
        let c = Coeffs::<f32>::new(&cfg, t, 1e-4, 1.0, true);
        let s = std::time::Instant::now();
        update_slices(&mut w, &g, &mut m, &mut v, None, &c);
        let a = s.elapsed().as_secs_f64();
        let s = std::time::Instant::now();
        update_slices(&mut w, &g, &mut m, &mut v, Some(&mask), &c);
        let b = s.elapsed().as_secs_f64();
        let s = std::time::Instant::now();
        let q = sum_squares(&g, Some(&mask));
        let d = s.elapsed().as_secs_f64();
        println!("unmasked {a:.3}s masked {b:.3}s norm {d:.3}s {q}");
    }
}
