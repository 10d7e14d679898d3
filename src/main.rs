use clap::Parser;

fn main() {
    // candle's CPU thread pool spins at barriers; with few cores that costs more than it saves.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Run candle's elementwise ops on the calling thread: handing half of each small op to a
    // parked worker costs more than it saves on 2 cores (matmuls and the fused kernels in
    // model::fused still use every core through rayon). See BENCHMARKS.md.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Error messages are one line: never let a library attach a backtrace to them.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = broca::cli::Cli::parse();
    if let Err(e) = broca::cli::run(cli) {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
