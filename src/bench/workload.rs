//! What a benchmark runs: a model (a folder, the embedded default, or a family's architecture written on the fly
//! with random weights) and the job parameters, turned into the job message the engine receives and the request
//! the pipeline receives.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::diffusion::default_model::default_model_dir;
use crate::diffusion::model::LoadOptions;
use crate::diffusion::pipeline::GenerateParams;
use crate::diffusion::schedulers::SchedulerKind;
use crate::diffusion::tiny::{write_model, ModelScale, TinyFamily, TinyOptions};
use crate::job::JobMessage;

use super::BenchError;

/// A model chosen by name: the embedded default, or a family's miniature (`tiny-sd15`) or full-size (`sd15`)
/// architecture with random weights, written into a scratch folder for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The embedded default model (32×32).
    Default,
    /// A family's architecture with seeded random weights.
    Random { family: TinyFamily, scale: ModelScale },
}

impl Preset {
    /// Every preset name, as listed to users.
    pub fn names() -> Vec<String> {
        let families = TinyFamily::ALL.into_iter().filter(|f| !f.is_inpaint());
        let random = families.flat_map(|f| [format!("tiny-{f}"), f.to_string()]);
        std::iter::once("default".to_string()).chain(random).collect()
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Preset::Default => f.write_str("default"),
            Preset::Random { family, scale: ModelScale::Miniature } => write!(f, "tiny-{family}"),
            Preset::Random { family, scale: ModelScale::FullSize } => write!(f, "{family}"),
        }
    }
}

impl FromStr for Preset {
    type Err = BenchError;

    fn from_str(name: &str) -> Result<Self, BenchError> {
        if name == "default" {
            return Ok(Preset::Default);
        }
        let (family, scale) = match name.strip_prefix("tiny-") {
            Some(family) => (family, ModelScale::Miniature),
            None => (name, ModelScale::FullSize),
        };
        match family.parse::<TinyFamily>() {
            // Inpainting UNets need an image and a mask: they cannot run a text-to-image benchmark.
            Ok(family) if !family.is_inpaint() => Ok(Preset::Random { family, scale }),
            _ => Err(BenchError::UnknownPreset { name: name.to_string(), known: Preset::names().join(", ") }),
        }
    }
}

/// Where the benchmarked model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Preset(Preset),
    /// A diffusers folder (the one holding `model_index.json`).
    Folder(PathBuf),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Preset(preset) => write!(f, "{preset}"),
            ModelSource::Folder(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A benchmark's model and job parameters. Absent parameters take the model's defaults.
#[derive(Debug, Clone)]
pub struct Workload {
    pub model: ModelSource,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub batch: usize,
    pub seed: u64,
    pub prompt: String,
    /// Run the jobs in Private Mode.
    pub private: bool,
    pub load: LoadOptions,
}

impl Workload {
    /// The job the engine receives for iteration `index`, with every parameter explicit (as `params` resolved
    /// them), so the engine and the direct pipeline runs do the same work.
    pub fn job_message(&self, index: usize, params: &GenerateParams) -> JobMessage {
        JobMessage {
            width: Some(params.width as u32),
            height: Some(params.height as u32),
            steps: Some(params.steps as u32),
            guidance: Some(params.guidance),
            seed: Some(params.seed),
            scheduler: Some(params.scheduler.name().to_string()),
            batch: params.batch as u32,
            private: self.private,
            ..JobMessage::generate(format!("bench-{index}"), self.prompt.clone())
        }
    }
}

/// A model folder ready to load; a folder written for the run is deleted when this is dropped.
#[derive(Debug)]
pub struct PreparedModel {
    pub dir: PathBuf,
    scratch: Option<ScratchDir>,
}

impl PreparedModel {
    /// Whether the folder was written for this run (and is deleted afterwards).
    pub fn is_scratch(&self) -> bool {
        self.scratch.is_some()
    }
}

/// Finds or writes the model folder of `source`. Full-size presets write gigabytes (SD 1.5: 4.3 GB, SDXL: 14 GB)
/// into the system's temporary folder; pass a folder written once with `imago dev tiny-model --full-size` to
/// benchmark the same architecture repeatedly.
pub fn prepare_model(source: &ModelSource) -> Result<PreparedModel, BenchError> {
    match source {
        ModelSource::Folder(dir) => Ok(PreparedModel { dir: dir.clone(), scratch: None }),
        ModelSource::Preset(Preset::Default) => {
            let dir = default_model_dir().ok_or(BenchError::NoDefaultModel)?;
            Ok(PreparedModel { dir, scratch: None })
        }
        ModelSource::Preset(Preset::Random { family, scale }) => {
            let scratch = ScratchDir::new()?;
            let dir = scratch.path().join(family.name());
            write_model(&dir, TinyOptions { family: *family, seed: 0, fp16_variant: false }, *scale)?;
            Ok(PreparedModel { dir, scratch: Some(scratch) })
        }
    }
}

/// A uniquely named folder under the system's temporary folder, removed with its contents on drop.
#[derive(Debug)]
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new() -> Result<Self, BenchError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("imago-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| BenchError::Io { path: path.clone(), source })?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the benchmark's scratch folder");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_names_parse_back_to_the_same_preset() {
        for name in Preset::names() {
            assert_eq!(name.parse::<Preset>().unwrap().to_string(), name);
        }
        assert_eq!(
            "tiny-sdxl".parse::<Preset>().unwrap(),
            Preset::Random { family: TinyFamily::Sdxl, scale: ModelScale::Miniature }
        );
        assert_eq!(
            "sd-turbo".parse::<Preset>().unwrap(),
            Preset::Random { family: TinyFamily::SdTurbo, scale: ModelScale::FullSize }
        );
    }

    #[test]
    fn unknown_and_inpainting_presets_are_refused_with_the_known_names() {
        for name in ["sd3", "tiny-sd15-inpaint", "tiny-"] {
            let err = name.parse::<Preset>().unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("tiny-sd15, sd15"), "{err}");
        }
    }

    #[test]
    fn a_written_preset_folder_is_removed_with_its_handle() {
        let source = ModelSource::Preset("tiny-sd15".parse().unwrap());
        let prepared = prepare_model(&source).unwrap();
        assert!(prepared.dir.join("unet/diffusion_pytorch_model.safetensors").is_file());
        assert!(prepared.is_scratch());
        let dir = prepared.dir.clone();
        drop(prepared);
        assert!(!dir.exists());
    }

    #[test]
    fn the_job_message_carries_every_resolved_parameter() {
        let workload = Workload {
            model: ModelSource::Preset(Preset::Default),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            scheduler: None,
            batch: 2,
            seed: 9,
            prompt: "a red circle".into(),
            private: true,
            load: LoadOptions::cpu(),
        };
        let params = GenerateParams {
            prompt: "a red circle".into(),
            negative_prompt: String::new(),
            width: 48,
            height: 32,
            steps: 7,
            guidance: 3.0,
            seed: 9,
            scheduler: SchedulerKind::EulerAncestral,
            batch: 2,
        };
        let message = workload.job_message(3, &params);
        assert_eq!(message.id, "bench-3");
        assert_eq!((message.width, message.height, message.steps), (Some(48), Some(32), Some(7)));
        assert_eq!((message.guidance, message.seed, message.batch), (Some(3.0), Some(9), 2));
        assert_eq!(message.scheduler.as_deref(), Some("euler-a"));
        assert!(message.private);
    }
}
