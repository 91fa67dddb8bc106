//! DPM-Solver++ 2M (Lu et al. 2022: multistep, second order, midpoint), as diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`.
//!
//! Those three settings define the sampler, so they are fixed whatever the model's config says; every other key
//! (`lower_order_final`, `final_sigmas_type`, spacing, ...) is read from the config with the class's defaults.

use candle_core::Tensor;

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    alphas_cumprod, as_f32, interpolate, karras_sigmas, leading_timesteps, log_sigmas, numpy_linspace,
    sigma_to_timestep, trailing_timesteps, training_sigmas,
};
use super::{check_step_index, f32_tensor, weighted_sum, Scheduler, StepNoise};
use crate::diffusion::Result;

/// Below this many steps `lower_order_final` makes the last step first order (diffusers' threshold).
const LOWER_ORDER_FINAL_BELOW_STEPS: usize = 15;

/// DPM-Solver++ 2M sampler for one run; remembers the previous step's data prediction.
#[derive(Debug)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one, float32 values like diffusers.
    sigmas: Vec<f64>,
    prediction: PredictionType,
    /// First-order last step: `euler_at_final`, or `lower_order_final` with few steps, or a zero final sigma.
    first_order_last_step: bool,
    /// The previous step's index and predicted clean sample.
    history: Option<(usize, Tensor)>,
}

/// α_t = 1/√(σ²+1), σ_t = σ·α_t and λ = ln α_t − ln σ_t for a k-diffusion sigma.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistep {
    /// DPM-Solver++ 2M for `steps` steps, with Karras sigmas when `karras` (the config's `use_karras_sigmas` is
    /// overridden by the choice of kind).
    pub fn new(config: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        config.reject_flag("thresholding", config.thresholding)?;
        config.reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        config.reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        config.reject_flag("use_lu_lambdas", config.use_lu_lambdas)?;
        config.reject_flag("use_flow_sigmas", config.use_flow_sigmas)?;
        if let Some(variance) = &config.variance_type {
            return Err(config.invalid(format!("variance_type {variance:?} is not supported")));
        }
        let train = config.train_timesteps()?;
        let alphas_cumprod = alphas_cumprod(config, true)?;
        let table = training_sigmas(&alphas_cumprod);
        let last_timestep = train - clipped_count(&alphas_cumprod, config.lambda_min_clipped);
        let mut timesteps: Vec<f64> = match config.timestep_spacing_or(TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => numpy_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                .into_iter()
                .rev()
                .take(steps)
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => {
                let mut t = leading_timesteps(steps + 1, last_timestep / (steps + 1), config.steps_offset.unwrap_or(0));
                t.truncate(steps);
                t
            }
            TimestepSpacing::Trailing => trailing_timesteps(last_timestep, train, steps),
        };
        let mut sigmas: Vec<f64> = if karras {
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[train - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            let logs = log_sigmas(&table);
            // diffusers rounds these timesteps except for the cosine schedule, where it truncates to integers.
            let cosine = config.beta_schedule()? == BetaSchedule::SquaredCosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_timestep(s, &logs))
                .map(|t| if cosine { t.trunc() } else { t.round_ties_even() })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interpolate(&table, t)).collect()
        };
        let final_sigma_zero = config.final_sigma_is_zero()?;
        sigmas.push(if final_sigma_zero { 0.0 } else { table[0] as f64 });
        let step_count = timesteps.len();
        let first_order_last_step = config.euler_at_final.unwrap_or(false)
            || (config.lower_order_final.unwrap_or(true) && step_count < LOWER_ORDER_FINAL_BELOW_STEPS)
            || final_sigma_zero;
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(as_f32).collect(),
            prediction: config.prediction_type()?,
            first_order_last_step,
            history: None,
        })
    }

    /// The data prediction x₀ at step `step_index`.
    fn predicted_clean(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        Ok(match self.prediction {
            PredictionType::Epsilon => (sample - model_output.affine(sigma, 0.0)?)?.affine(1.0 / alpha, 0.0)?,
            PredictionType::VPrediction => weighted_sum(sample, alpha, model_output, -sigma)?,
            PredictionType::Sample => model_output.clone(),
        })
    }

    /// First-order (DDIM-like) update from step `step_index` to the next sigma.
    fn first_order(&self, clean: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (_, sigma_s, lambda_s) = alpha_sigma_lambda(self.sigmas[step_index]);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[step_index + 1]);
        let h = lambda_t - lambda_s;
        weighted_sum(sample, sigma_t / sigma_s, clean, -(alpha_t * ((-h).exp() - 1.0)))
    }

    /// Second-order midpoint update using this step's and the previous step's data predictions.
    fn second_order(
        &self,
        clean: &Tensor,
        previous_clean: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[step_index - 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[step_index]);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[step_index + 1]);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = (clean - previous_clean)?.affine(1.0 / r0, 0.0)?;
        let weight = alpha_t * ((-h).exp() - 1.0);
        let x = weighted_sum(sample, sigma_t / sigma_s0, clean, -weight)?;
        Ok((x - d1.affine(0.5 * weight, 0.0)?)?)
    }
}

/// How many of the last training timesteps `lambda_min_clipped` cuts off (diffusers' `searchsorted` over the
/// flipped float32 λ table).
fn clipped_count(alphas_cumprod: &[f32], lambda_min_clipped: Option<f64>) -> usize {
    let Some(threshold) = lambda_min_clipped else { return 0 };
    alphas_cumprod
        .iter()
        .rev()
        .map(|&a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64)
        .take_while(|&lambda| lambda < threshold)
        .count()
}

impl Scheduler for DpmSolverMultistep {
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
        let clean = self.predicted_clean(&model_output, &sample, step_index)?;
        let is_last = step_index + 1 == self.timesteps.len();
        let previous = match self.history.take() {
            Some((index, previous_clean)) if index + 1 == step_index => Some(previous_clean),
            _ => None,
        };
        let next = match previous {
            Some(previous_clean) if !(is_last && self.first_order_last_step) => {
                self.second_order(&clean, &previous_clean, &sample, step_index)?
            }
            _ => self.first_order(&clean, &sample, step_index)?,
        };
        self.history = Some((step_index, clean));
        Ok(next)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        weighted_sum(&f32_tensor(original)?, alpha, &f32_tensor(noise)?, sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json, std::path::Path::new("scheduler_config.json")).unwrap()
    }

    const SD: &str = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                         "steps_offset": 1"#;

    #[test]
    fn timesteps_follow_each_spacing() {
        let linspace = DpmSolverMultistep::new(&config(&format!("{SD}}}")), 4, false).unwrap();
        assert_eq!(linspace.timesteps, vec![999.0, 749.0, 500.0, 250.0]);
        let leading =
            DpmSolverMultistep::new(&config(&format!(r#"{SD}, "timestep_spacing": "leading"}}"#)), 4, false).unwrap();
        assert_eq!(leading.timesteps, vec![801.0, 601.0, 401.0, 201.0]);
        let trailing =
            DpmSolverMultistep::new(&config(&format!(r#"{SD}, "timestep_spacing": "trailing"}}"#)), 4, false).unwrap();
        assert_eq!(trailing.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(*linspace.sigmas.last().unwrap(), 0.0);
    }

    #[test]
    fn karras_timesteps_are_integers_from_the_top() {
        let karras = DpmSolverMultistep::new(&config(&format!("{SD}}}")), 10, true).unwrap();
        assert_eq!(karras.timesteps[0], 999.0);
        assert_eq!(*karras.timesteps.last().unwrap(), 0.0);
        assert!(karras.timesteps.iter().all(|t| t.fract() == 0.0));
        assert!(karras.sigmas.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn lambda_clipping_shortens_the_schedule() {
        let acp = alphas_cumprod(&config("{}"), true).unwrap();
        assert_eq!(clipped_count(&acp, None), 0);
        assert_eq!(clipped_count(&acp, Some(f64::NEG_INFINITY)), 0);
        let clipped = clipped_count(&acp, Some(-4.0));
        assert!(clipped > 0 && clipped < 1000, "{clipped}");
    }

    #[test]
    fn unsupported_options_are_rejected() {
        for json in
            [r#"{"use_lu_lambdas": true}"#, r#"{"variance_type": "learned_range"}"#, r#"{"thresholding": true}"#]
        {
            assert!(DpmSolverMultistep::new(&config(json), 4, false).is_err(), "{json}");
        }
    }
}
