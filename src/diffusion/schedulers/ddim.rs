//! DDIM (Song et al. 2020), deterministic (η = 0), as diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{alphas_cumprod, leading_timesteps, numpy_linspace, trailing_timesteps};
use super::{check_step_index, f32_tensor, weighted_sum, Scheduler, StepNoise};
use crate::diffusion::{Error, Result};

/// DDIM sampler for one run.
#[derive(Debug)]
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    /// ᾱ after the last step: 1, or ᾱ_0 when `set_alpha_to_one` is false.
    final_alpha_cumprod: f64,
    /// `train // steps`: how far back each step goes, whatever the spacing (as in diffusers).
    step_stride: usize,
    prediction: PredictionType,
    /// Bound for clipping the predicted clean sample, when `clip_sample` is on.
    clip_range: Option<f64>,
}

impl Ddim {
    /// DDIM for `steps` steps; absent config keys take `DDIMScheduler`'s defaults (leading spacing, clip_sample
    /// and set_alpha_to_one true).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let train = config.train_timesteps()?;
        config.reject_flag("thresholding", config.thresholding)?;
        let alphas_cumprod = alphas_cumprod(config, false)?;
        let offset = config.steps_offset.unwrap_or(0);
        let timesteps = match config.timestep_spacing_or(TimestepSpacing::Leading)? {
            TimestepSpacing::Linspace => {
                numpy_linspace(0.0, (train - 1) as f64, steps).into_iter().rev().map(f64::round_ties_even).collect()
            }
            TimestepSpacing::Leading => leading_timesteps(steps, train / steps, offset),
            TimestepSpacing::Trailing => trailing_timesteps(train, train, steps),
        };
        if let Some(&beyond) = timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
            return Err(Error::InvalidRequest(format!(
                "{steps} DDIM steps with steps_offset {offset} reach timestep {beyond}, outside the model's \
                 {train} training timesteps"
            )));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] as f64 };
        let clip_range = match config.clip_sample.unwrap_or(true) {
            true => Some(config.clip_sample_range.unwrap_or(1.0)),
            false => None,
        };
        Ok(Self {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_stride: train / steps,
            prediction: config.prediction_type()?,
            clip_range,
        })
    }

    /// ᾱ at the training timestep run at `step_index`.
    fn alpha_at(&self, step_index: usize) -> f64 {
        self.alphas_cumprod[self.timesteps[step_index] as usize] as f64
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let (model_output, sample) = (f32_tensor(model_output)?, f32_tensor(sample)?);
        let alpha = self.alpha_at(step_index);
        let previous_timestep = self.timesteps[step_index] as usize;
        let alpha_prev = match previous_timestep.checked_sub(self.step_stride) {
            Some(t) => self.alphas_cumprod[t] as f64,
            None => self.final_alpha_cumprod,
        };
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (mut predicted_clean, predicted_noise) = match self.prediction {
            PredictionType::Epsilon => {
                let clean = (&sample - model_output.affine(sqrt_beta, 0.0)?)?.affine(1.0 / sqrt_alpha, 0.0)?;
                (clean, model_output)
            }
            PredictionType::Sample => {
                let noise = (&sample - model_output.affine(sqrt_alpha, 0.0)?)?.affine(1.0 / sqrt_beta, 0.0)?;
                (model_output, noise)
            }
            PredictionType::VPrediction => (
                weighted_sum(&sample, sqrt_alpha, &model_output, -sqrt_beta)?,
                weighted_sum(&model_output, sqrt_alpha, &sample, sqrt_beta)?,
            ),
        };
        if let Some(range) = self.clip_range {
            predicted_clean = predicted_clean.clamp(-range, range)?;
        }
        weighted_sum(&predicted_clean, alpha_prev.sqrt(), &predicted_noise, (1.0 - alpha_prev).sqrt())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let alpha = self.alpha_at(step_index);
        weighted_sum(&f32_tensor(original)?, alpha.sqrt(), &f32_tensor(noise)?, (1.0 - alpha).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::noise::NoiseSource;
    use candle_core::{DType, Device};

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json, std::path::Path::new("scheduler_config.json")).unwrap()
    }

    const SD: &str = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                         "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false"#;

    #[test]
    fn timesteps_follow_each_spacing() {
        let leading = Ddim::new(&config(&format!("{SD}}}")), 4).unwrap();
        assert_eq!(leading.timesteps, vec![751.0, 501.0, 251.0, 1.0]);
        let trailing = Ddim::new(&config(&format!(r#"{SD}, "timestep_spacing": "trailing"}}"#)), 4).unwrap();
        assert_eq!(trailing.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
        let linspace = Ddim::new(&config(&format!(r#"{SD}, "timestep_spacing": "linspace"}}"#)), 4).unwrap();
        assert_eq!(linspace.timesteps, vec![999.0, 666.0, 333.0, 0.0]);
    }

    #[test]
    fn offset_pushing_past_the_training_range_is_rejected() {
        let err = Ddim::new(&config(&format!("{SD}}}")), 1000).unwrap_err();
        assert!(err.to_string().contains("timestep 1000"), "{err}");
    }

    #[test]
    fn thresholding_is_rejected() {
        let err = Ddim::new(&config(r#"{"thresholding": true}"#), 4).unwrap_err();
        assert!(err.to_string().contains("thresholding"), "{err}");
    }

    #[test]
    fn perfect_noise_prediction_recovers_the_clean_sample() {
        // With ε predicted exactly, the last step (to ᾱ = 1) must return the clean latent.
        let device = Device::Cpu;
        let mut scheduler = Ddim::new(&config(r#"{"clip_sample": false}"#), 1).unwrap();
        let mut source = NoiseSource::new(3);
        let clean = source.tensor((1, 4, 2, 2), DType::F32, &device).unwrap();
        let noise = source.tensor((1, 4, 2, 2), DType::F32, &device).unwrap();
        let noisy = scheduler.add_noise(&clean, &noise, 0).unwrap();
        let out = scheduler.step(&noise, 0, &noisy, &mut source).unwrap();
        let error = (out - &clean).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(error < 1e-3, "{error}");
    }
}
