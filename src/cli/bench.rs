//! `imago bench`: measures a workload (denoising it/s, images/s, stage times, job latency through the engine,
//! peak memory, TFLOP/s) and prints a table, optionally also writing the report as JSON.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use imago::bench::{BenchOptions, ModelSource, Preset, Workload};
use imago::diffusion::hub::{resolve_model, HubOptions};
use imago::diffusion::model::LoadOptions;
use imago::diffusion::schedulers::SchedulerKind;

use super::device::{parse_device, parse_dtype};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A named model: `default` (the embedded model), `tiny-<family>` (a miniature) or `<family>` (the published
    /// architecture, gigabytes of random weights written to the temporary folder), family being sd15, sd21,
    /// sd-turbo, sdxl or sdxl-turbo.
    #[arg(long, default_value = "default", conflicts_with = "model")]
    pub preset: String,
    /// A diffusers folder or a hub repo id in the local cache, instead of a preset.
    #[arg(long)]
    pub model: Option<String>,
    /// Image width in pixels (model default when omitted).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (model default when omitted).
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps (model default when omitted).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; above 1 every UNet call runs on twice the batch.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, euler, euler-a, dpm++2m or dpm++2m-karras (model default when omitted).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Images per job.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seed of every job (the same work each iteration).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The prompt of every job (never printed).
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16 (default: f16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Send the jobs in Private Mode.
    #[arg(long)]
    pub private: bool,
    /// Measured iterations.
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Iterations run first and not measured.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also write the report (with every sample) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let model = match args.model.as_deref() {
        None => ModelSource::Preset(args.preset.parse::<Preset>()?),
        Some("default") => ModelSource::Preset(Preset::Default),
        Some(spec) => {
            let hub = HubOptions { offline: true, ..HubOptions::from_env() };
            ModelSource::Folder(resolve_model(spec, &hub).with_context(|| format!("finding model {spec:?}"))?)
        }
    };
    let workload = Workload {
        model,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler,
        batch: args.batch,
        seed: args.seed,
        prompt: args.prompt,
        private: args.private,
        load: LoadOptions { device, dtype },
    };
    let report = imago::bench::run(&workload, BenchOptions { iterations: args.iterations, warmup: args.warmup })?;
    print!("{report}");
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(failure) = &report.failure {
        bail!("nothing was measured: the engine answered {}: {}", failure.code.as_str(), failure.message);
    }
    Ok(())
}
