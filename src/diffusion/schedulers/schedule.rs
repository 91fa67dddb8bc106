//! Noise-schedule arithmetic shared by the schedulers: training betas and cumulative alphas, sigma tables, timestep
//! spacings, Karras sigmas and numpy-style interpolation.
//!
//! diffusers builds these tables partly in float32 (torch) and partly in float64 (numpy). We reproduce its precisions
//! and operation order, because a last-bit difference in the cumulative product of alphas grows to ~1e-4 in the
//! largest sigma, and parity with diffusers is what the tests check.

use super::config::{BetaSchedule, SchedulerConfig};
use crate::diffusion::Result;

/// ᾱ_t (`alphas_cumprod`) for every training timestep, in float32 like diffusers.
///
/// `floor_terminal_alpha`: Euler and DPM-Solver replace the last ᾱ of a zero-terminal-SNR schedule with 2⁻²⁴ so the
/// first sigma is finite; DDIM keeps the zero.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, floor_terminal_alpha: bool) -> Result<Vec<f32>> {
    let mut betas = betas(config)?;
    let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
    if rescale {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut cumprod = cumulative_product(&alphas);
    if rescale && floor_terminal_alpha {
        if let Some(last) = cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(cumprod)
}

/// The training betas, float32.
fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.train_timesteps()?;
    let betas: Vec<f32> = if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            return Err(
                config.invalid(format!("trained_betas has {} values but num_train_timesteps is {n}", trained.len()))
            );
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        let start = config.beta_start.unwrap_or(0.0001);
        let end = config.beta_end.unwrap_or(0.02);
        for (key, value) in [("beta_start", start), ("beta_end", end)] {
            if !(0.0..1.0).contains(&value) {
                return Err(config.invalid(format!("{key} {value} is outside [0, 1)")));
            }
        }
        match config.beta_schedule()? {
            BetaSchedule::Linear => torch_linspace_f32(start, end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect()
            }
            BetaSchedule::SquaredCosCapV2 => glide_cosine_betas(n),
        }
    };
    if let Some(bad) = betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
        return Err(config.invalid(format!("beta {bad} is outside [0, 1)")));
    }
    Ok(betas)
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: both halves are computed from their own end with a
/// fused multiply-add, which is what makes the values bit-identical to torch's.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// The Glide cosine schedule (`betas_for_alpha_bar` with the cosine transform), computed in f64 then rounded.
fn glide_cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of float32 values on the CPU: accumulated in f64, each partial product rounded to f32.
fn cumulative_product(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&v| {
            product *= v as f64;
            product as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (arXiv:2305.08891, algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_cumprod: Vec<f32> = cumulative_product(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = match (sqrt_cumprod.first(), sqrt_cumprod.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return betas.to_vec(),
    };
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = sqrt_cumprod.iter().map(|s| ((s - last) * scale).powi(2)).collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alphas_bar[0]);
    rescaled.extend(alphas_bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    rescaled
}

/// σ_t = √((1−ᾱ_t)/ᾱ_t) for every training timestep, float32 like diffusers.
pub(crate) fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(x, arange(len(table)), table)`: linear interpolation of a table indexed by training timestep, clamped
/// to the first and last entries outside the table.
pub(crate) fn interpolate(table: &[f32], x: f64) -> f64 {
    let (Some(&first), Some(&last)) = (table.first(), table.last()) else {
        return f64::NAN;
    };
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return first as f64;
    }
    let last_index = (table.len() - 1) as f64;
    if x >= last_index {
        return last as f64;
    }
    let j = x.floor();
    let (low, high) = (table[j as usize] as f64, table[j as usize + 1] as f64);
    if x == j {
        return low;
    }
    (high - low) * (x - j) + low
}

/// `np.linspace(start, stop, num)`: `start + i·step`, the last value exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `np.arange(start, 0, -step)` for a positive fractional `step`, limited to `max_count` values.
///
/// numpy sizes the range as ⌈start/step⌉, which floating-point error sometimes makes one too many (e.g. 1000 by
/// 1000/61 gives 62 values, the last ≈ 1e-13); diffusers then schedules a bogus extra timestep −1. The limit drops
/// that value; every value kept is the one numpy computes (`start + i·(second − start)`).
pub(crate) fn numpy_arange_down(start: f64, step: f64, max_count: usize) -> Vec<f64> {
    let count = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let count = count.min(max_count);
    let second = start - step;
    let delta = second - start;
    (0..count)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `trailing` spacing: `round(arange(start, 0, -train/steps)) - 1`, descending.
pub(crate) fn trailing_timesteps(start: usize, train_timesteps: usize, steps: usize) -> Vec<f64> {
    let step = train_timesteps as f64 / steps as f64;
    numpy_arange_down(start as f64, step, steps).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
}

/// `leading` spacing: `count` multiples of `ratio` from 0, descending, plus `offset`.
pub(crate) fn leading_timesteps(count: usize, ratio: usize, offset: usize) -> Vec<f64> {
    (0..count).rev().map(|i| (i * ratio + offset) as f64).collect()
}

/// Karras et al. (2022) sigmas: `num` values from `sigma_max` down to `sigma_min`, evenly spaced in σ^(1/7).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    numpy_linspace(0.0, 1.0, num)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// The fractional training timestep whose sigma is `sigma`, by linear interpolation in log σ (diffusers'
/// `_sigma_to_t`). `log_sigmas` are ln of the training sigmas, ascending with t.
pub(crate) fn sigma_to_timestep(sigma: f64, log_sigmas: &[f32]) -> f64 {
    if log_sigmas.len() < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is ≤ ours (0 if none), kept one short of the end so there is a next entry.
    let low_index =
        log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_index] as f64, log_sigmas[low_index + 1] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_index as f64 + w * (low_index + 1) as f64
}

/// ln of each training sigma, float32 like diffusers' `np.log` of its float32 table.
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// Rounds to f32 and back: diffusers stores its inference sigmas and timesteps as float32.
pub(crate) fn as_f32(value: f64) -> f64 {
    value as f32 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_config() -> SchedulerConfig {
        SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            ..Default::default()
        }
    }

    #[test]
    fn scaled_linear_schedule_matches_diffusers_endpoints() {
        let acp = alphas_cumprod(&sd_config(), true).unwrap();
        assert_eq!(acp.len(), 1000);
        // diffusers 0.42.1 (float32): alphas_cumprod[0] = 0.9991499781608582, [999] = 0.00466009508818388,
        // largest sigma 14.614646911621094. Bit-identical, since the table is built the same way.
        assert_eq!(acp[0] as f64, 0.999_149_978_160_858_2);
        assert_eq!(acp[999] as f64, 0.004_660_095_088_183_88);
        assert_eq!(training_sigmas(&acp)[999] as f64, 14.614_646_911_621_094);
    }

    #[test]
    fn zero_terminal_snr_floors_last_alpha_only_when_asked() {
        let config = SchedulerConfig { rescale_betas_zero_snr: Some(true), ..sd_config() };
        assert_eq!(alphas_cumprod(&config, false).unwrap()[999], 0.0);
        assert_eq!(alphas_cumprod(&config, true).unwrap()[999], 2f32.powi(-24));
    }

    #[test]
    fn bad_betas_are_rejected() {
        let config = SchedulerConfig { beta_end: Some(1.5), ..Default::default() };
        assert!(alphas_cumprod(&config, false).unwrap_err().to_string().contains("beta_end 1.5"));
        let config = SchedulerConfig { trained_betas: Some(vec![0.1; 10]), ..Default::default() };
        assert!(alphas_cumprod(&config, false).unwrap_err().to_string().contains("10 values"));
    }

    #[test]
    fn trailing_spacing_drops_numpys_spurious_last_value() {
        let t = trailing_timesteps(1000, 1000, 61);
        assert_eq!(t.len(), 61);
        assert_eq!(t[0], 999.0);
        assert!(t.iter().all(|&v| v >= 0.0));
        assert_eq!(trailing_timesteps(1000, 1000, 4), vec![999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn interpolation_clamps_and_hits_table_entries_exactly() {
        let table = [1.0f32, 2.0, 4.0];
        assert_eq!(interpolate(&table, -1.0), 1.0);
        assert_eq!(interpolate(&table, 1.0), 2.0);
        assert_eq!(interpolate(&table, 1.25), 2.5);
        assert_eq!(interpolate(&table, 7.0), 4.0);
    }

    #[test]
    fn karras_sigmas_span_max_to_min_and_map_back_to_timesteps() {
        let sigmas = karras_sigmas(0.03, 14.6, 5);
        assert!((sigmas[0] - 14.6).abs() < 1e-12 && (sigmas[4] - 0.03).abs() < 1e-12);
        assert!(sigmas.windows(2).all(|w| w[0] > w[1]));
        let table = training_sigmas(&alphas_cumprod(&sd_config(), true).unwrap());
        let logs = log_sigmas(&table);
        assert!((sigma_to_timestep(table[500] as f64, &logs) - 500.0).abs() < 1e-3);
        assert_eq!(sigma_to_timestep(1e6, &logs), 999.0);
        assert_eq!(sigma_to_timestep(0.0, &logs), 0.0);
    }
}
