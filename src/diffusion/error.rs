use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating an image.
///
/// Variants name the offending input (file, tensor, parameter) so a user can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: missing file (expected in a diffusers model folder)")]
    MissingFile { path: PathBuf },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("model {model:?} not found: {message}")]
    ModelNotFound { model: String, message: String },
    #[error("weights in {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("unknown scheduler {name:?} (known: {known})")]
    UnknownScheduler { name: String, known: &'static str },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("image: {0}")]
    Image(String),
    #[error("generation cancelled")]
    Cancelled,
    #[error("{}", Error::tensor_message(.0))]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set: users get the
    /// message, developers can still ask for the trace with `-vv`.
    pub(crate) fn tensor_message(error: &candle_core::Error) -> String {
        match error {
            candle_core::Error::WithBacktrace { inner, .. } => Self::tensor_message(inner),
            other => other.to_string(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), message: message.to_string() }
    }
}
