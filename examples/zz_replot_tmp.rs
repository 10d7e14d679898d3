// temporary: re-draw dims.png from dims.json with the current plot code
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("dims.json")).unwrap()).unwrap();
    let mut rows: Vec<(usize, f64)> = v["dims"].as_array().unwrap().iter().map(|r| (r["dim"].as_u64().unwrap() as usize, r["screen_ppl"].as_f64().unwrap())).collect();
    rows.sort_by_key(|r| r.0);
    let langs: Vec<&str> = v["languages"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    let base = v["base_screen_ppl"].as_f64().unwrap();
    let title = format!("{} {}: screen ppl (geomean {}, log scale) vs dimension; dashed = base {:.2}", v["norm"].as_str().unwrap().trim_end_matches(".weight"), v["op"].as_str().unwrap(), langs.join(" "), base);
    let d: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let p: Vec<f64> = rows.iter().map(|r| r.1).collect();
    broca::perturb::plot::ppl_by_dim(&dir.join("dims.png"), &title, &d, &p, base, 10).unwrap();
}
