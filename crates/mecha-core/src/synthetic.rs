//! Models filled with deterministic pseudo-random values, for the demo, benchmarks and tests.
//! Written through the streaming writer in parallel chunks, so even SDXL-sized files never sit
//! in memory.

use std::path::Path;

use rayon::prelude::*;

use crate::error::{MechaError, Result};
use crate::io::writer::{FileLayout, PlannedTensor, SafetensorsWriter};
use crate::kernels::convert::encode_f32;

const CHUNK: usize = 1 << 20;

/// SplitMix64: a tiny generator whose streams are fully determined by their seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fills `out` with the values of elements `start..start + out.len()` of tensor `index`.
/// Floats are uniform in ±0.05 (the magnitude of real diffusion weights); integers count up
/// along the last dimension, like `position_ids`; bools alternate.
fn fill(t: &PlannedTensor, index: usize, seed: u64, start: usize, out: &mut [f32]) {
    if t.dtype.is_integer() {
        let last = t.shape.last().copied().unwrap_or(1).max(1);
        for (i, o) in out.iter_mut().enumerate() {
            let v = ((start + i) % last) as f32;
            *o = if t.dtype == crate::DType::Bool { v % 2.0 } else { v };
        }
        return;
    }
    let mut rng = SplitMix(seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407) ^ (start as u64).rotate_left(32));
    for o in out.iter_mut() {
        let unit = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
        *o = (unit * 2.0 - 1.0) * 0.05;
    }
}

pub fn write_random_model(
    path: &Path,
    tensors: &[PlannedTensor],
    seed: u64,
    metadata: &[(String, String)],
) -> Result<()> {
    if let Some(t) = tensors.iter().find(|t| !t.dtype.is_numeric()) {
        return Err(MechaError::recipe(format!("cannot generate values of dtype {} (tensor {})", t.dtype, t.name)));
    }
    let writer = SafetensorsWriter::create(path, FileLayout::new(tensors, metadata))?;
    let pieces: Vec<(usize, usize)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..t.numel().div_ceil(CHUNK)).map(move |c| (i, c * CHUNK)))
        .collect();
    pieces.par_iter().try_for_each(|&(i, start)| {
        let t = &tensors[i];
        let n = (t.numel() - start).min(CHUNK);
        let mut values = vec![0f32; n];
        fill(t, i, seed, start, &mut values);
        let width = t.dtype.bits() / 8;
        let mut bytes = vec![0u8; n * width];
        encode_f32(t.dtype, &values, &mut bytes);
        writer.write_at(i, start * width, &bytes)
    })?;
    writer.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::reader::SafetensorsFile;
    use crate::DType;

    #[test]
    fn random_models_are_deterministic_and_well_formed() {
        let dir = std::env::temp_dir().join(format!("mecha-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tensors = vec![
            PlannedTensor { name: "w".into(), dtype: DType::F16, shape: vec![3, CHUNK + 5] },
            PlannedTensor { name: "position_ids".into(), dtype: DType::I64, shape: vec![1, 77] },
        ];
        let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        write_random_model(&a, &tensors, 7, &[]).unwrap();
        write_random_model(&b, &tensors, 7, &[]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let file = SafetensorsFile::open(&a).unwrap();
        let ids = file.read_tensor(file.entry("position_ids").unwrap()).unwrap();
        assert_eq!(i64::from_le_bytes(ids[8 * 76..].try_into().unwrap()), 76);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
