//! Further pretraining with frozen regions: a fused masked AdamW ([`adamw`]), learning-rate
//! schedules ([`schedule`]), the shuffled window stream ([`stream`]), resumable checkpoints
//! ([`checkpoint`]), evaluation curves ([`curves`]), the loop ([`trainer`]) and the
//! forgetting and compensation experiments ([`forget`], plotted by [`plot`]).

pub mod adamw;
pub mod checkpoint;
pub mod curves;
pub mod forget;
pub mod plot;
pub mod schedule;
pub mod stream;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{lr_at, Schedule};
pub use trainer::{into_f32, train, trainable, RunOptions, TrainConfig, TrainInputs, TrainReport};
