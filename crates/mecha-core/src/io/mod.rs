//! safetensors input and output.

pub mod reader;
pub mod writer;
