//! Command-line parsing that never panics and never answers in more than one line: value
//! parsers for numeric flags (range-checked, NaN and infinities refused, the flag's name in
//! clap's message), the tweak that lets negative numbers reach those checks, and the mapping
//! of every clap error to the one `error: …` line and exit code 1 of CONVENTIONS.md.
//!
//! Use the parsers as `#[arg(long, value_parser = args::seq_len)]`; clap reports a refusal as
//! `invalid value 'X' for '--flag <FLAG>': REASON`, so REASON does not repeat the flag.

pub use crate::validate::{at_least, finite_positive};
use clap::error::ErrorKind;
use std::str::FromStr;

fn number<T: FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("not {what}"))
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = number(s, "a number")?;
    if !x.is_finite() {
        return Err(format!("must be a finite number, not {s}"));
    }
    Ok(x)
}

fn whole_at_least(s: &str, min: usize) -> Result<usize, String> {
    at_least(number(s, "a whole number")?, min)
}

/// Any finite number.
pub fn finite_f64(s: &str) -> Result<f64, String> {
    finite(s)
}

/// A finite number ≥ 0.
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x < 0.0 {
        return Err("must not be negative".into());
    }
    Ok(x)
}

/// A finite number > 0.
pub fn positive_f64(s: &str) -> Result<f64, String> {
    finite_positive(finite(s)?)
}

/// A fraction in (0, 1] (a region's k, top-p).
pub fn fraction(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(x > 0.0 && x <= 1.0) {
        return Err("must be a fraction in (0, 1]".into());
    }
    Ok(x)
}

/// A whole number ≥ 0.
pub fn count(s: &str) -> Result<usize, String> {
    whole_at_least(s, 0)
}

/// A whole number ≥ 1 (repetitions, batch sizes, steps).
pub fn positive_usize(s: &str) -> Result<usize, String> {
    whole_at_least(s, 1)
}

/// A whole number ≥ 1 (64-bit, e.g. a count of synthetic scores).
pub fn positive_u64(s: &str) -> Result<u64, String> {
    let x: u64 = number(s, "a whole number")?;
    if x == 0 {
        return Err("must be at least 1".into());
    }
    Ok(x)
}

/// A sequence length in tokens: a window makes `n - 1` predictions, so at least 2.
pub fn seq_len(s: &str) -> Result<usize, String> {
    whole_at_least(s, 2)
}

/// A token budget of a text that is scored (token 0 has no context): at least 2.
pub fn token_budget(s: &str) -> Result<usize, String> {
    whole_at_least(s, 2)
}

/// A seed (any 64-bit whole number).
pub fn seed(s: &str) -> Result<u64, String> {
    number(s, "a whole number (0 to 2^64-1)")
}

/// A text that must not be empty (a prompt).
pub fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_string())
}

/// The full command with every numeric flag accepting a leading `-`, so that `--k -0.1` or
/// `--lr -inf` reach the range checks instead of being read as unknown flags.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    fn numeric(a: &clap::Arg) -> bool {
        let t = a.get_value_parser().type_id();
        t == std::any::TypeId::of::<f64>()
            || t == std::any::TypeId::of::<f32>()
            || t == std::any::TypeId::of::<usize>()
            || t == std::any::TypeId::of::<u64>()
            || t == std::any::TypeId::of::<u32>()
            || t == std::any::TypeId::of::<i64>()
    }
    fn tweak(c: clap::Command) -> clap::Command {
        c.mut_args(|a| {
            if numeric(&a) {
                a.allow_hyphen_values(true)
            } else {
                a
            }
        })
        .mut_subcommands(tweak)
    }
    tweak(super::Cli::command())
}

/// What parsing the command line came to: a command to run, or an exit status after text
/// that was already printed (help and version on stdout, a usage error as one line on stderr).
pub enum Parsed {
    Run(Box<super::Cli>),
    Exit(i32),
}

/// Parses the process's arguments (see [`parse_from`]).
pub fn parse() -> Parsed {
    parse_from(std::env::args_os())
}

/// Parses `args`: `--help` and `--version` print their full text on stdout (exit 0); any
/// other problem prints one line `error: …` on stderr (exit 1).
pub fn parse_from<I, T>(args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches;
    let res = command()
        .try_get_matches_from(args)
        .and_then(|m| super::Cli::from_arg_matches(&m));
    match res {
        Ok(cli) => Parsed::Run(Box::new(cli)),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // a closed stdout (`broca --help | head -1`) is not an error
                let _ = e.print();
                Parsed::Exit(0)
            }
            _ => {
                super::output::error_line(&usage_error_line(&e));
                Parsed::Exit(1)
            }
        },
    }
}

/// One line for a clap error: its first paragraph (with the flag it concerns) and its tips,
/// without the usage block and the `--help` hint.
pub fn usage_error_line(e: &clap::Error) -> String {
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "a subcommand is required (see broca --help)".into();
    }
    if let Some(line) = bad_value_line(e) {
        return line;
    }
    let text = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    let mut first = true;
    for para in text.split("\n\n") {
        let lines: Vec<&str> = para
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        if first {
            first = false;
            parts.push(lines.join(" "));
        } else if lines[0].starts_with("tip:") {
            parts.push(lines.join(" "));
        }
    }
    let line = parts.join("; ");
    let line = line.strip_prefix("error:").unwrap_or(&line).trim();
    if line.is_empty() {
        format!("{:?}", e.kind())
    } else {
        line.to_string()
    }
}

/// `--flag VALUE: reason` for a refused value (the form of the checks made after parsing).
fn bad_value_line(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let flag = match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(a) => a.split([' ', '=']).next()?.to_string(),
        _ => return None,
    };
    let value = match e.get(ContextKind::InvalidValue)? {
        ContextValue::String(v) if v.is_empty() => "''".to_string(),
        ContextValue::String(v) => v.clone(),
        _ => return None,
    };
    let reason = match (e.kind(), e.get(ContextKind::ValidValue)) {
        (ErrorKind::InvalidValue, Some(ContextValue::Strings(v))) if !v.is_empty() => {
            format!("expected one of {}", v.join(", "))
        }
        // no value at all: clap's own sentence names the flag
        (ErrorKind::InvalidValue, _) => return None,
        _ => std::error::Error::source(e)?.to_string(),
    };
    Some(format!("{flag} {value}: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_refuse_out_of_range_and_non_finite() {
        assert_eq!(fraction("0.5"), Ok(0.5));
        assert_eq!(fraction("1"), Ok(1.0));
        for bad in ["0", "-0.1", "1.5", "nan", "NaN", "inf", "-inf", "abc", ""] {
            assert!(fraction(bad).is_err(), "{bad}");
        }
        assert!(finite_f64("-3.5").is_ok());
        for bad in ["nan", "inf", "-inf", "1e400"] {
            assert!(finite_f64(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative_f64("0"), Ok(0.0));
        assert!(non_negative_f64("-1e-9").is_err());
        assert!(positive_f64("0").is_err());
        assert_eq!(seq_len("2"), Ok(2));
        for bad in ["0", "1", "-1", "2.5", "x"] {
            assert!(seq_len(bad).is_err(), "{bad}");
        }
        assert!(positive_usize("0").is_err());
        assert_eq!(count("0"), Ok(0));
        assert!(non_empty("  ").is_err());
    }
}
