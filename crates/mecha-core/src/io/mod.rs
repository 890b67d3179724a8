//! safetensors input and output.

pub mod memory;
pub mod reader;
pub mod shards;
pub mod writer;
