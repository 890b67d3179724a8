//! Node-API binding of mecha-core. It converts types, schedules merges on their own threads
//! (not the libuv pool), forwards progress through a threadsafe function and cancellation
//! through a token. No merge logic lives here.

/// Large buffers freed during a merge are reused by the next key instead of being faulted in
/// again (mecha-core's `block_cache`; plain system allocation otherwise).
#[global_allocator]
static ALLOCATOR: mecha_core::block_cache::BlockCache = mecha_core::block_cache::BlockCache;

pub mod buffers;
pub mod configs;
pub mod errors;
pub mod files;
pub mod merge;
pub mod methods;
pub mod verify;
