//! `verify`: replays the recipe a merged file records and compares (mecha-core `exec::verify`).

use crate::errors::ErrorInfo;
use mecha_core::exec::verify::{VerifyOptions, VerifyReport};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::path::PathBuf;

#[napi(object)]
pub struct NativeVerifyOptions {
    /// Worker threads; 0 or absent = one per CPU.
    pub threads: Option<u32>,
    /// Bytes of working memory (default: as a merge).
    pub memory_budget: Option<f64>,
}

/// One input of the merge, as recorded and as found now.
#[napi(object)]
pub struct InputCheckInfo {
    pub model: String,
    /// The file the model path resolves to now.
    pub path: Option<String>,
    /// The hash the merge recorded, if it recorded this input.
    pub recorded: Option<String>,
    /// The hash of the file found now, if the recipe reads it.
    pub found: Option<String>,
    pub matches: bool,
}

#[napi(object)]
pub struct VerifyReportInfo {
    pub reproducible: bool,
    pub problems: Vec<String>,
    pub inputs: Vec<InputCheckInfo>,
    pub keys_compared: u32,
    pub differing_keys: Vec<String>,
    pub missing_keys: Vec<String>,
    pub recorded_engine: Option<String>,
    pub engine: String,
    pub recipe: String,
    pub seconds: f64,
}

impl From<VerifyReport> for VerifyReportInfo {
    fn from(r: VerifyReport) -> Self {
        VerifyReportInfo {
            reproducible: r.reproducible,
            problems: r.problems,
            inputs: r
                .inputs
                .into_iter()
                .map(|i| InputCheckInfo {
                    matches: i.matches(),
                    model: i.model,
                    path: i.path.map(|p| p.display().to_string()),
                    recorded: i.recorded,
                    found: i.found,
                })
                .collect(),
            keys_compared: r.comparison.keys_compared as u32,
            differing_keys: r.comparison.differing_keys,
            missing_keys: r.comparison.missing_keys,
            recorded_engine: r.recorded_engine,
            engine: r.engine,
            recipe: r.recipe,
            seconds: r.seconds,
        }
    }
}

#[napi(object, object_from_js = false)]
pub struct VerifyOutcome {
    pub report: Option<VerifyReportInfo>,
    pub error: Option<ErrorInfo>,
}

type Resolver = Box<dyn FnOnce(Env) -> napi::Result<VerifyOutcome> + Send>;

/// Merges the recipe a file records again, on its own thread, and compares every tensor.
#[napi(ts_return_type = "Promise<VerifyOutcome>")]
pub fn verify<'env>(env: &'env Env, path: String, options: NativeVerifyOptions) -> napi::Result<Object<'env>> {
    let (deferred, promise) = env.create_deferred::<VerifyOutcome, Resolver>()?;
    std::thread::Builder::new()
        .name("mecha-verify".into())
        .spawn(move || {
            let result = mecha_core::error::guarded("verify", || {
                let budget = match options.memory_budget {
                    Some(b) if !(b.is_finite() && b >= 1.0) => {
                        return Err(mecha_core::MechaError::recipe(format!(
                            "memoryBudget must be a positive number of bytes, got {b}"
                        )))
                    }
                    Some(b) => b as u64,
                    None => 0,
                };
                let options = VerifyOptions { threads: options.threads.unwrap_or(0) as usize, memory_budget: budget };
                mecha_core::exec::verify::verify(&PathBuf::from(path), &options)
            });
            deferred.resolve(Box::new(move |_env| {
                Ok(match result {
                    Ok(r) => VerifyOutcome { report: Some(r.into()), error: None },
                    Err(e) => VerifyOutcome { report: None, error: Some(ErrorInfo::from(&e)) },
                })
            }));
        })
        .map_err(|e| napi::Error::from_reason(format!("cannot start the verify thread: {e}")))?;
    Ok(promise)
}
