//! One error type for the whole engine. Every error carries a kind (mapped to a typed error
//! class in TypeScript) and a message that names the file, key or recipe node involved and says
//! what to do about it.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A safetensors file is missing, truncated, or its header is invalid.
    Safetensors,
    /// The recipe is malformed: unknown method, wrong arity, bad reference, bad value.
    Recipe,
    /// Merge-space constraints cannot be satisfied.
    MergeSpace,
    /// A model config is unknown or constraints on configs conflict.
    Config,
    /// Inputs disagree on a tensor's shape, or a method cannot handle it.
    Shape,
    /// The output path is unusable (would overwrite an input, folder missing...).
    Output,
    /// Reading or writing failed at the operating-system level.
    Io,
    /// The merge was cancelled.
    Aborted,
    /// A `.mecha` text could not be parsed.
    Parse,
    /// A method found at run time that it cannot produce this key (sd-mecha's
    /// `StateDictKeyError`): the key is left out of the output, never reported as a failure.
    KeySkipped,
    /// A bug: the engine panicked. The panic is caught and reported, never left to take down
    /// the host process or hang a merge.
    Internal,
}

impl ErrorKind {
    /// The TypeScript class name this kind maps to.
    pub fn class_name(self) -> &'static str {
        match self {
            ErrorKind::Safetensors => "SafetensorsError",
            ErrorKind::Recipe => "RecipeError",
            ErrorKind::MergeSpace => "MergeSpaceError",
            ErrorKind::Config => "ConfigError",
            ErrorKind::Shape => "ShapeError",
            ErrorKind::Output => "OutputError",
            ErrorKind::Io => "IoError",
            ErrorKind::Aborted => "AbortError",
            ErrorKind::Parse => "ParseError",
            ErrorKind::KeySkipped => "RecipeError",
            ErrorKind::Internal => "InternalError",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MechaError {
    pub kind: ErrorKind,
    pub message: String,
    pub file: Option<PathBuf>,
    pub key: Option<String>,
    /// Path of recipe nodes from the root down to the failing node, e.g. `weighted_sum > model "a"`.
    pub node: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

pub type Result<T, E = MechaError> = std::result::Result<T, E>;

impl MechaError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        MechaError { kind, message: message.into(), file: None, key: None, node: None, line: None, column: None }
    }

    pub fn safetensors(file: &Path, problem: impl fmt::Display) -> Self {
        MechaError::new(ErrorKind::Safetensors, format!("{}: {problem}", file.display())).with_file(file)
    }

    pub fn recipe(message: impl Into<String>) -> Self {
        MechaError::new(ErrorKind::Recipe, message)
    }

    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        MechaError::new(ErrorKind::Io, format!("{context}: {err}"))
    }

    pub fn aborted() -> Self {
        MechaError::new(ErrorKind::Aborted, "the merge was cancelled; no output file was written")
    }

    /// The key cannot be produced (for example an input holds NaN): it is skipped, not failed.
    pub fn skip_key(reason: impl Into<String>) -> Self {
        MechaError::new(ErrorKind::KeySkipped, reason)
    }

    pub fn with_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }

    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }

    /// Records the node this error came from. Called from the failing node upwards, so the
    /// trace reads root first.
    pub fn within_node(mut self, node: &str) -> Self {
        self.node = Some(match self.node.take() {
            Some(inner) => format!("{node} > {inner}"),
            None => node.to_string(),
        });
        self
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line as u32);
        self.column = Some(column as u32);
        self
    }
}

impl fmt::Display for MechaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(node) = &self.node {
            write!(f, "\n  at node: {node}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MechaError {}

/// Runs `f`, turning a panic into an [`ErrorKind::Internal`] error that names `what` was running.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(MechaError::new(
            ErrorKind::Internal,
            format!(
                "internal error in {what}: {message}; this is a bug in sd-mecha for Node: please report it \
                 with the recipe and the inputs' headers (`mecha info`)"
            ),
        ))
    })
}
