//! Seeded mutations of checkpoint files for tests/hostile_fuzz.rs.

pub mod gguf;
pub mod hf;
