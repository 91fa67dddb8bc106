//! Where the embedded default model (`models/default`, trained by the project) is found.

use std::path::PathBuf;

/// The default model's folder: `$IMAGO_DEFAULT_MODEL`, else `models/default` of the source tree this binary was
/// built from, else `share/imago/models/default` or `models/default` next to the installed executable.
pub fn default_model_dir() -> Option<PathBuf> {
    let is_model = |p: &PathBuf| p.join("model_index.json").is_file();
    if let Some(dir) = std::env::var_os("IMAGO_DEFAULT_MODEL").map(PathBuf::from) {
        return is_model(&dir).then_some(dir);
    }
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join("default");
    if is_model(&source) {
        return Some(source);
    }
    let exe_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    [exe_dir.join("../share/imago/models/default"), exe_dir.join("models/default")].into_iter().find(is_model)
}
