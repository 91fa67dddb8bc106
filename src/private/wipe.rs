//! Wiping memory that outlives a private job unless we wipe it: tensors the pipeline still holds when the result
//! is out (on the GPU nothing zeroes freed memory for us) and the CPU matmul's per-thread packing scratch, which
//! is allocated once per thread and never freed.

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};

/// Overwrites `len` bytes at `ptr` with zeros in a way the compiler may not elide, even when the memory is freed
/// right after (a plain memset before free is a dead store it may remove).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub unsafe fn wipe_bytes(ptr: *mut u8, len: usize) {
    if len > 0 {
        libc::explicit_bzero(ptr.cast(), len);
    }
}

/// Zeroes a slice of plain numbers, whatever the element type.
fn wipe_slice<T: Copy>(values: &mut [T]) {
    // SAFETY: the slice is valid for writes of its size in bytes, and every element type used here (integers,
    // floats, f16/bf16) is valid as all-zero bits.
    unsafe { wipe_bytes(values.as_mut_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Zeroes a vector's whole allocation, spare capacity included (a tensor's storage may be larger than its view).
fn wipe_vec_allocation<T: Copy>(values: &mut Vec<T>) {
    let capacity = values.capacity();
    // SAFETY: the allocation holds `capacity` elements; zero bits are a valid value of every T used here.
    unsafe { wipe_bytes(values.as_mut_ptr().cast(), capacity * std::mem::size_of::<T>()) }
    wipe_slice(values.as_mut_slice());
}

/// The in-place op that zeroes a tensor's whole storage (not only the tensor's view of it).
struct WipeStorage;

impl InplaceOp1 for WipeStorage {
    fn name(&self) -> &'static str {
        "wipe-storage"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        match storage {
            CpuStorage::U8(v)
            | CpuStorage::F6E2M3(v)
            | CpuStorage::F6E3M2(v)
            | CpuStorage::F4(v)
            | CpuStorage::F8E8M0(v) => wipe_vec_allocation(v),
            CpuStorage::U32(v) => wipe_vec_allocation(v),
            CpuStorage::I16(v) => wipe_vec_allocation(v),
            CpuStorage::I32(v) => wipe_vec_allocation(v),
            CpuStorage::I64(v) => wipe_vec_allocation(v),
            CpuStorage::BF16(v) => wipe_vec_allocation(v),
            CpuStorage::F16(v) => wipe_vec_allocation(v),
            CpuStorage::F32(v) => wipe_vec_allocation(v),
            CpuStorage::F64(v) => wipe_vec_allocation(v),
            CpuStorage::F8E4M3(v) => wipe_vec_allocation(v),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, _layout: &Layout) -> candle_core::Result<()> {
        super::gpu::wipe_cuda_storage(storage)
    }
}

/// Zeroes the whole storage behind `tensor` (shared by every view of it). The tensor stays usable, full of zeros.
pub fn wipe_tensor(tensor: &Tensor) -> candle_core::Result<()> {
    tensor.inplace_op1(&WipeStorage)
}

/// Wipes every tensor given; stops at the first failure.
pub fn wipe_tensors<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> candle_core::Result<()> {
    tensors.into_iter().try_for_each(wipe_tensor)
}

/// Zeroes the CPU matmul's packing scratch (gemm's per-thread L2 slab) on every thread of the compute pool and on
/// the calling thread. gemm copies blocks of both operands there (activations included) and keeps the slab for the
/// thread's lifetime.
pub fn wipe_matmul_scratch() {
    fn wipe_this_thread() {
        // try_with: a thread being torn down has no slab left to wipe.
        let _ = gemm_common::gemm::L2_SLAB.try_with(|slab| {
            if let Ok(mut slab) = slab.try_borrow_mut() {
                let len = slab.len();
                // SAFETY: the slab is `len` bytes we hold exclusively through the RefCell borrow.
                unsafe { wipe_bytes(slab.as_mut_ptr().cast(), len) };
            }
        });
    }
    rayon::broadcast(|_| wipe_this_thread());
    wipe_this_thread();
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn wiping_a_view_zeroes_the_whole_storage() {
        let base = Tensor::arange(1f32, 65.0, &Device::Cpu).unwrap().reshape((8, 8)).unwrap();
        let view = base.narrow(0, 2, 2).unwrap();
        wipe_tensor(&view).unwrap();
        assert_eq!(base.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        for dtype in [DType::U8, DType::F16, DType::BF16, DType::F64, DType::I64, DType::U32] {
            let t = Tensor::ones((3, 5), dtype, &Device::Cpu).unwrap();
            wipe_tensor(&t).unwrap();
            assert_eq!(t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        }
    }

    #[test]
    fn the_matmul_scratch_holds_operands_until_wiped() {
        // Operands of a recognisable value, large in both directions: gemm packs blocks of one of them into the
        // slab (small ones it packs into a per-call buffer instead, which the allocator wipes when it is freed).
        let marker = 1234.5f32;
        let a = Tensor::full(marker, (2048, 128), &Device::Cpu).unwrap();
        let b = Tensor::full(marker, (128, 2048), &Device::Cpu).unwrap();
        let product = a.matmul(&b).unwrap();
        let corner = product.get(0).unwrap().get(0).unwrap().to_scalar::<f32>().unwrap();
        assert!((corner / (marker * marker * 128.0) - 1.0).abs() < 1e-4, "{corner}");
        let count_markers = || {
            let mut found = 0usize;
            let mut check = |bytes: &[u8]| {
                found +=
                    bytes.chunks_exact(4).filter(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) == marker).count()
            };
            gemm_common::gemm::L2_SLAB.with(|slab| {
                let slab = slab.borrow();
                // SAFETY: reading the slab as bytes; uninitialised parts only risk false negatives.
                let bytes = unsafe { std::slice::from_raw_parts(slab.as_ptr().cast::<u8>(), slab.len()) };
                check(bytes)
            });
            let from_pool: usize = rayon::broadcast(|_| {
                gemm_common::gemm::L2_SLAB.with(|slab| {
                    let slab = slab.borrow();
                    // SAFETY: as above.
                    let bytes = unsafe { std::slice::from_raw_parts(slab.as_ptr().cast::<u8>(), slab.len()) };
                    bytes.chunks_exact(4).filter(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) == marker).count()
                })
            })
            .into_iter()
            .sum();
            found + from_pool
        };
        assert!(count_markers() > 0, "the operand was packed into some thread's slab");
        wipe_matmul_scratch();
        assert_eq!(count_markers(), 0);
    }
}
