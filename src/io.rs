//! Output files are written atomically: to a temporary file beside the target, then renamed,
//! so a crash never leaves a half-written result.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    Ok(())
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
