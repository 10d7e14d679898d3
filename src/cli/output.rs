//! Standard output and the final error line. Every result on stdout (tables and `--json`)
//! goes through [`write_out`] (or the [`outln!`](crate::outln) macro), which returns an error
//! instead of panicking: a closed pipe (`broca ppl … | head -1`) becomes [`StdoutClosed`],
//! which `main` turns into a quiet exit 0, as Unix tools do; any other write error (a full
//! disk) becomes one `error: stdout: …` line and exit 1.

use anyhow::Result;
use std::io::Write;

/// Standard output was closed by its reader (EPIPE): stop quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout: closed by the reader")]
pub struct StdoutClosed;

fn out_err(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::anyhow!("stdout: cannot write: {e}")
    }
}

/// Writes formatted text on stdout and flushes it.
pub fn write_out(args: std::fmt::Arguments) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).map_err(out_err)?;
    out.flush().map_err(out_err)
}

/// Like `println!`, through [`write_out`]: evaluates to `anyhow::Result<()>`.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Like `print!`, through [`write_out`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_out(format_args!($($arg)*))
    };
}

/// Prints one JSON object on stdout.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    write_out(format_args!("{s}\n"))
}

/// Whether an error only says that stdout was closed by its reader.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Prints `error: MSG` as one line on stderr (newlines in MSG become spaces); a closed or
/// full stderr is ignored (there is nowhere left to report to).
pub fn error_line(msg: &str) {
    let one = msg.replace(['\n', '\r'], " ");
    let _ = writeln!(std::io::stderr().lock(), "error: {one}");
}
