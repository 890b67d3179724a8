//! mecha-core: the engine behind sd-mecha for Node. It merges and converts model state dicts
//! stored as safetensors, streaming one key (and one chunk) at a time. Pure Rust, no Node-API:
//! the `mecha-napi` crate binds it.

pub mod block_cache;
pub mod configs;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod io;
pub mod kernels;
pub mod methods;
pub mod model_dirs;
pub mod recipe;
pub mod synthetic;
pub mod util;

pub use dtype::DType;
pub use error::{ErrorKind, MechaError, Result};
