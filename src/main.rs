fn main() {
    // candle's CPU thread pool spins at barriers; with few cores that costs more than it saves.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Error messages are one line: never let a library attach a backtrace to them.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    keep_freed_memory();
    let cli = match broca::cli::args::parse() {
        broca::cli::args::Parsed::Run(cli) => *cli,
        broca::cli::args::Parsed::Exit(code) => std::process::exit(code),
    };
    // Ctrl-C, SIGTERM, SIGHUP: remove this run's lock and temporary files, then exit.
    broca::io::cleanup_on_signals();
    let res = broca::cli::run(cli);
    // locks and temporary files of the run are dropped by now; nothing may outlive it
    broca::io::cleanup_now();
    if let Err(e) = res {
        if broca::cli::output::is_stdout_closed(&e) {
            // the reader of our stdout went away (`broca … | head -1`): a quiet end
            std::process::exit(0);
        }
        broca::cli::output::error_line(&format!("{e:#}"));
        std::process::exit(1);
    }
}

/// Lets glibc's malloc keep freed memory for reuse instead of returning every large buffer to
/// the kernel: each forward/backward allocates and frees the same few hundred MB of
/// activations and gradients, and fresh pages cost a page fault, a zeroing and a cgroup
/// charge each (≈10% of a forward+backward, all on the main thread). Peak RSS is unchanged:
/// the same sizes come back every window. Two arenas: rayon's workers allocate gemm's
/// packing buffers from per-thread arenas, whose extra heaps glibc unmaps whenever they empty
/// (whatever the trim threshold), so products fault their buffers in afresh; fewer arenas
/// fault less (6 SmolLM2 score windows: 591k faults with glibc's default, 539k with 2, 476k
/// with 1), but with a single arena the tokenizer's threads queue on its lock (a 4 MB text:
/// 7.3 s instead of 2.6 s). `MALLOC_*` environment variables still win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        let set = |var: &str, param: i32, value: i32| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator tunables; called before any thread
                // is started.
                unsafe { mallopt(param, value) };
            }
        };
        set("MALLOC_MMAP_MAX_", M_MMAP_MAX, 0);
        set("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, i32::MAX);
        set("MALLOC_ARENA_MAX", M_ARENA_MAX, 2);
    }
}
