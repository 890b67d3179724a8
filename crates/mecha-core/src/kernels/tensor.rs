//! Glue between the executor's buffers and `candle_core::Tensor`s for whole-tensor methods.

use candle_core::{Device, Storage, Tensor, WithDType};

use crate::error::Result;

/// Calls `f` with the tensor's values as a contiguous slice in dtype `T` (converting, or
/// copying to the CPU, only when the tensor is not already so).
pub fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    if t.dtype() != T::DTYPE || !t.is_contiguous() || !matches!(t.device(), Device::Cpu) {
        let converted = t.to_device(&Device::Cpu)?.to_dtype(T::DTYPE)?.contiguous()?;
        return with_slice(&converted, f);
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { unreachable!("moved to the CPU above") };
    let all = T::cpu_storage_as_slice(cpu)?;
    let start = layout.start_offset();
    Ok(f(&all[start..start + t.elem_count()]))
}

/// The tensor's values as a new vector in dtype `T`.
pub fn to_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    with_slice(t, |s: &[T]| s.to_vec())
}
