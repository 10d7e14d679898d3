//! Broca: find, test and use the linguistic regions of large language models.
//!
//! Modules, one per concept: [`model`] (checkpoints, forward with autograd), [`tokenizer`],
//! [`data`] (text inputs and windows), [`eval`] (perplexity, bits per byte), [`bench`],
//! [`io`] (atomic output files, temporary names), [`lock`] (one writer per output),
//! [`memory`] (budgets and plans), [`synth`] (random checkpoints with a real model's shapes),
//! [`progress`] (progress bars on stderr), [`validate`] (number checks shared by flags and
//! config files) and [`cli`], which the library never imports.

pub mod bench;
pub mod cli;
pub mod data;
pub mod eval;
pub mod generate;
pub mod io;
pub mod lock;
pub mod mask;
pub mod memory;
pub mod model;
pub mod perturb;
pub mod progress;
pub mod region;
pub mod report;
pub mod safetensors_writer;
pub mod score;
pub mod study;
pub mod synth;
pub mod tokenizer;
pub mod train;
pub mod validate;

pub use model::{Config, Model};
