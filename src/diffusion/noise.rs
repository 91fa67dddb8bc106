//! Portable seeded Gaussian noise.
//!
//! Initial latents and ancestral-sampler noise are drawn on the CPU from ChaCha20 with a Box–Muller transform we own,
//! so a seed gives bit-identical noise on every platform, device and release of our dependencies (unlike a device RNG
//! or a sampler whose algorithm may change between crate versions). The tensor is then moved to the target device.

use candle_core::{DType, Device, Shape, Tensor};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::Result;

/// A seeded stream of standard normal samples.
pub struct NoiseSource {
    rng: ChaCha20Rng,
    spare: Option<f32>,
}

impl NoiseSource {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha20Rng::seed_from_u64(seed), spare: None }
    }

    /// Uniform in (0, 1], from the top 24 bits so the value is exact in f32 and never 0 (ln(0) is -inf).
    fn uniform_open0(&mut self) -> f64 {
        ((self.rng.next_u32() >> 8) as f64 + 1.0) / (1u32 << 24) as f64
    }

    /// Uniform in (0, 1].
    pub fn next_uniform(&mut self) -> f32 {
        self.uniform_open0() as f32
    }

    /// One standard normal sample (Box–Muller; the second value of each pair is kept for the next call).
    pub fn next_normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.uniform_open0();
        let u2 = self.uniform_open0();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// A tensor of standard normal samples in row-major order, created on the CPU and moved to `device` as `dtype`.
    pub fn tensor<S: Into<Shape>>(&mut self, shape: S, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count()).map(|_| self.next_normal()).collect();
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let a: Vec<f32> = (0..64)
            .map({
                let mut n = NoiseSource::new(7);
                move |_| n.next_normal()
            })
            .collect();
        let b: Vec<f32> = (0..64)
            .map({
                let mut n = NoiseSource::new(7);
                move |_| n.next_normal()
            })
            .collect();
        let c: Vec<f32> = (0..64)
            .map({
                let mut n = NoiseSource::new(8);
                move |_| n.next_normal()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn samples_are_standard_normal() {
        let mut n = NoiseSource::new(42);
        let xs: Vec<f64> = (0..200_000).map(|_| n.next_normal() as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        let beyond_3 = xs.iter().filter(|x| x.abs() > 3.0).count() as f64 / xs.len() as f64;
        assert!((beyond_3 - 0.0027).abs() < 0.001, "tail mass {beyond_3}");
    }

    #[test]
    fn first_values_are_pinned_across_releases() {
        // A changed value here means every seed now gives a different image: bump the model cards' notes if intended.
        let mut n = NoiseSource::new(0);
        let first: Vec<f32> = (0..4).map(|_| n.next_normal()).collect();
        let expected = PINNED_SEED0;
        for (got, want) in first.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{first:?}");
        }
    }

    const PINNED_SEED0: [f32; 4] = [1.1508065, 0.17757587, 1.28462, -0.14576507];
}
