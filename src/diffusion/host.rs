//! Direct access to the values of tensors on the CPU, for the inference paths that compute on plain slices
//! (Winograd convolution, fused group norm).

use candle_core::{Result, Storage, Tensor};

/// Calls `f` with a contiguous CPU f32 tensor's values, in layout order.
pub fn with_f32_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("expected a tensor on the CPU".into()));
    };
    let values = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => f(&values[start..end]),
        None => Err(candle_core::Error::Msg("expected a contiguous tensor".into())),
    }
}
