//! Advisory locks on what a command writes, so two runs never write one output at once.
//!
//! A lock is a file `….broca.lock` holding the owner's pid, locked with the operating system's
//! advisory file lock (`flock`; released by the kernel however the process ends). A second
//! run on the same unit fails at once: `error: UNIT: in use by broca pid N`. The lock file is
//! removed when the [`Lock`] is dropped (every normal or error exit; Ctrl-C and SIGTERM
//! through [`crate::io::cleanup_on_signals`]); one left by a SIGKILL holds no lock, so the
//! next run takes it over and [`crate::io::sweep_stale`] removes it.
//!
//! Units: a folder (`DIR/.broca.lock`: train, forget, reproduce, perturb --save), a file
//! (`PARENT/.NAME.broca.lock`: region masks), or a named part of a folder (score's
//! `DIR/.partial/.<lang>[.shard-i-of-n].broca.lock`, so the shards of one study run in
//! parallel).

use crate::io::{OnSignal, Registered};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".broca.lock";
/// How deep [`Lock::dir`] sweeps an output folder (a study's `DIR/scores/.partial/…`).
const SWEEP_DEPTH: usize = 4;

/// A held lock; dropping it removes the lock file (and the folder the lock created, if it
/// is still empty), then releases the lock.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    file: Option<File>,
    /// Folders this lock created for its file (outermost first), removed again if empty.
    created: Vec<PathBuf>,
    /// Swept for stale temporary names when the lock is released.
    sweep: Option<(PathBuf, usize)>,
    _regs: Vec<Registered>,
}

/// Whether `name` is a lock file name of this module.
pub fn is_lock_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(SUFFIX)
}

impl Lock {
    /// Locks the output folder `dir` (creating it if needed) through `DIR/.broca.lock`,
    /// then sweeps what killed runs left in it ([`crate::io::sweep_stale`]).
    pub fn dir(dir: &Path) -> Result<Lock> {
        let l = Lock::acquire(&dir.join(SUFFIX), dir)?;
        crate::io::sweep_stale(dir, SWEEP_DEPTH);
        Ok(l.sweeping(dir, SWEEP_DEPTH))
    }

    /// Locks the output file `path` through `PARENT/.NAME.broca.lock`, then sweeps stale
    /// temporary names beside it.
    pub fn file(path: &Path) -> Result<Lock> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let l = Lock::acquire(&path.with_file_name(format!(".{name}{SUFFIX}")), path)?;
        let parent = l.path.parent().map(Path::to_path_buf).unwrap_or_default();
        crate::io::sweep_stale(&parent, 0);
        Ok(l.sweeping(&parent, 0))
    }

    /// Locks the unit `name` inside folder `dir` through `DIR/.NAME.broca.lock` (errors
    /// name `what`), then sweeps stale temporary names in `dir`.
    pub fn part(dir: &Path, name: &str, what: &Path) -> Result<Lock> {
        let l = Lock::acquire(&dir.join(format!(".{name}{SUFFIX}")), what)?;
        crate::io::sweep_stale(dir, 0);
        Ok(l.sweeping(dir, 0))
    }

    /// Also sweeps `dir` when the lock is released.
    fn sweeping(mut self, dir: &Path, depth: usize) -> Lock {
        self.sweep = Some((dir.to_path_buf(), depth));
        self
    }

    /// Takes the lock at `path`; an error naming `what` if another process holds it.
    pub fn acquire(path: &Path, what: &Path) -> Result<Lock> {
        let mut created = Vec::new();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let mut missing: Vec<&Path> = parent.ancestors().take_while(|a| !a.exists()).collect();
            missing.retain(|a| !a.as_os_str().is_empty());
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create directory", parent.display()))?;
            missing.reverse();
            created = missing.into_iter().map(Path::to_path_buf).collect();
        }
        // dropping `regs` early (an error below) is fine: the folders are removed by hand
        let mut regs: Vec<Registered> = created
            .iter()
            .map(|d| Registered::new(d, OnSignal::RemoveIfEmpty))
            .collect();
        match Registered::make(path, OnSignal::Remove, |p| Lock::take(p, what)) {
            Ok((file, reg)) => {
                regs.push(reg);
                Ok(Lock {
                    path: path.to_path_buf(),
                    file: Some(file),
                    created,
                    sweep: None,
                    _regs: regs,
                })
            }
            Err(e) => {
                for d in created.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    fn take(path: &Path, what: &Path) -> Result<File> {
        // a few rounds: the file we opened may be removed by its owner (or a sweep) between
        // our open and our lock; then we try again on the new file
        for _ in 0..50 {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("{}: cannot create lock file", path.display()))?;
            match f.try_lock() {
                Ok(()) => {
                    if !same_file(&f, path) {
                        continue;
                    }
                    f.set_len(0)
                        .and_then(|_| f.rewind())
                        .and_then(|_| writeln!(f, "{}", std::process::id()))
                        .and_then(|_| f.flush())
                        .with_context(|| format!("{}: cannot write lock file", path.display()))?;
                    return Ok(f);
                }
                Err(TryLockError::WouldBlock) => {
                    if !same_file(&f, path) {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    let owner = read_pid(&mut f, path);
                    match owner {
                        Some(pid) => bail!("{}: in use by broca pid {pid}", what.display()),
                        None => bail!("{}: in use by another broca process", what.display()),
                    }
                }
                Err(TryLockError::Error(e)) => {
                    bail!("{}: cannot lock {}: {e}", what.display(), path.display())
                }
            }
        }
        bail!("{}: cannot lock {}", what.display(), path.display())
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether the open file `f` is the file now at `path` (not one removed meanwhile).
fn same_file(f: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (f, path);
        path.exists()
    }
}

/// The pid written in a held lock file (its owner may still be writing it: a few tries).
fn read_pid(f: &mut File, path: &Path) -> Option<u32> {
    for _ in 0..20 {
        let mut s = String::new();
        if f.rewind().is_ok() && f.read_to_string(&mut s).is_ok() {
            if let Ok(pid) = s.trim().parse() {
                return Some(pid);
            }
        } else if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(pid) = s.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

/// Removes the lock file at `path` if no process holds it (one left by a killed run).
pub fn remove_if_stale(path: &Path) {
    let Ok(f) = OpenOptions::new().read(true).write(true).open(path) else {
        return;
    };
    if f.try_lock().is_ok() && same_file(&f, path) {
        // still holding the lock: nobody else can take this file between check and removal
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some((dir, depth)) = &self.sweep {
            crate::io::sweep_stale(dir, *depth);
        }
        // remove the name while still holding the lock, then release it
        let _ = std::fs::remove_file(&self.path);
        drop(self.file.take());
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
