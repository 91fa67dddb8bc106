//! Euler ancestral (k-diffusion `sample_euler_ancestral`, η = 1), as diffusers' `EulerAncestralDiscreteScheduler`:
//! an Euler step to a lower noise level σ_down, then fresh noise of size σ_up brings it to the next sigma.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{predicted_clean, scale_for_sigma, sigma_schedule, EulerOptions, SigmaSchedule};
use super::{check_step_index, f32_tensor, Scheduler, StepNoise};
use crate::diffusion::Result;

/// Euler ancestral sampler for one run.
#[derive(Debug)]
pub struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestral {
    /// Euler ancestral for `steps` steps; absent config keys take `EulerAncestralDiscreteScheduler`'s defaults
    /// (linspace spacing). That class has no Karras, final-sigma or continuous-timestep options, so those keys of a
    /// model's config are ignored here, as diffusers does.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = config.prediction_type()?;
        if prediction == PredictionType::Sample {
            return Err(config.invalid("prediction_type \"sample\" is not supported by Euler ancestral"));
        }
        let options = EulerOptions { final_sigma_zero: true, ..EulerOptions::default() };
        Ok(Self { schedule: sigma_schedule(config, steps, options)?, prediction })
    }

    /// (σ_down, σ_up) for the step from `sigma` to `next_sigma`.
    fn split_noise_levels(sigma: f64, next_sigma: f64) -> (f64, f64) {
        let up = (next_sigma * next_sigma * (sigma * sigma - next_sigma * next_sigma) / (sigma * sigma)).sqrt();
        let down = (next_sigma * next_sigma - up * up).sqrt();
        (down, up)
    }
}

impl Scheduler for EulerAncestral {
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
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        check_step_index(step_index, self.schedule.timesteps.len())?;
        let (model_output, sample) = (f32_tensor(model_output)?, f32_tensor(sample)?);
        let sigma = self.schedule.sigmas[step_index];
        let (sigma_down, sigma_up) = Self::split_noise_levels(sigma, self.schedule.sigmas[step_index + 1]);
        let clean = predicted_clean(self.prediction, &model_output, &sample, sigma)?;
        let derivative = (&sample - clean)?.affine(1.0 / sigma, 0.0)?;
        let deterministic = (&sample + derivative.affine(sigma_down - sigma, 0.0)?)?;
        // Drawn on every step, the last (σ_up = 0) included, so a seed gives the same stream as diffusers'.
        let fresh = f32_tensor(&noise.sample(sample.shape(), sample.dtype(), sample.device())?)?;
        Ok((deterministic + fresh.affine(sigma_up, 0.0)?)?)
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
    use crate::diffusion::noise::NoiseSource;
    use candle_core::{DType, Device};

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json, std::path::Path::new("scheduler_config.json")).unwrap()
    }

    #[test]
    fn noise_levels_recombine_to_the_next_sigma() {
        let (down, up) = EulerAncestral::split_noise_levels(3.0, 1.5);
        assert!((down * down + up * up - 1.5 * 1.5).abs() < 1e-12);
        assert!(down < 1.5 && up > 0.0);
        assert_eq!(EulerAncestral::split_noise_levels(0.5, 0.0), (0.0, 0.0));
    }

    #[test]
    fn sample_prediction_is_rejected() {
        let err = EulerAncestral::new(&config(r#"{"prediction_type": "sample"}"#), 4).unwrap_err();
        assert!(err.to_string().contains("sample"), "{err}");
    }

    #[test]
    fn karras_key_of_an_euler_config_is_ignored() {
        let plain = EulerAncestral::new(&config("{}"), 10).unwrap();
        let with_key = EulerAncestral::new(&config(r#"{"use_karras_sigmas": true}"#), 10).unwrap();
        assert_eq!(plain.schedule.sigmas, with_key.schedule.sigmas);
    }

    #[test]
    fn step_noise_changes_the_result_except_on_the_last_step() {
        let device = Device::Cpu;
        let mut scheduler = EulerAncestral::new(&config("{}"), 2).unwrap();
        let x = NoiseSource::new(1).tensor((1, 4, 2, 2), DType::F32, &device).unwrap();
        let run = |scheduler: &mut EulerAncestral, seed: u64, index: usize| {
            let out = scheduler.step(&x, index, &x, &mut NoiseSource::new(seed)).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_ne!(run(&mut scheduler, 5, 0), run(&mut scheduler, 6, 0));
        assert_eq!(run(&mut scheduler, 5, 1), run(&mut scheduler, 6, 1));
    }
}
