//! Checks of numbers shared by the command-line flags and the study's config file, so that
//! both refuse the same values with the same words.

/// `x` if it is at least `min` (the check behind the whole-number flag parsers, also used
/// for config files).
pub fn at_least(x: usize, min: usize) -> Result<usize, String> {
    if x < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(x)
}

/// `x` if it is finite and greater than 0.
pub fn finite_positive(x: f64) -> Result<f64, String> {
    if !x.is_finite() {
        return Err(format!("must be a finite number, not {x}"));
    }
    if x <= 0.0 {
        return Err("must be greater than 0".into());
    }
    Ok(x)
}
