//! Errors cross to JavaScript as `Error`s whose `code` is the TypeScript class name, with the
//! core's details (file, key, node, line, column) attached.

use mecha_core::{DType, MechaError};
use napi::bindgen_prelude::*;
use napi_derive::napi;

/// Details of a core error, as plain data.
#[napi(object)]
#[derive(Clone)]
pub struct ErrorInfo {
    /// The TypeScript error class: `SafetensorsError`, `RecipeError`, `MergeSpaceError`, ...
    pub kind: String,
    pub message: String,
    pub file: Option<String>,
    pub key: Option<String>,
    pub node: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

impl From<&MechaError> for ErrorInfo {
    fn from(e: &MechaError) -> Self {
        ErrorInfo {
            kind: e.kind.class_name().to_string(),
            message: e.to_string(),
            file: e.file.as_ref().map(|f| f.display().to_string()),
            key: e.key.clone(),
            node: e.node.clone(),
            line: e.line,
            column: e.column,
        }
    }
}

/// Runs a binding's body; its errors, and any panic (as an `InternalError`), are thrown to
/// JavaScript instead of aborting the host process.
pub(crate) fn guarded<T>(env: &Env, what: &str, body: impl FnOnce() -> mecha_core::Result<T>) -> napi::Result<T> {
    mecha_core::error::guarded(what, || {
        inject_fault(what);
        body()
    })
    .map_err(|e| throw(env, &e))
}

/// Fault injection for the test suite: `MECHA_INJECT_PANIC=<entry point>` makes that entry
/// point panic, to check that every one reports an `InternalError` instead of crashing.
pub(crate) fn inject_fault(what: &str) {
    if std::env::var_os("MECHA_INJECT_PANIC").is_some_and(|v| v == what) {
        panic!("injected panic in {what} (MECHA_INJECT_PANIC)");
    }
}

/// Throws a JS `Error` whose `code` is the error class name, with the details as properties.
pub(crate) fn throw(env: &Env, err: &MechaError) -> napi::Error {
    let info = ErrorInfo::from(err);
    let thrown = (|| -> napi::Result<()> {
        let mut obj = env.create_error(napi::Error::new(Status::GenericFailure, info.message.clone()))?;
        obj.set_named_property("code", info.kind.as_str())?;
        obj.set_named_property("mecha", info)?;
        env.throw(obj)
    })();
    match thrown {
        Ok(()) => napi::Error::from_status(Status::PendingException),
        Err(e) => e,
    }
}

pub(crate) fn parse_dtype(name: &str, what: &str) -> std::result::Result<DType, MechaError> {
    DType::parse_user(name).filter(|d| d.is_numeric()).ok_or_else(|| {
        MechaError::recipe(format!(
            "{what} \"{name}\" is not a dtype; use f16, bf16, f32, f64, f8_e4m3, f8_e5m2 or a torch name like float16"
        ))
    })
}
