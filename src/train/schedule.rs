//! Learning-rate schedules: linear warmup, then cosine decay to 0 or constant.

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Constant,
}

/// Learning rate of step `step` (0-based) of `total`. Warmup is capped at `total` and is
/// `lr·(step+1)/warmup`, so the first step already has a positive rate and the last warmup
/// step reaches `lr`. Cosine then decays as `lr·½(1 + cos(π·p))`, `p = (step − warmup) /
/// (total − warmup)`, which stays above 0 on every step that is taken.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, schedule: Schedule) -> f64 {
    let w = warmup.min(total);
    if step < w {
        return lr * (step + 1) as f64 / w as f64;
    }
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let p = (step - w) as f64 / (total - w).max(1) as f64;
            lr * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_capped_and_starts_positive() {
        // warmup 100 over 10 steps: capped at 10, linear to lr
        assert_eq!(lr_at(0, 10, 100, 1.0, Schedule::Cosine), 0.1);
        assert_eq!(lr_at(9, 10, 100, 1.0, Schedule::Cosine), 1.0);
        assert_eq!(lr_at(0, 5, 0, 2.0, Schedule::Constant), 2.0);
    }

    #[test]
    fn cosine_decays_to_near_zero() {
        assert_eq!(lr_at(2, 12, 2, 1.0, Schedule::Cosine), 1.0);
        let mid = lr_at(7, 12, 2, 1.0, Schedule::Cosine);
        assert!((mid - 0.5).abs() < 1e-12, "{mid}");
        let last = lr_at(11, 12, 2, 1.0, Schedule::Cosine);
        assert!(last > 0.0 && last < 0.03, "{last}");
        assert_eq!(lr_at(11, 12, 2, 1.0, Schedule::Constant), 1.0);
    }
}
