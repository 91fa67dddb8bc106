//! Group normalisation, optionally followed by SiLU, with the weights and names of `candle_nn::GroupNorm`.
//!
//! candle's group norm is ten tensor operations (sum, subtract, square, sum, divide, square root, scale, shift, and
//! a cast each way), each a pass over memory with its own allocation, and the SiLU after it is one more. For f32
//! inference on the CPU this module computes each group's statistics in two reads (mean, then variance about it, in
//! f64) and writes `silu(x·scale + shift)` in one more pass: at a VAE's full-resolution layers, where the data is
//! megabytes per image, that is most of a norm's cost gone. Training (tracked tensors), GPUs and other dtypes keep
//! candle's operations.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::activation::silu_value;
use super::host::{is_cpu_f32_inference, vectorized, with_f32_slice};

/// `torch.nn.GroupNorm`: per image and group of channels, normalise to zero mean and unit variance, then scale
/// and shift per channel.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    /// The per-channel scale and shift as plain values, for the CPU path; `None` when they are tracked (training)
    /// or not on the CPU.
    affine: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f64,
}

/// A group norm read from `weight` and `bias` under `vb`, as `candle_nn::group_norm`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let plain = |t: &Tensor| t.device().is_cpu() && !t.track_op();
    let affine = if plain(&weight) && plain(&bias) {
        Some((weight.to_dtype(DType::F32)?.to_vec1()?, bias.to_dtype(DType::F32)?.to_vec1()?))
    } else {
        None
    };
    let inner = candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?;
    Ok(GroupNorm { inner, affine, groups, eps })
}

impl GroupNorm {
    /// The norm followed by SiLU, as diffusers' ResNet blocks and output heads apply them.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.fused(xs, true)? {
            Some(out) => Ok(out),
            None => self.inner.forward(xs)?.silu(),
        }
    }

    /// The fused CPU computation, or `None` where candle's operations must run.
    fn fused(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Option<Tensor>> {
        let Some((scale, shift)) = &self.affine else { return Ok(None) };
        if !is_cpu_f32_inference(xs) || xs.rank() < 3 {
            return Ok(None);
        }
        let dims = xs.dims().to_vec();
        let channels = dims[1];
        if channels != scale.len() || !channels.is_multiple_of(self.groups) {
            return Ok(None);
        }
        let plane: usize = dims[2..].iter().product();
        let group_len = channels / self.groups * plane;
        let output = with_f32_slice(&xs.contiguous()?, |input| {
            let mut output = vec![0f32; input.len()];
            output.par_chunks_mut(group_len).zip(input.par_chunks(group_len)).enumerate().for_each(|(i, (out, x))| {
                let first_channel = (i % self.groups) * (channels / self.groups);
                normalise_group(x, out, plane, &scale[first_channel..], &shift[first_channel..], self.eps, silu);
            });
            Ok(output)
        })?;
        Ok(Some(Tensor::from_vec(output, dims, &Device::Cpu)?))
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.fused(xs, false)? {
            Some(out) => Ok(out),
            None => self.inner.forward(xs),
        }
    }
}

/// One group of one image: its channels' planes, one after another.
fn normalise_group(x: &[f32], out: &mut [f32], plane: usize, scale: &[f32], shift: &[f32], eps: f64, silu: bool) {
    let (mean, variance) = vectorized!(moments(x));
    let inv_std = 1.0 / (variance + eps).sqrt();
    for (c, (out, x)) in out.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).enumerate() {
        let a = (scale[c] as f64 * inv_std) as f32;
        let b = (shift[c] as f64 - mean * scale[c] as f64 * inv_std) as f32;
        if silu {
            vectorized!(affine_silu_line(x, out, a, b));
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * a + b;
            }
        }
    }
}

/// Lanes of the statistics' sums: each lane adds every `LANES`-th value, so the additions form `LANES`
/// independent chains that pipeline and vectorise instead of one chain as long as the group.
const LANES: usize = 16;

/// A group's mean and variance (about the mean, in a second pass), summed in f64 over [`LANES`] lanes. The lanes
/// are combined in a fixed order, so the result depends only on the group's values.
#[inline(always)]
fn moments(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v as f64) / n;
    let variance = lane_sum(x, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean, variance)
}

#[inline(always)]
fn lane_sum(x: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| term(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += term(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

#[inline(always)]
fn affine_silu_line(x: &[f32], out: &mut [f32], a: f32, b: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = silu_value(v * a + b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    fn max_relative_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / scale
    }

    fn norm(groups: usize, channels: usize) -> GroupNorm {
        let weights = HashMap::from([
            ("weight".to_string(), Tensor::randn(1f32, 0.3, channels, &Device::Cpu).unwrap()),
            ("bias".to_string(), Tensor::randn(0f32, 0.3, channels, &Device::Cpu).unwrap()),
        ]);
        group_norm(groups, channels, 1e-5, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap()
    }

    #[test]
    fn equals_candles_group_norm_and_silu() {
        for (shape, groups) in [((2, 8, 5, 7), 4), ((1, 32, 16, 16), 32), ((3, 6, 4, 4), 1)] {
            let gn = norm(groups, shape.1);
            assert!(gn.affine.is_some());
            // an offset and scale far from 0 and 1, where a one-pass variance would lose digits
            let xs = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().affine(3.0, 40.0).unwrap();
            let expected = gn.inner.forward(&xs).unwrap();
            let got = gn.forward(&xs).unwrap();
            assert!(max_relative_diff(&got, &expected) < 1e-5, "{shape:?}: {}", max_relative_diff(&got, &expected));
            let expected = expected.silu().unwrap();
            let got = gn.forward_silu(&xs).unwrap();
            assert!(max_relative_diff(&got, &expected) < 1e-5, "{shape:?} silu");
        }
    }

    #[test]
    fn tracked_weights_and_inputs_keep_candles_operations() {
        let varmap = VarMap::new();
        let training = group_norm(2, 4, 1e-5, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        assert!(training.affine.is_none());
        let xs = Tensor::randn(0f32, 1.0, (1, 4, 3, 3), &Device::Cpu).unwrap();
        assert!(training.fused(&xs, true).unwrap().is_none());
        let tracked = candle_core::Var::from_tensor(&xs).unwrap();
        assert!(norm(2, 4).fused(tracked.as_tensor(), true).unwrap().is_none());
    }
}
