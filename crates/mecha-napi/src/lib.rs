//! Node-API binding of mecha-core. It converts types, schedules merges on their own threads
//! (not the libuv pool), forwards progress through a threadsafe function and cancellation
//! through a token. No merge logic lives here.

pub mod configs;
pub mod errors;
pub mod files;
pub mod merge;
pub mod methods;
