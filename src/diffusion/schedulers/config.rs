//! `scheduler/scheduler_config.json` as diffusers writes it.
//!
//! diffusers builds any scheduler from any scheduler config (`XScheduler.from_config(model_config)`): the keys the
//! file has win, every other setting takes the chosen class's own default. So every field here is optional, and each
//! scheduler resolves absent ones with its own defaults. Unknown keys are ignored, like diffusers does.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::diffusion::{Error, Result};

/// Largest accepted `num_train_timesteps`; keeps a corrupt config from asking for huge tables.
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// Parsed `scheduler_config.json`. Absent (or `null`) keys are `None` so each scheduler applies its own default.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfig {
    /// Where the config came from; named in error messages. Empty for configs built in code.
    #[serde(skip)]
    pub origin: PathBuf,
    /// `_class_name`: the scheduler class the model ships with (e.g. `PNDMScheduler` for SD 1.5).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Number of diffusion steps the model was trained with (diffusers default 1000).
    pub num_train_timesteps: Option<usize>,
    /// First beta of the training schedule (default 0.0001).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub beta_start: Option<f64>,
    /// Last beta of the training schedule (default 0.02).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub beta_end: Option<f64>,
    /// `linear` (default), `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon` (default), `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// `leading`, `trailing` or `linspace`; the default depends on the scheduler class.
    pub timestep_spacing: Option<String>,
    /// Offset added to `leading` timesteps (default 0; SD 1.x/2.x use 1).
    pub steps_offset: Option<usize>,
    /// Rescale betas to zero terminal SNR (default false).
    pub rescale_betas_zero_snr: Option<bool>,
    /// DDIM: use ᾱ = 1 after the last step instead of ᾱ_0 (default true).
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted clean sample to ±`clip_sample_range` (default true).
    pub clip_sample: Option<bool>,
    /// DDIM: clipping bound (default 1.0).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub clip_sample_range: Option<f64>,
    /// DDIM / DPM-Solver: dynamic thresholding (pixel-space models only; not supported).
    pub thresholding: Option<bool>,
    /// Euler: `linear` (default) interpolation of the sigma table.
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` (default) or `continuous` timesteps.
    pub timestep_type: Option<String>,
    /// Euler / DPM-Solver: Karras et al. sigma spacing (default false).
    pub use_karras_sigmas: Option<bool>,
    /// Euler / DPM-Solver: exponential sigma spacing (not supported).
    pub use_exponential_sigmas: Option<bool>,
    /// Euler / DPM-Solver: beta-distribution sigma spacing (not supported).
    pub use_beta_sigmas: Option<bool>,
    /// Karras spacing: smallest sigma (default: the training schedule's).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub sigma_min: Option<f64>,
    /// Karras spacing: largest sigma (default: the training schedule's).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub sigma_max: Option<f64>,
    /// Euler / DPM-Solver: sigma after the last step, `zero` (default) or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: first-order final step when there are fewer than 15 steps (default true).
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: first-order final step always (default false).
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: clip the schedule where λ(t) falls below this (default -inf).
    #[serde(default, deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: Lu et al. lambda spacing (not supported).
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: flow-matching sigmas (not supported).
    pub use_flow_sigmas: Option<bool>,
    /// DPM-Solver: learned-variance model outputs (not supported).
    pub variance_type: Option<String>,
}

/// What the denoising model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// The training beta schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (latent diffusion).
    ScaledLinear,
    /// The Glide cosine schedule.
    SquaredCosCapV2,
}

/// How inference timesteps are picked from the training range (table 2 of arXiv:2305.08891).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// Multiples of `train/steps` from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `train/steps` counted down from the last training step.
    Trailing,
    /// Evenly spaced over the whole training range.
    Linspace,
}

impl SchedulerConfig {
    /// Reads and parses a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile { path: path.to_path_buf() },
            _ => Error::io(path, e),
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `origin` is named in error messages.
    ///
    /// Like diffusers: keys listed in `_use_default_values` count as absent, and the non-standard tokens Python's
    /// json writes for non-finite floats (`-Infinity`, `Infinity`, `NaN`) are accepted.
    pub fn from_json_str(s: &str, origin: &Path) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(&quote_non_finite_tokens(s))
            .map_err(|e| Error::config(origin, format!("not valid JSON: {e}")))?;
        let object =
            value.as_object_mut().ok_or_else(|| Error::config(origin, "expected a JSON object at the top level"))?;
        if let Some(defaulted) = object.remove("_use_default_values") {
            let names = defaulted
                .as_array()
                .ok_or_else(|| Error::config(origin, "`_use_default_values` must be a list of key names"))?;
            for name in names.iter().filter_map(|n| n.as_str()) {
                object.remove(name);
            }
        }
        let mut config: Self =
            serde_json::from_value(value).map_err(|e| Error::config(origin, format!("unexpected value: {e}")))?;
        config.origin = origin.to_path_buf();
        Ok(config)
    }

    /// The model's prediction type (`epsilon` when absent, the default of every scheduler class).
    pub fn prediction_type(&self) -> Result<PredictionType> {
        match self.prediction_type.as_deref() {
            None | Some("epsilon") => Ok(PredictionType::Epsilon),
            Some("v_prediction") => Ok(PredictionType::VPrediction),
            Some("sample") => Ok(PredictionType::Sample),
            Some(other) => Err(self.invalid(format!(
                "prediction_type {other:?} is not supported (expected epsilon, v_prediction or sample)"
            ))),
        }
    }

    /// `num_train_timesteps`, defaulting to 1000 and checked to be usable.
    pub fn train_timesteps(&self) -> Result<usize> {
        let n = self.num_train_timesteps.unwrap_or(1000);
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
            return Err(self.invalid(format!("num_train_timesteps {n} is outside 2..={MAX_TRAIN_TIMESTEPS}")));
        }
        Ok(n)
    }

    /// The beta schedule (`linear` when absent).
    pub fn beta_schedule(&self) -> Result<BetaSchedule> {
        match self.beta_schedule.as_deref() {
            None | Some("linear") => Ok(BetaSchedule::Linear),
            Some("scaled_linear") => Ok(BetaSchedule::ScaledLinear),
            Some("squaredcos_cap_v2") => Ok(BetaSchedule::SquaredCosCapV2),
            Some(other) => Err(self.invalid(format!(
                "beta_schedule {other:?} is not supported (expected linear, scaled_linear or squaredcos_cap_v2)"
            ))),
        }
    }

    /// The timestep spacing, or `class_default` when absent.
    pub fn timestep_spacing_or(&self, class_default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(class_default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some(other) => Err(self.invalid(format!(
                "timestep_spacing {other:?} is not supported (expected leading, trailing or linspace)"
            ))),
        }
    }

    /// `final_sigmas_type` as "the last sigma is zero" (default) or "the last sigma is the training minimum".
    pub(crate) fn final_sigma_is_zero(&self) -> Result<bool> {
        match self.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(true),
            Some("sigma_min") => Ok(false),
            Some(other) => {
                Err(self.invalid(format!("final_sigmas_type {other:?} is not supported (expected zero or sigma_min)")))
            }
        }
    }

    /// Fails naming `key` when a feature flag we do not implement is switched on.
    pub(crate) fn reject_flag(&self, key: &str, value: Option<bool>) -> Result<()> {
        match value {
            Some(true) => Err(self.invalid(format!("{key} = true is not supported"))),
            _ => Ok(()),
        }
    }

    /// A [`Error::Config`] about this file.
    pub(crate) fn invalid(&self, message: impl std::fmt::Display) -> Error {
        Error::config(&self.origin, message)
    }
}

/// Accepts a JSON number, or one of the strings `quote_non_finite_tokens` turns Python's non-finite floats into.
fn lenient_f64<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrToken {
        Number(f64),
        Token(String),
    }
    match Option::<NumberOrToken>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrToken::Number(v)) => Ok(Some(v)),
        Some(NumberOrToken::Token(token)) => match token.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!("expected a number, found the string {other:?}"))),
        },
    }
}

/// Wraps the bare tokens `-Infinity`, `Infinity` and `NaN` (outside strings) in quotes so strict JSON parsers accept
/// them; Python's `json.dumps` writes `float('-inf')` that way (e.g. DPM-Solver's `lambda_min_clipped`).
fn quote_non_finite_tokens(text: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SchedulerConfig> {
        SchedulerConfig::from_json_str(json, Path::new("model/scheduler/scheduler_config.json"))
    }

    #[test]
    fn sd15_pndm_config_keeps_present_keys_and_leaves_the_rest_absent() {
        let config = parse(
            r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
                "clip_sample": false}"#,
        )
        .unwrap();
        assert_eq!(config.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(config.beta_start, Some(0.00085));
        assert_eq!(config.beta_schedule().unwrap(), BetaSchedule::ScaledLinear);
        assert_eq!(config.steps_offset, Some(1));
        assert_eq!(config.trained_betas, None);
        assert_eq!(config.timestep_spacing, None);
        assert_eq!(config.prediction_type().unwrap(), PredictionType::Epsilon);
        assert_eq!(config.timestep_spacing_or(TimestepSpacing::Linspace).unwrap(), TimestepSpacing::Linspace);
    }

    #[test]
    fn use_default_values_keys_count_as_absent() {
        let config =
            parse(r#"{"timestep_spacing": "leading", "steps_offset": 1, "_use_default_values": ["timestep_spacing"]}"#)
                .unwrap();
        assert_eq!(config.timestep_spacing, None);
        assert_eq!(config.steps_offset, Some(1));
    }

    #[test]
    fn python_non_finite_floats_are_read_outside_strings_only() {
        let config =
            parse(r#"{"lambda_min_clipped": -Infinity, "sigma_max": Infinity, "_class_name": "Not -Infinity"}"#)
                .unwrap();
        assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(config.sigma_max, Some(f64::INFINITY));
        assert_eq!(config.class_name.as_deref(), Some("Not -Infinity"));
    }

    #[test]
    fn bad_values_are_config_errors_naming_file_and_key() {
        let err = parse(r#"{"beta_schedule": "sigmoid"}"#).unwrap().beta_schedule().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Config { .. }));
        assert!(message.contains("scheduler_config.json") && message.contains("sigmoid"), "{message}");

        let err = parse(r#"{"prediction_type": "flow_prediction"}"#).unwrap().prediction_type().unwrap_err();
        assert!(err.to_string().contains("flow_prediction"));
        let err = parse(r#"{"timestep_spacing": "karras"}"#).unwrap().timestep_spacing_or(TimestepSpacing::Leading);
        assert!(err.unwrap_err().to_string().contains("karras"));
        let err = parse(r#"{"num_train_timesteps": 0}"#).unwrap().train_timesteps().unwrap_err();
        assert!(err.to_string().contains("num_train_timesteps 0"));
        assert!(matches!(parse(r#"{"steps_offset": "one"}"#), Err(Error::Config { .. })));
        assert!(matches!(parse("[1, 2]"), Err(Error::Config { .. })));
        assert!(matches!(parse("{"), Err(Error::Config { .. })));
    }

    #[test]
    fn missing_file_is_reported_as_missing() {
        let err = SchedulerConfig::from_file(Path::new("/nonexistent/scheduler_config.json")).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }
}
