//! Output files are written atomically: to a temporary file beside the target, then renamed,
//! so a crash never leaves a half-written result.
//!
//! Temporary names are `.NAME.broca-PID.tmp` beside the target (files and checkpoint folders
//! alike, see [`temp_path`]). Each one is held by a [`TempPath`], which removes it unless it
//! was renamed into place, and is registered so that a Ctrl-C or SIGTERM removes it too
//! ([`cleanup_on_signals`]). What a SIGKILL leaves behind is swept by the next run
//! ([`sweep_stale`]): names of this tool whose process is gone.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A candle error as one line of text, without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set (error messages stay one line).
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_msg(inner))
        }
        e => e.to_string().replace('\n', " "),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Creates a temporary file beside `path`, lets `write` fill it, syncs it and renames it
/// to `path`; on any error the temporary file is removed and `path` is left untouched.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        }
    }
    let res = (|| -> Result<()> {
        let (tmp, mut f) = TempPath::create_file(temp_path(path))?;
        write(&mut f)?;
        f.sync_all()?;
        tmp.rename_to(path)
    })();
    // on error, dropping `tmp` removes the temporary file
    res.with_context(|| format!("{}: cannot write", path.display()))
}

/// The temporary name of `path` for this process: `.NAME.broca-PID.tmp` beside it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.broca-{}.tmp", std::process::id()))
}

/// Extensions of the files Broca writes: an older temporary name `.NAME.PID.tmp` counts as
/// this tool's only when NAME ends with one of them.
const OWN_EXTENSIONS: [&str; 7] = [
    ".safetensors",
    ".json",
    ".csv",
    ".png",
    ".html",
    ".toml",
    ".txt",
];

/// The process id in a temporary name this tool makes (`.NAME.broca-PID.tmp`; the older
/// `.NAME.PID.tmp` of Broca's own files and `.step-N.PID.tmp` / `.step-N.tmp-PID` of
/// checkpoints), or `None` for any other name.
pub fn temp_name_pid(name: &str) -> Option<u32> {
    let digits = |p: &str| -> Option<u32> {
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    let inner = name.strip_prefix('.')?;
    if let Some(rest) = inner.strip_suffix(".tmp") {
        let (stem, tail) = rest.rsplit_once('.')?;
        if let Some(pid) = tail.strip_prefix("broca-") {
            return digits(pid);
        }
        let ours = stem.starts_with("step-") || OWN_EXTENSIONS.iter().any(|e| stem.ends_with(e));
        return if ours { digits(tail) } else { None };
    }
    if inner.starts_with("step-") {
        let (_, pid) = inner.rsplit_once(".tmp-")?;
        return digits(pid);
    }
    None
}

/// Whether process `pid` is running (on non-Unix systems: assumed so).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(p) = i32::try_from(pid) else {
            return false;
        };
        if p <= 0 {
            return false;
        }
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes, in `dir` and `depth` levels of folders below it (not following links nor
/// entering hidden folders other than `.partial`), the temporary names of this tool whose
/// process is gone ([`temp_name_pid`]) and lock files that no process holds
/// ([`crate::lock`]). A missing `dir` is fine; entries that cannot be removed are left; at
/// most 100,000 entries are looked at.
pub fn sweep_stale(dir: &Path, depth: usize) {
    fn walk(dir: &Path, depth: usize, budget: &mut usize) {
        let Ok(rd) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) else {
            return;
        };
        for e in rd.flatten() {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if let Some(pid) = temp_name_pid(&name) {
                if pid != std::process::id() && !process_alive(pid) {
                    remove_any(&p);
                }
                continue;
            }
            if ft.is_file() && crate::lock::is_lock_name(&name) {
                crate::lock::remove_if_stale(&p);
                continue;
            }
            if ft.is_dir() && depth > 0 && (!name.starts_with('.') || name == ".partial") {
                walk(&p, depth - 1, budget);
            }
        }
    }
    walk(dir, depth, &mut 100_000);
}

/// Removes a file, or a folder with its contents; errors are ignored.
fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Deletes a folder through a rename: first to its temporary name, then recursively, so an
/// interrupted delete leaves a name [`sweep_stale`] removes, never a half-deleted folder under
/// its real name.
pub fn remove_dir_atomic(dir: &Path) -> Result<()> {
    let tmp = TempPath::make(temp_path(dir), |t| std::fs::rename(dir, t))
        .with_context(|| format!("{}: cannot remove", dir.display()))?;
    std::fs::remove_dir_all(tmp.path()).with_context(|| format!("{}: cannot remove", dir.display()))
}

/// What a signal does to a registered path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSignal {
    /// Remove the file, or the folder with its contents (temporary names, lock files).
    Remove,
    /// Remove the folder only if it is empty (a folder this run created for its output).
    RemoveIfEmpty,
}

/// Paths to clean up if the process is told to stop. Its mutex also guards the creation of
/// each registered path ([`Registered::make`]), and the signal handler keeps it until the
/// process exits, so nothing registrable is created after the clean-up.
type Registry = Vec<(u64, PathBuf, OnSignal)>;
static IN_USE: std::sync::Mutex<Registry> = std::sync::Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    IN_USE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registration in the signal clean-up list; dropping it unregisters the path.
#[derive(Debug)]
pub struct Registered(u64);

impl Registered {
    /// Registers `path` (made already, or not made by this process) for clean-up on
    /// Ctrl-C / SIGTERM / SIGHUP.
    pub fn new(path: &Path, how: OnSignal) -> Registered {
        let mut l = registry();
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        l.push((id, path.to_path_buf(), how));
        Registered(id)
    }

    /// Makes `path` with `create` and registers it in one step (registered only if `create`
    /// succeeds): a signal's clean-up either sees it registered or runs before it exists (and
    /// then it is never made).
    pub fn make<T, E>(
        path: &Path,
        how: OnSignal,
        create: impl FnOnce(&Path) -> std::result::Result<T, E>,
    ) -> std::result::Result<(T, Registered), E> {
        let mut l = registry();
        let v = create(path)?;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        l.push((id, path.to_path_buf(), how));
        Ok((v, Registered(id)))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        registry().retain(|(id, _, _)| *id != self.0);
    }
}

/// A temporary file or folder name: removed when dropped unless [`TempPath::rename_to`]
/// moved it into place, and removed on Ctrl-C / SIGTERM / SIGHUP.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    live: bool,
    _reg: Registered,
}

impl TempPath {
    /// Makes the temporary `path` with `create` (creating a file or folder, renaming
    /// something to it) and takes charge of it; on error nothing is left.
    pub fn make(
        path: PathBuf,
        create: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<TempPath> {
        // a failed `create` may have left something (a partly created folder)
        match Registered::make(&path, OnSignal::Remove, create) {
            Ok(((), reg)) => Ok(TempPath {
                path,
                live: true,
                _reg: reg,
            }),
            Err(e) => {
                remove_any(&path);
                Err(e)
            }
        }
    }

    /// Creates the temporary file `path` (truncating one left there) and opens it for writing.
    pub fn create_file(path: PathBuf) -> std::io::Result<(TempPath, std::fs::File)> {
        let (file, reg) = Registered::make(&path, OnSignal::Remove, |p| std::fs::File::create(p))?;
        let t = TempPath {
            path,
            live: true,
            _reg: reg,
        };
        Ok((t, file))
    }

    /// Creates the temporary folder `path` (empty: one left there is removed first).
    pub fn create_dir(path: PathBuf) -> std::io::Result<TempPath> {
        TempPath::make(path, |p| {
            if p.exists() {
                std::fs::remove_dir_all(p)?;
            }
            std::fs::create_dir_all(p)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary file or folder to `dest` (replacing a file there).
    pub fn rename_to(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest)?;
        self.live = false;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.live {
            remove_any(&self.path);
        }
    }
}

fn clean(paths: &Registry) {
    // newest first: files inside a folder this run created go before the folder
    for (_, p, how) in paths.iter().rev() {
        match how {
            OnSignal::Remove => {
                remove_any(p);
                // a folder another thread was still filling: once more
                if p.exists() {
                    remove_any(p);
                }
            }
            OnSignal::RemoveIfEmpty => {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// Removes every registered temporary name and lock file now (the end of `main`).
pub fn cleanup_now() {
    let paths = registry().clone();
    clean(&paths);
}

/// On Ctrl-C, SIGTERM or SIGHUP: removes every registered temporary name and lock file and
/// exits with 128 + the signal number, holding the registry so that no other thread makes a
/// new one meanwhile. Call once, from `main`.
pub fn cleanup_on_signals() {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let held = registry();
                clean(&held);
                std::process::exit(128 + sig);
            }
        });
    }
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    atomic_write(path, s.as_bytes())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Reads a safetensors file: every tensor (as stored) and the string metadata.
pub fn read_safetensors(
    path: &Path,
) -> Result<(
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, String>,
)> {
    let bytes = std::fs::read(path).with_context(|| {
        if path.exists() {
            format!("{}: cannot read", path.display())
        } else {
            format!("{}: no such file", path.display())
        }
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file: {}",
                path.display(),
                candle_msg(&e)
            )
        })?;
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_of_this_tool_only() {
        let me = temp_path(Path::new("d/x.safetensors"));
        let me = me.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_name_pid(me), Some(std::process::id()));
        assert_eq!(temp_name_pid(".step-4.broca-77.tmp"), Some(77));
        assert_eq!(temp_name_pid(".ar.state.safetensors.12.tmp"), Some(12));
        assert_eq!(temp_name_pid(".eval.csv.12.tmp"), Some(12));
        assert_eq!(temp_name_pid(".step-4.12.tmp"), Some(12));
        assert_eq!(temp_name_pid(".step-4.tmp-12"), Some(12));
        for other in [
            ".notes.12.tmp",
            "x.safetensors.12.tmp",
            ".x.safetensors.tmp",
            ".x.safetensors.+12.tmp",
            ".x.safetensors.broca-.tmp",
            ".tmp",
            "..tmp",
        ] {
            assert_eq!(temp_name_pid(other), None, "{other}");
        }
    }
}
