//! Euler (Karras et al. 2022, algorithm 2 without churn), as diffusers' `EulerDiscreteScheduler`, plus the sigma
//! schedule it shares with Euler ancestral.
//!
//! The SD-Turbo / SDXL-Turbo setup is this scheduler with the model config's `timestep_spacing: "trailing"`.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    alphas_cumprod, as_f32, interpolate, karras_sigmas, leading_timesteps, log_sigmas, numpy_linspace,
    sigma_to_timestep, trailing_timesteps, training_sigmas,
};
use super::{check_step_index, f32_tensor, weighted_sum, Scheduler, StepNoise};
use crate::diffusion::Result;

/// Timesteps and sigmas of a k-diffusion style (sigma-parameterised) run.
#[derive(Debug)]
pub(crate) struct SigmaSchedule {
    /// Timesteps fed to the UNet, float32 values like diffusers.
    pub timesteps: Vec<f64>,
    /// One sigma per step plus the final one, float32 values like diffusers.
    pub sigmas: Vec<f64>,
    /// Standard deviation of the initial noise.
    pub init_noise_sigma: f64,
}

/// Options of the Euler family that only `EulerDiscreteScheduler` reads from the config.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EulerOptions {
    pub karras: bool,
    pub final_sigma_zero: bool,
    /// `timestep_type: continuous` with v-prediction: the UNet gets 0.25·ln σ instead of t.
    pub continuous_timesteps: bool,
}

/// The Euler-family schedule: timesteps by spacing, sigmas interpolated from the training table (or Karras).
pub(crate) fn sigma_schedule(config: &SchedulerConfig, steps: usize, options: EulerOptions) -> Result<SigmaSchedule> {
    let train = config.train_timesteps()?;
    let alphas_cumprod = alphas_cumprod(config, true)?;
    let spacing = config.timestep_spacing_or(TimestepSpacing::Linspace)?;
    let mut timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => {
            numpy_linspace(0.0, (train - 1) as f64, steps).into_iter().rev().map(as_f32).collect()
        }
        TimestepSpacing::Leading => leading_timesteps(steps, train / steps, config.steps_offset.unwrap_or(0)),
        TimestepSpacing::Trailing => trailing_timesteps(train, train, steps),
    };
    let table = training_sigmas(&alphas_cumprod);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interpolate(&table, t)).collect();
    if options.karras {
        let (Some(&smallest), Some(&largest)) = (sigmas.last(), sigmas.first()) else {
            return Err(config.invalid("no inference timesteps"));
        };
        let sigma_min = config.sigma_min.unwrap_or(smallest);
        let sigma_max = config.sigma_max.unwrap_or(largest);
        sigmas = karras_sigmas(sigma_min, sigma_max, steps);
        let logs = log_sigmas(&table);
        timesteps = sigmas.iter().map(|&s| as_f32(sigma_to_timestep(s, &logs))).collect();
    }
    let final_sigma = if options.final_sigma_zero { 0.0 } else { table[0] as f64 };
    sigmas.push(final_sigma);
    let sigmas: Vec<f64> = sigmas.into_iter().map(as_f32).collect();
    if options.continuous_timesteps {
        timesteps = sigmas[..steps].iter().map(|&s| (0.25 * (s as f32).ln()) as f64).collect();
    }
    // diffusers takes the max over its float32 sigmas and, for leading spacing, √(σ²+1) in float32 too.
    let max_sigma = sigmas.iter().fold(0.0f32, |m, &s| m.max(s as f32));
    let init_noise_sigma = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma as f64,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt() as f64,
    };
    Ok(SigmaSchedule { timesteps, sigmas, init_noise_sigma })
}

/// The model input at noise level σ: x / √(σ²+1).
pub(crate) fn scale_for_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(f32_tensor(sample)?.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
}

/// The predicted clean sample x₀ at noise level σ (k-diffusion `denoised`).
pub(crate) fn predicted_clean(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (sample - model_output.affine(sigma, 0.0)?)?,
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            weighted_sum(model_output, -sigma / variance.sqrt(), sample, 1.0 / variance)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

/// Euler sampler for one run.
#[derive(Debug)]
pub struct EulerDiscrete {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerDiscrete {
    /// Euler for `steps` steps; absent config keys take `EulerDiscreteScheduler`'s defaults (linspace spacing,
    /// linear interpolation, discrete timesteps, final sigma zero).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        config.reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => return Err(config.invalid(format!("interpolation_type {other:?} is not supported"))),
        }
        let prediction = config.prediction_type()?;
        let continuous = match config.timestep_type.as_deref() {
            None | Some("discrete") => false,
            Some("continuous") => prediction == PredictionType::VPrediction,
            Some(other) => return Err(config.invalid(format!("timestep_type {other:?} is not supported"))),
        };
        let options = EulerOptions {
            karras: config.use_karras_sigmas.unwrap_or(false),
            final_sigma_zero: config.final_sigma_is_zero()?,
            continuous_timesteps: continuous,
        };
        Ok(Self { schedule: sigma_schedule(config, steps, options)?, prediction })
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.schedule.timesteps.len())?;
        scale_for_sigma(sample, self.schedule.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        check_step_index(step_index, self.schedule.timesteps.len())?;
        let (model_output, sample) = (f32_tensor(model_output)?, f32_tensor(sample)?);
        let sigma = self.schedule.sigmas[step_index];
        let next_sigma = self.schedule.sigmas[step_index + 1];
        let clean = predicted_clean(self.prediction, &model_output, &sample, sigma)?;
        let derivative = (&sample - clean)?.affine(1.0 / sigma, 0.0)?;
        Ok((sample + derivative.affine(next_sigma - sigma, 0.0)?)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.schedule.timesteps.len())?;
        let sigma = self.schedule.sigmas[step_index];
        Ok((f32_tensor(original)? + f32_tensor(noise)?.affine(sigma, 0.0)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json, std::path::Path::new("scheduler_config.json")).unwrap()
    }

    const TURBO: &str = r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "trailing"}"#;

    #[test]
    fn turbo_single_step_starts_at_the_last_training_timestep() {
        let euler = EulerDiscrete::new(&config(TURBO), 1).unwrap();
        assert_eq!(euler.timesteps(), &[999.0]);
        // diffusers 0.42.1: sigmas [14.614647, 0.0], init_noise_sigma 14.614647 (trailing: no √(σ²+1)).
        assert!((euler.init_noise_sigma() - 14.614_647).abs() < 1e-5, "{}", euler.init_noise_sigma());
        assert_eq!(euler.schedule.sigmas.len(), 2);
        assert_eq!(euler.schedule.sigmas[1], 0.0);
    }

    #[test]
    fn linspace_timesteps_are_fractional_and_leading_are_offset() {
        let linspace = EulerDiscrete::new(&config(r#"{}"#), 25).unwrap();
        assert_eq!(linspace.timesteps()[..3], [999.0, 957.375, 915.75]);
        let leading = EulerDiscrete::new(&config(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#), 4).unwrap();
        assert_eq!(leading.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let sigma = leading.schedule.sigmas[0] as f32;
        assert_eq!(leading.init_noise_sigma(), (sigma * sigma + 1.0).sqrt() as f64);
    }

    #[test]
    fn unsupported_options_are_rejected() {
        for json in [
            r#"{"interpolation_type": "log_linear"}"#,
            r#"{"use_beta_sigmas": true}"#,
            r#"{"final_sigmas_type": "one"}"#,
            r#"{"timestep_type": "edm"}"#,
        ] {
            assert!(EulerDiscrete::new(&config(json), 4).is_err(), "{json}");
        }
    }

    #[test]
    fn karras_sigmas_are_monotone_with_matching_timesteps() {
        let euler = EulerDiscrete::new(&config(r#"{"use_karras_sigmas": true}"#), 10).unwrap();
        assert!(euler.schedule.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert!(euler.timesteps().windows(2).all(|w| w[0] > w[1]));
        assert!((euler.timesteps()[0] - 999.0).abs() < 1e-3, "{:?}", euler.timesteps());
    }
}
