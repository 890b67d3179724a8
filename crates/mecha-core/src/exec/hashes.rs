//! Content hashes of a merge's inputs, computed from the bytes as the merge reads them (no
//! extra pass over the files), recorded in the output so that `verify` can tell whether the
//! inputs found later are the ones merged.
//!
//! Work units read tensors in pieces, on several threads, in no fixed order, so the bytes
//! cannot be streamed through one hasher. Instead each tensor is cut into fixed blocks of
//! `BLOCK` bytes (from the tensor's own start, whatever the file layout); a read hashes every
//! block it holds whole, into that block's slot. The input's hash is then taken over its
//! header and the slots in file order: the same bytes give the same hash for any thread count,
//! chunk size or memory budget. A block no read held whole (a read starting mid-block) is read
//! and hashed at the end; with the default chunk size that never happens.
//!
//! xxh3 is not a cryptographic hash: it tells a changed or different file apart, which is what
//! replaying a merge needs, not a tampered one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed, Xxh3};

use crate::error::Result;
use crate::io::reader::{SafetensorsFile, TensorEntry};

/// Bytes per hashed block: the smallest read of a default chunk (32 768 one-byte elements), so
/// every chunk read holds its blocks whole.
pub const BLOCK: usize = 32 * 1024;

/// How the hashes are named in the output's metadata.
pub const ALGORITHM: &str = "xxh3-128";

/// A slot that no read has filled (hashes are stored with their lowest bit set).
const EMPTY: u64 = 0;

/// The block hashes of one input file.
struct FileHashes {
    /// Raw header bytes (length prefix and JSON) of each file the input is read from.
    header: u128,
    /// (shard, data start) of each tensor → its index in file order.
    tensor_at: HashMap<(usize, usize), usize>,
    /// First slot of each tensor, in file order; one past the last slot at the end.
    first_slot: Vec<usize>,
    slots: Vec<AtomicU64>,
    /// Tensors some read touched: only those enter the hash.
    touched: Vec<AtomicBool>,
}

/// The content hashes of one merge's inputs, filled as the merge reads.
pub struct InputHashes {
    /// By plan input; `None` for inputs held in memory (they have no file to compare later).
    files: Vec<Option<FileHashes>>,
}

impl InputHashes {
    /// Reads each input's header (a few KB) and sizes the block slots.
    pub fn new(inputs: &[std::sync::Arc<SafetensorsFile>]) -> Result<InputHashes> {
        let files = inputs
            .iter()
            .map(|file| {
                if file.in_memory() {
                    return Ok(None);
                }
                let header = xxh3_128(&file.raw_headers()?);
                let mut tensor_at = HashMap::with_capacity(file.tensors().len());
                let mut first_slot = Vec::with_capacity(file.tensors().len() + 1);
                let mut slots = 0usize;
                for (i, entry) in file.tensors().values().enumerate() {
                    tensor_at.insert((entry.shard, entry.start), i);
                    first_slot.push(slots);
                    slots += entry.byte_len.div_ceil(BLOCK);
                }
                first_slot.push(slots);
                Ok(Some(FileHashes {
                    header,
                    tensor_at,
                    first_slot,
                    slots: (0..slots).map(|_| AtomicU64::new(EMPTY)).collect(),
                    touched: (0..file.tensors().len()).map(|_| AtomicBool::new(false)).collect(),
                }))
            })
            .collect::<Result<_>>()?;
        Ok(InputHashes { files })
    }

    /// Records bytes just read from input `input`: `bytes` of `entry`'s data from `offset`.
    pub fn record(&self, input: usize, entry: &TensorEntry, offset: usize, bytes: &[u8]) {
        let Some(Some(hashes)) = self.files.get(input) else { return };
        let Some(&tensor) = hashes.tensor_at.get(&(entry.shard, entry.start)) else { return };
        hashes.touched[tensor].store(true, Ordering::Relaxed);
        let end = offset + bytes.len();
        let mut block = offset.div_ceil(BLOCK);
        while block * BLOCK < end {
            let (from, to) = (block * BLOCK, ((block + 1) * BLOCK).min(entry.byte_len));
            if to > end {
                break; // continues past this read: hashed by another, or at the end
            }
            hashes.slots[hashes.first_slot[tensor] + block]
                .store(hash_block(block, &bytes[from - offset..to - offset]), Ordering::Relaxed);
            block += 1;
        }
    }

    /// The hash of each input (`None` for in-memory ones), as hex. Blocks of touched tensors
    /// that no read held whole are read now.
    pub fn finish(&self, inputs: &[std::sync::Arc<SafetensorsFile>]) -> Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(self.files.len());
        for (hashes, file) in self.files.iter().zip(inputs) {
            let Some(hashes) = hashes else {
                out.push(None);
                continue;
            };
            let mut digest = Xxh3::new();
            digest.update(b"sd-mecha-node input v1");
            digest.update(&hashes.header.to_le_bytes());
            let mut block_bytes = vec![];
            for (tensor, entry) in file.tensors().values().enumerate() {
                if !hashes.touched[tensor].load(Ordering::Relaxed) {
                    continue;
                }
                digest.update(&(tensor as u64).to_le_bytes());
                let first = hashes.first_slot[tensor];
                for (block, slot) in hashes.slots[first..hashes.first_slot[tensor + 1]].iter().enumerate() {
                    let mut value = slot.load(Ordering::Relaxed);
                    if value == EMPTY {
                        let from = block * BLOCK;
                        block_bytes.resize(BLOCK.min(entry.byte_len - from), 0);
                        file.read(entry, from, &mut block_bytes)?;
                        value = hash_block(block, &block_bytes);
                    }
                    digest.update(&value.to_le_bytes());
                }
            }
            out.push(Some(format!("{:032x}", digest.digest128())));
        }
        Ok(out)
    }
}

fn hash_block(block: usize, bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, block as u64) | 1
}

/// The hash field's value while the merge runs: as long as a real hash, so that writing the
/// real one once the inputs are read keeps the header's length, and so every tensor's offset.
pub fn reserved() -> String {
    "0".repeat(32)
}
