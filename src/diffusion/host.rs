//! Direct access to the values of tensors on the CPU, for the inference paths that compute on plain slices
//! (Winograd convolution, fused group norm, GELU), and the wider vectors those loops may use.

use candle_core::{DType, Result, Storage, Tensor};

/// Whether `xs` can take a slice-based inference path: f32, on the CPU, and not tracked for gradients (training
/// keeps candle's differentiable operations).
pub fn is_cpu_f32_inference(xs: &Tensor) -> bool {
    xs.dtype() == DType::F32 && xs.device().is_cpu() && !xs.track_op()
}

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

/// Runs a loop body compiled for AVX2 when the CPU has it. The bodies are plain loops over contiguous lines that the
/// compiler vectorizes; the default x86-64 target only allows 4-lane SSE2. Results are the same either way: no
/// operation is fused or reordered, only run 8 lanes at a time.
macro_rules! vectorized {
    ($body:ident $(::<$($generic:tt),+>)? ($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            // Once inlined into `wide` (the bodies are `#[inline(always)]`), the loops are compiled with AVX2 enabled.
            #[target_feature(enable = "avx2")]
            fn wide<R>(body: impl FnOnce() -> R) -> R {
                body()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { wide(|| $body $(::<$($generic),+>)? ($($arg),*)) }
            } else {
                $body $(::<$($generic),+>)? ($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body $(::<$($generic),+>)? ($($arg),*)
        }
    }};
}
pub(crate) use vectorized;
