//! GELU (exact, erf-based) and the GEGLU gate of the UNet's feed-forward, vectorized for CPU inference.
//!
//! candle computes GELU's erf with scalar calls, and GEGLU as three passes (split, GELU, product). Here erf is a
//! branch-free approximation the compiler vectorizes, within 3.5e-7 of the exact value (a few f32 rounding steps), and
//! GEGLU is one pass. Training and GPUs keep candle's operations.

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

use super::host::{is_cpu_f32_inference, vectorized, with_f32_slice};

/// Values handed to one rayon task at least: enough work per task that scheduling stays negligible.
const MIN_ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `x · Φ(x)` (`torch.nn.functional.gelu` with its default exact form).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    if !takes_fast_path(xs) {
        return xs.gelu_erf();
    }
    let xs = xs.contiguous()?;
    let values = with_f32_slice(&xs, |values| {
        let mut out = vec![0f32; values.len()];
        let chunk = MIN_ELEMENTS_PER_TASK;
        out.par_chunks_mut(chunk).zip(values.par_chunks(chunk)).for_each(|(out, xs)| vectorized!(gelu_line(xs, out)));
        Ok(out)
    })?;
    Tensor::from_vec(values, xs.shape(), xs.device())
}

/// diffusers' `GEGLU` after its projection: the last dimension holds a value half and a gate half, and the
/// result is `value · gelu(gate)`, half as wide.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    if width % 2 != 0 {
        return Err(candle_core::Error::Msg(format!("GEGLU needs an even width, got {width}")));
    }
    let half = width / 2;
    let mut out_shape = projected.dims().to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = half;
    }
    if projected.elem_count() == 0 {
        return Tensor::zeros(out_shape, projected.dtype(), projected.device());
    }
    if !takes_fast_path(projected) {
        let halves = projected.chunk(2, D::Minus1)?;
        return &halves[0] * halves[1].gelu_erf()?;
    }
    let projected = projected.contiguous()?;
    let values = with_f32_slice(&projected, |values| {
        let mut out = vec![0f32; values.len() / 2];
        let rows_per_task = (MIN_ELEMENTS_PER_TASK / width.max(1)).max(1);
        out.par_chunks_mut(half * rows_per_task).zip(values.par_chunks(width * rows_per_task)).for_each(
            |(out, rows)| {
                for (out, row) in out.chunks_exact_mut(half).zip(rows.chunks_exact(width)) {
                    let (value, gate) = row.split_at(half);
                    vectorized!(geglu_line(value, gate, out));
                }
            },
        );
        Ok(out)
    })?;
    Tensor::from_vec(values, out_shape, projected.device())
}

fn takes_fast_path(xs: &Tensor) -> bool {
    // Empty tensors go to candle too: a zero-width line has no chunks to split work by.
    is_cpu_f32_inference(xs) && xs.elem_count() > 0
}

#[inline(always)]
fn gelu_line(xs: &[f32], out: &mut [f32]) {
    for (out, &x) in out.iter_mut().zip(xs) {
        *out = gelu_value(x);
    }
}

#[inline(always)]
fn geglu_line(value: &[f32], gate: &[f32], out: &mut [f32]) {
    for ((out, &v), &g) in out.iter_mut().zip(value).zip(gate) {
        *out = v * gelu_value(g);
    }
}

#[inline(always)]
fn gelu_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf, branch-free so that a loop of it vectorizes: below 0.5 in magnitude its Taylor series to x¹¹ (truncation
/// error under 1e-8); above, Abramowitz & Stegun 7.1.26 (error under 1.5e-7), whose `1 - …` would lose the small
/// values to cancellation.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const TWO_OVER_SQRT_PI: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let a = x.abs();
    let s = a * a;
    let series = TWO_OVER_SQRT_PI
        * a
        * (1.0 + s * (-1.0 / 3.0 + s * (1.0 / 10.0 + s * (-1.0 / 42.0 + s * (1.0 / 216.0 + s * (-1.0 / 1320.0))))));
    // Beyond 4, erf is 1 in f32; clamping also keeps exp's argument in its range.
    let clamped = a.min(4.0);
    let t = 1.0 / (1.0 + P * clamped);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = 1.0 - poly * exp_negative(-clamped * clamped);
    let magnitude = if a < 0.5 { series } else { tail };
    magnitude.copysign(x)
}

/// SiLU, `y · sigmoid(y)`, branch-free so that it vectorizes: with e = e^(−|y|) ≤ 1, sigmoid is 1 / (1 + e) for
/// y ≥ 0 and e / (1 + e) below, and neither overflows. Below −87, where e^y leaves f32's normal range, the result
/// is 0 (the exact value is under 1e-35 in magnitude); NaN stays NaN.
#[inline(always)]
pub(super) fn silu_value(y: f32) -> f32 {
    let e = exp_negative((-y.abs()).max(-87.0));
    let numerator = if y >= 0.0 { 1.0 } else { e };
    if y < -87.0 {
        0.0
    } else {
        y * numerator / (1.0 + e)
    }
}

/// e^y for y in [-87, 0]: y = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-6 polynomial for e^r (Cephes' `expf`
/// coefficients, relative error about 1e-7), and 2^n put into the exponent bits.
#[inline(always)]
fn exp_negative(y: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let n = (y * std::f32::consts::LOG2_E).round_ties_even();
    let r = y - n * LN2_HIGH - n * LN2_LOW;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 0], so 2^n is a normal number: its biased exponent is n + 127.
    let two_to_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    e_r * two_to_n
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Values from -8 to 8 in steps of 1/1024, plus the extremes GELU sees in practice.
    fn sweep() -> Vec<f32> {
        let mut xs: Vec<f32> = (-8 * 1024..=8 * 1024).map(|i| i as f32 / 1024.0).collect();
        xs.extend([-1e4, -30.0, -9.5, 1e-7, -1e-7, 9.5, 30.0, 1e4]);
        xs
    }

    #[test]
    fn erf_is_within_three_and_a_half_ten_millionths_of_the_exact_value() {
        // Every 2^-16 from -8 to 8 (the largest error measured is 3.2e-7, just above 0.5 in magnitude).
        let fine = (-8 * 65536..=8 * 65536).map(|i| i as f32 / 65536.0);
        for x in fine.chain(sweep()) {
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            let ours = erf(x) as f64;
            assert!((ours - exact).abs() <= 3.5e-7, "erf({x}) = {ours}, exact {exact}");
        }
    }

    #[test]
    fn exp_matches_the_standard_library_on_its_range() {
        for i in 0..=87_000 {
            let y = -(i as f32) / 1000.0;
            let exact = (y as f64).exp();
            let ours = exp_negative(y) as f64;
            assert!((ours - exact).abs() <= 2e-7 * exact, "exp({y}) = {ours}, exact {exact}");
        }
    }

    #[test]
    fn silu_is_within_a_millionth_of_the_exact_value() {
        for y in sweep().into_iter().chain([-86.9, -87.0, -100.0, -f32::MAX, f32::MAX]) {
            let exact = y as f64 / (1.0 + (-(y as f64)).exp());
            let ours = silu_value(y) as f64;
            assert!((ours - exact).abs() <= 1e-6 * exact.abs().max(1.0), "silu({y}) = {ours}, exact {exact}");
        }
        assert!(silu_value(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_agrees_with_candles_exact_gelu() {
        let xs = Tensor::new(sweep().as_slice(), &Device::Cpu).unwrap();
        let ours = gelu(&xs).unwrap().to_vec1::<f32>().unwrap();
        let candle = xs.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for ((x, a), b) in sweep().iter().zip(&ours).zip(&candle) {
            assert!((a - b).abs() <= 1e-6 * x.abs().max(1.0), "gelu({x}): {a} vs candle's {b}");
        }
        assert_eq!(
            gelu(&Tensor::new(&[1e4f32, -1e4], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap(),
            [1e4, 0.0]
        );
    }

    #[test]
    fn geglu_is_value_times_gelu_of_gate_for_every_row() {
        let device = Device::Cpu;
        let projected = Tensor::randn(0f32, 2.0, (2, 5, 12), &device).unwrap();
        let ours = geglu(&projected).unwrap();
        assert_eq!(ours.dims(), [2, 5, 6]);
        let halves = projected.chunk(2, D::Minus1).unwrap();
        let reference = (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap();
        let difference = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(difference <= 1e-5, "largest difference {difference}");
    }

    #[test]
    fn empty_inputs_give_empty_results() {
        let projected = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(geglu(&projected).unwrap().dims(), [3, 0]);
        assert_eq!(gelu(&projected).unwrap().dims(), [3, 0]);
    }

    #[test]
    fn geglu_of_an_odd_width_is_an_error() {
        let projected = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let error = geglu(&projected).unwrap_err().to_string();
        assert!(error.contains("even width"), "{error}");
    }

    #[test]
    fn a_non_contiguous_input_gives_the_result_of_its_contiguous_copy() {
        let xs = Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu).unwrap().t().unwrap();
        let strided = gelu(&xs).unwrap().to_vec2::<f32>().unwrap();
        let copied = gelu(&xs.contiguous().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(strided, copied);
    }
}
