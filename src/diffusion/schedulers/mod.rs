//! Noise schedulers: turn the denoising model's prediction at one timestep into the sample at the next.
//!
//! The math follows HF diffusers 0.42.1 (`DDIMScheduler`, `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`) including how it builds any scheduler from any
//! model's `scheduler_config.json`: keys present in the file win, absent ones take the chosen class's defaults.
//! `tests/parity_schedulers.rs` checks timesteps and whole trajectories against diffusers' own output.
//!
//! Scalars (sigmas, alphas) are f64 computed from diffusers' float32 tables; latents are f32 tensors on any device,
//! combined with candle ops so they stay where they are.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod schedule;

use std::str::FromStr;

use candle_core::{DType, Device, Shape, Tensor};

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestral;

use super::noise::NoiseSource;
use super::{Error, Result};

/// The samplers a request can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// DDIM, deterministic (η = 0).
    Ddim,
    /// Euler (k-diffusion "Euler"); with a model config using `trailing` spacing this is the SD-Turbo setup.
    Euler,
    /// Euler ancestral: Euler plus fresh noise every step.
    EulerAncestral,
    /// DPM-Solver++ 2M (multistep, second order, midpoint).
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras sigmas.
    DpmPp2mKarras,
}

impl SchedulerKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The canonical name (what `FromStr` accepts first).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::DpmPp2mKarras => "dpm++2m-karras",
        }
    }

    /// The scheduler a model folder asks for by `_class_name`, or `None` for classes we don't implement (PNDM, LMS,
    /// ...). A `DPMSolverMultistepScheduler` config with `use_karras_sigmas` gives [`SchedulerKind::DpmPp2mKarras`].
    pub fn from_class_name(config: &SchedulerConfig) -> Option<Self> {
        match config.class_name.as_deref()? {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" if config.use_karras_sigmas == Some(true) => {
                Some(SchedulerKind::DpmPp2mKarras)
            }
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            _ => None,
        }
    }
}

/// Known names, as listed in [`Error::UnknownScheduler`].
const KNOWN_NAMES: &str = "ddim, euler, euler-a, dpm++2m, dpm++2m-karras";

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the canonical names and common spellings: case-insensitive, `_` or space for `-`, `dpmpp` for `dpm++`
    /// (`euler_a`, `euler-ancestral`, `dpmpp_2m`, `DPM++ 2M Karras`, ...).
    fn from_str(name: &str) -> Result<Self> {
        let normalized = name.trim().to_ascii_lowercase().replace(['_', ' '], "-").replace("dpmpp", "dpm++");
        let normalized = normalized.replace("dpm++-", "dpm++");
        match normalized.as_str() {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler" => Ok(SchedulerKind::Euler),
            "euler-a" | "euler-ancestral" | "eulera" => Ok(SchedulerKind::EulerAncestral),
            "dpm++2m" => Ok(SchedulerKind::DpmPp2m),
            "dpm++2m-karras" => Ok(SchedulerKind::DpmPp2mKarras),
            _ => Err(Error::UnknownScheduler { name: name.to_string(), known: KNOWN_NAMES }),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialized as its canonical name (e.g. `"dpm++2m-karras"`).
impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// Deserialized from any name or alias [`FromStr`] accepts.
impl<'de> serde::Deserialize<'de> for SchedulerKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Source of the fresh noise ancestral samplers need per step. [`NoiseSource`] implements it; tests replay recorded
/// noise.
pub trait StepNoise {
    /// Standard normal noise of the given shape, dtype and device.
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

impl StepNoise for NoiseSource {
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        self.tensor(shape.clone(), dtype, device)
    }
}

/// A configured sampler for one run of `timesteps().len()` steps.
///
/// The pipeline loop is: `x = noise * init_noise_sigma()`; for each `i`: `out = unet(scale_model_input(x, i),
/// timesteps()[i])`, `x = step(out, i, x, noise)`. Tensors are f32 (other float dtypes are converted).
pub trait Scheduler: Send {
    /// The timesteps in run order; the UNet receives these values.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the sample into the range the model expects at `step_index`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
    /// The sample after step `step_index`, given the model's output on it. Multistep schedulers remember earlier
    /// outputs; calling with an index other than the previous one + 1 starts a fresh history (as img2img does).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor>;
    /// img2img: noises a clean latent to the noise level of `step_index` (diffusers `add_noise` at
    /// `timesteps[step_index]`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
}

/// Builds the `kind` sampler for `inference_steps` steps from a model's scheduler config.
///
/// Fails with [`Error::InvalidRequest`] for 0 steps or more steps than the model's training timesteps, and with
/// [`Error::Config`] for config values the scheduler does not support.
pub fn build(kind: SchedulerKind, config: &SchedulerConfig, inference_steps: usize) -> Result<Box<dyn Scheduler>> {
    let train_timesteps = config.train_timesteps()?;
    if inference_steps == 0 {
        return Err(Error::InvalidRequest("inference steps must be at least 1".into()));
    }
    if inference_steps > train_timesteps {
        return Err(Error::InvalidRequest(format!(
            "{inference_steps} inference steps exceed the model's {train_timesteps} training timesteps"
        )));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(config, inference_steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscrete::new(config, inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(config, inference_steps)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(config, inference_steps, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(config, inference_steps, true)?),
    })
}

/// Fails unless `step_index` addresses one of `step_count` steps.
fn check_step_index(step_index: usize, step_count: usize) -> Result<()> {
    if step_index >= step_count {
        return Err(Error::InvalidRequest(format!(
            "step index {step_index} is out of range for a {step_count}-step schedule"
        )));
    }
    Ok(())
}

/// `a·ca + b·cb`, elementwise.
fn weighted_sum(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

/// The tensor as f32, the dtype all scheduler math runs in.
fn f32_tensor(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sd15_config() -> SchedulerConfig {
        SchedulerConfig::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
                "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
            Path::new("sd15/scheduler_config.json"),
        )
        .unwrap()
    }

    #[test]
    fn names_and_aliases_parse_to_kinds() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        }
        let aliases = [
            ("euler_a", SchedulerKind::EulerAncestral),
            ("Euler-Ancestral", SchedulerKind::EulerAncestral),
            ("dpmpp_2m", SchedulerKind::DpmPp2m),
            ("DPM++ 2M", SchedulerKind::DpmPp2m),
            ("dpmpp_2m_karras", SchedulerKind::DpmPp2mKarras),
            ("dpm++_2m_karras", SchedulerKind::DpmPp2mKarras),
        ];
        for (alias, kind) in aliases {
            assert_eq!(alias.parse::<SchedulerKind>().unwrap(), kind, "{alias}");
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        match "lms".parse::<SchedulerKind>() {
            Err(Error::UnknownScheduler { name, known }) => {
                assert_eq!(name, "lms");
                assert_eq!(known, KNOWN_NAMES);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn class_name_picks_kind_and_karras_flag() {
        let mut config = sd15_config();
        assert_eq!(SchedulerKind::from_class_name(&config), None);
        config.class_name = Some("EulerDiscreteScheduler".into());
        assert_eq!(SchedulerKind::from_class_name(&config), Some(SchedulerKind::Euler));
        config.class_name = Some("DPMSolverMultistepScheduler".into());
        assert_eq!(SchedulerKind::from_class_name(&config), Some(SchedulerKind::DpmPp2m));
        config.use_karras_sigmas = Some(true);
        assert_eq!(SchedulerKind::from_class_name(&config), Some(SchedulerKind::DpmPp2mKarras));
    }

    #[test]
    fn zero_or_too_many_steps_are_rejected() {
        let config = sd15_config();
        for kind in SchedulerKind::ALL {
            let err = build(kind, &config, 0).err().unwrap();
            assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("at least 1")), "{err}");
            let err = build(kind, &config, 1001).err().unwrap();
            assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("1001")), "{err}");
            let defaults = SchedulerConfig::default();
            assert_eq!(build(kind, &defaults, 1000).unwrap().timesteps().len(), 1000, "{kind}");
        }
    }

    #[test]
    fn unsupported_config_values_are_config_errors() {
        let cases = [
            (r#"{"beta_schedule": "sigmoid"}"#, "sigmoid"),
            (r#"{"timestep_spacing": "karras"}"#, "karras"),
            (r#"{"prediction_type": "flow_prediction"}"#, "flow_prediction"),
        ];
        for (json, needle) in cases {
            let config = SchedulerConfig::from_json_str(json, Path::new("x/scheduler_config.json")).unwrap();
            for kind in SchedulerKind::ALL {
                let err = build(kind, &config, 10).err().unwrap();
                assert!(matches!(err, Error::Config { .. }), "{kind} {json}: {err}");
                assert!(err.to_string().contains(needle), "{kind}: {err}");
            }
        }
    }

    #[test]
    fn step_index_out_of_range_is_an_error_not_a_panic() {
        let device = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &device).unwrap();
        let mut noise = NoiseSource::new(0);
        for kind in SchedulerKind::ALL {
            let mut scheduler = build(kind, &sd15_config(), 4).unwrap();
            assert!(scheduler.scale_model_input(&x, 4).is_err(), "{kind}");
            assert!(scheduler.step(&x, 4, &x, &mut noise).is_err(), "{kind}");
            assert!(scheduler.add_noise(&x, &x, 4).is_err(), "{kind}");
        }
    }
}
