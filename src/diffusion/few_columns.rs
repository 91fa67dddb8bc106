//! Matrix products with few columns, on the CPU: a layer's weight (out × k) times a handful of input vectors, as
//! the UNet's lowest resolutions ask for (2×2 to 4×4 pixels or tokens per image at 128×128).
//!
//! There `gemm` packs the whole weight (tens of megabytes for a 1280-channel 3×3 kernel) for a product that reads
//! it once, and each image of a batch is its own product, so the weight streams from memory once per image. Here
//! each weight row is read in place, once per call for all images together, and dotted with every input vector.
//!
//! Each result is one dot product summed in a fixed order: eight lanes, lane `l` a chain of fused multiply-adds
//! over `k ≡ l (mod 8)` in increasing `k`, then the lanes added in a fixed tree. Nothing in that order depends on
//! the other vectors of the call, so an image gets the same bits alone or in a batch, and the vector kernel and
//! the portable one agree bit for bit (a fused multiply-add rounds once on every CPU).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::host::{is_cpu_f32_inference, with_f32_slice};

/// Up to this many vectors per image a product takes this path: measured on the UNet's 1280-channel layers at one
/// and two threads, it takes half of `gemm`'s time for 2 images of 4 vectors and a third for 2 of 1; `gemm` is
/// ahead from 2 images of 16.
const MAX_VECTORS_PER_IMAGE: usize = 8;

/// Lanes of one partial sum: one AVX register of f32.
const LANES: usize = 8;
/// Weight rows (one parallel task) and input vectors per kernel call: 4 × 3 sums in registers. Each task streams
/// its 4 rows whole, in order, which the prefetchers follow; blocking `k` to keep stretches in L1 measured slower.
const ROWS: usize = 4;
const VECTORS: usize = 3;

/// Whether `weight` times `vectors` (the rows of a batch, `per_image` of them for each image) takes this path.
pub fn applies(weight: &Tensor, vectors: &Tensor, per_image: usize) -> bool {
    per_image <= MAX_VECTORS_PER_IMAGE && is_cpu_f32_inference(vectors) && is_cpu_f32_inference(weight)
}

/// `weight` (out, k) times each row of `vectors` (n, k): (n, out). Both f32 on the CPU.
pub fn rows_times(weight: &Tensor, vectors: &Tensor) -> Result<Tensor> {
    let (out, k) = weight.dims2()?;
    let (n, vector_len) = vectors.dims2()?;
    if k == 0 || vector_len != k || weight.dtype() != DType::F32 || vectors.dtype() != DType::F32 {
        return Err(candle_core::Error::Msg(format!(
            "few-column product of {:?} {:?} by {:?} {:?}",
            weight.shape(),
            weight.dtype(),
            vectors.shape(),
            vectors.dtype()
        )));
    }
    let (weight, vectors) = (weight.contiguous()?, vectors.contiguous()?);
    let result = with_f32_slice(&weight, |w| with_f32_slice(&vectors, |v| Ok(product(w, v, k))))?;
    Tensor::from_vec(result, (n, out), &Device::Cpu)
}

/// `weight` (out × k, row-major) times each of `vectors` (n × k, row-major): the (n × out) products, row `i`
/// holding `weight · vectors[i]`.
fn product(weight: &[f32], vectors: &[f32], k: usize) -> Vec<f32> {
    product_with(Kernel::detect(), weight, vectors, k)
}

fn product_with(kernel: Kernel, weight: &[f32], vectors: &[f32], k: usize) -> Vec<f32> {
    assert!(
        k > 0 && weight.len().is_multiple_of(k) && vectors.len().is_multiple_of(k),
        "operands are not whole rows of length k"
    );
    let (out, n) = (weight.len() / k, vectors.len() / k);
    if out == 0 || n == 0 {
        return Vec::new();
    }
    let mut transposed = vec![0f32; out * n];
    transposed.par_chunks_mut(ROWS * n).enumerate().for_each(|(block, sums)| {
        let first = block * ROWS;
        let rows = &weight[first * k..(first + sums.len() / n) * k];
        for v in (0..n).step_by(VECTORS) {
            let tile = Tile { rows, vectors: &vectors[v * k..], k, kernel };
            let sums = &mut sums[v..];
            match (rows.len() / k, VECTORS.min(n - v)) {
                (4, 3) => tile.run::<4, 3>(sums, n),
                (4, 2) => tile.run::<4, 2>(sums, n),
                (4, 1) => tile.run::<4, 1>(sums, n),
                (3, 3) => tile.run::<3, 3>(sums, n),
                (3, 2) => tile.run::<3, 2>(sums, n),
                (3, 1) => tile.run::<3, 1>(sums, n),
                (2, 3) => tile.run::<2, 3>(sums, n),
                (2, 2) => tile.run::<2, 2>(sums, n),
                (2, 1) => tile.run::<2, 1>(sums, n),
                (1, 3) => tile.run::<1, 3>(sums, n),
                (1, 2) => tile.run::<1, 2>(sums, n),
                _ => tile.run::<1, 1>(sums, n),
            }
        }
    });
    let mut result = vec![0f32; n * out];
    for (o, sums) in transposed.chunks_exact(n).enumerate() {
        for (i, &sum) in sums.iter().enumerate() {
            result[i * out + o] = sum;
        }
    }
    result
}

/// The lanes of one dot product added in a fixed tree.
#[inline(always)]
fn add_lanes(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Which code sums the whole 8-lane stretches: both do the same operations in the same order.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// One AVX register per lane set and one instruction per 8 fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// Plain Rust, for any CPU.
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }
}

/// Adds `rows[r][i] · vectors[v][i]` to lane `i mod 8` of `acc[r][v]` for `i` in `0..len` (a multiple of 8).
#[inline(always)]
fn accumulate<const R: usize, const V: usize>(
    rows: &[&[f32]; R],
    vectors: &[&[f32]; V],
    len: usize,
    acc: &mut [[[f32; LANES]; V]; R],
) {
    for i in (0..len).step_by(LANES) {
        for r in 0..R {
            for v in 0..V {
                for l in 0..LANES {
                    acc[r][v][l] = rows[r][i + l].mul_add(vectors[v][i + l], acc[r][v][l]);
                }
            }
        }
    }
}

/// [`accumulate`] with the R × V sums held in AVX registers.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2_fma<const R: usize, const V: usize>(
    rows: &[&[f32]; R],
    vectors: &[&[f32]; V],
    len: usize,
    acc: &mut [[[f32; LANES]; V]; R],
) {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_storeu_ps};
    assert!(rows.iter().chain(vectors).all(|line| line.len() >= len) && len.is_multiple_of(LANES));
    // SAFETY (all loads and stores): `i + 8 <= len`, and every line holds at least `len` values (asserted above);
    // each `acc[r][v]` is 8 values.
    let mut sums = std::array::from_fn::<_, R, _>(|r| {
        std::array::from_fn::<_, V, _>(|v| unsafe { _mm256_loadu_ps(acc[r][v].as_ptr()) })
    });
    for i in (0..len).step_by(LANES) {
        let x = std::array::from_fn::<_, V, _>(|v| unsafe { _mm256_loadu_ps(vectors[v].as_ptr().add(i)) });
        for r in 0..R {
            let w = unsafe { _mm256_loadu_ps(rows[r].as_ptr().add(i)) };
            for v in 0..V {
                sums[r][v] = _mm256_fmadd_ps(w, x[v], sums[r][v]);
            }
        }
    }
    for r in 0..R {
        for v in 0..V {
            unsafe { _mm256_storeu_ps(acc[r][v].as_mut_ptr(), sums[r][v]) };
        }
    }
}

/// The first R weight rows of `rows` by the first V of `vectors`, over all of `k`.
struct Tile<'a> {
    rows: &'a [f32],
    vectors: &'a [f32],
    k: usize,
    kernel: Kernel,
}

impl Tile<'_> {
    /// Writes the R × V dot products: row `r`'s with vector `v` to `sums[r · stride + v]`.
    #[inline(always)]
    fn run<const R: usize, const V: usize>(&self, sums: &mut [f32], stride: usize) {
        let k = self.k;
        let rows: [&[f32]; R] = std::array::from_fn(|r| &self.rows[r * k..(r + 1) * k]);
        let vectors: [&[f32]; V] = std::array::from_fn(|v| &self.vectors[v * k..(v + 1) * k]);
        let mut acc = [[[0f32; LANES]; V]; R];
        let whole = k / LANES * LANES;
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2Fma` is only chosen on a CPU with AVX2 and FMA.
            Kernel::Avx2Fma => unsafe { accumulate_avx2_fma(&rows, &vectors, whole, &mut acc) },
            Kernel::Portable => accumulate(&rows, &vectors, whole, &mut acc),
        }
        for i in whole..k {
            for r in 0..R {
                for v in 0..V {
                    acc[r][v][i % LANES] = rows[r][i].mul_add(vectors[v][i], acc[r][v][i % LANES]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (sum, lanes) in sums[r * stride..][..V].iter_mut().zip(acc) {
                *sum = add_lanes(lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defined order, written out plainly: per lane a chain of fused multiply-adds, then the lane tree.
    fn reference(weight: &[f32], vectors: &[f32], k: usize) -> Vec<f32> {
        let (out, n) = (weight.len() / k, vectors.len() / k);
        let mut result = vec![0f32; n * out];
        for i in 0..n {
            for o in 0..out {
                let mut lanes = [0f32; LANES];
                for j in 0..k {
                    lanes[j % LANES] = weight[o * k + j].mul_add(vectors[i * k + j], lanes[j % LANES]);
                }
                result[i * out + o] = add_lanes(&lanes);
            }
        }
        result
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // Small integers' worth of spread, but not exactly representable sums: rounding order shows.
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 3e6 - 2.5).collect()
    }

    #[test]
    fn every_shape_gives_the_reference_bits() {
        // Row counts around the blocks (4, 16), vector counts around 3, k around 8 and the 512 stretch.
        for (out, n, k) in [(1, 1, 1), (5, 2, 7), (17, 4, 520), (33, 7, 1030), (16, 3, 512), (4, 1, 9), (40, 12, 64)] {
            let (weight, vectors) = (values(out * k, 1), values(n * k, 2));
            let want = reference(&weight, &vectors, k);
            for kernel in [Kernel::detect(), Kernel::Portable] {
                let got = product_with(kernel, &weight, &vectors, k);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{kernel:?} {out}×{k} by {n}");
            }
        }
    }

    #[test]
    fn the_sums_are_the_products() {
        // Exact in f32: small integers.
        let weight = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let vectors = [1.0, 0.0, -1.0, 2.0, 2.0, 2.0];
        assert_eq!(product(&weight, &vectors, 3), vec![-2.0, -2.0, 12.0, 30.0]);
    }

    #[test]
    fn tensors_in_and_out_agree_with_candles_product() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (70, 300), &dev).unwrap();
        let vectors = Tensor::randn(0f32, 1.0, (300, 5), &dev).unwrap().t().unwrap(); // a strided view
        let got = rows_times(&weight, &vectors).unwrap();
        let want = vectors.matmul(&weight.t().unwrap()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        let none = Tensor::zeros((0, 300), DType::F32, &dev).unwrap();
        assert_eq!(rows_times(&weight, &none).unwrap().dims(), &[0, 70]);
        let mismatched = Tensor::zeros((2, 299), DType::F32, &dev).unwrap();
        assert!(rows_times(&weight, &mismatched).is_err());
    }

    #[test]
    fn a_vector_gets_the_same_bits_alone_and_among_others() {
        let (out, k) = (37, 1000);
        let weight = values(out * k, 3);
        let many = values(9 * k, 4);
        let together = product(&weight, &many, k);
        for i in 0..9 {
            let alone = product(&weight, &many[i * k..(i + 1) * k], k);
            assert!(alone.iter().zip(&together[i * out..(i + 1) * out]).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
