//! `imago generate`: text-to-image on this machine, with a progress bar.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::hub::{resolve_model, HubOptions};
use imago::diffusion::image_io::{encode_png, parameters_text, tensor_to_images};
use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::pipeline::{GenerateParams, GenerateRequest, Generated};
use imago::diffusion::schedulers::SchedulerKind;
use indicatif::{ProgressBar, ProgressStyle};

use super::device::{parse_device, parse_dtype};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: GenerationArgs,
}

/// Options shared by `generate` and `edit`.
#[derive(Debug, Args)]
pub struct GenerationArgs {
    /// What to draw.
    pub prompt: String,
    /// Output PNG; with --batch N, files are numbered (out-0.png, out-1.png, …).
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    /// A diffusers folder or a hub repo id (owner/name), looked up in the Hugging Face cache. Default: the embedded
    /// model (`models/default`).
    #[arg(long, env = "IMAGO_MODEL")]
    pub model: Option<String>,
    /// What to steer away from (used when guidance > 1).
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Denoising steps (model default when omitted).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; ≤ 1 disables guidance (Turbo models use 0).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Seed of the initial noise; random (and printed) when omitted.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Image size as WxH, multiples of 8.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// ddim, euler, euler-a, dpm++2m or dpm++2m-karras (model default when omitted).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Images per prompt; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16 (default: f16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write the initial noise and final latents as safetensors into this folder (debugging, parity).
    #[arg(long)]
    pub dump_latents: Option<PathBuf>,
    /// Do not store the prompt and parameters in the PNG.
    #[arg(long)]
    pub no_metadata: bool,
}

pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?} is not WxH"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{v:?} in {s:?} is not a number"));
    Ok((num(w)?, num(h)?))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let args = args.common;
    let (model, spec) = load_model(&args)?;
    let params = model.params(request(&args, None))?;
    let bar = progress_bar(params.steps);
    let generated = model.generate(&params, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();
    finish(&args, &spec, &params, &generated, &[])
}

/// Resolves `--model` (a folder or hub repo id) and loads it on the requested device.
pub fn load_model(args: &GenerationArgs) -> anyhow::Result<(DiffusionModel, String)> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let spec = match (&args.model, default_model_dir()) {
        (Some(spec), _) => spec.clone(),
        (None, Some(default)) => default.to_string_lossy().into_owned(),
        (None, None) => bail!(
            "no model given and no default model installed: pass --model with a diffusers folder or a hub repo id"
        ),
    };
    let hub = HubOptions { prefer_fp16: dtype != candle_core::DType::F32, ..HubOptions::from_env() };
    let root = resolve_model(&spec, &hub)?;
    let model = DiffusionModel::load(&root, &LoadOptions { device, dtype })
        .with_context(|| format!("loading {}", root.display()))?;
    Ok((model, spec))
}

/// The request the flags describe; `size` overrides `--size` (edits derive it from the input image).
pub fn request(args: &GenerationArgs, size: Option<(usize, usize)>) -> GenerateRequest {
    GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        size: args.size.or(size),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed.unwrap_or_else(random_seed),
        scheduler: args.scheduler,
        batch: args.batch,
    }
}

pub fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Writes the images (and latents), then reports files and timings.
pub fn finish(
    args: &GenerationArgs,
    model: &str,
    params: &GenerateParams,
    generated: &Generated,
    extra_text: &[(&str, String)],
) -> anyhow::Result<()> {
    if generated.truncated_tokens > 0 {
        eprintln!("note: the prompt was longer than 77 tokens; the last {} were ignored", generated.truncated_tokens);
    }
    let paths = write_images(args, model, params, generated, extra_text)?;
    if let Some(dir) = &args.dump_latents {
        dump_latents(dir, generated)?;
    }
    for path in &paths {
        println!("{}", path.display());
    }
    let t = &generated.timings;
    eprintln!(
        "seed {}, {} steps, {} scheduler, {}x{}: text {:.2?}, denoise {:.2?}, decode {:.2?}",
        params.seed,
        params.steps,
        params.scheduler.name(),
        params.width,
        params.height,
        t.text_encode,
        t.denoise,
        t.vae_decode
    );
    Ok(())
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64 ^ ((std::process::id() as u64) << 32)) % 1_000_000_000
}

pub fn output_path(base: &Path, index: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("png");
    base.with_file_name(format!("{stem}-{index}.{ext}"))
}

fn write_images(
    args: &GenerationArgs,
    model: &str,
    params: &GenerateParams,
    generated: &Generated,
    extra_text: &[(&str, String)],
) -> anyhow::Result<Vec<PathBuf>> {
    let images = tensor_to_images(&generated.images)?;
    let mut paths = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let text: Vec<(&str, String)> = if args.no_metadata {
            Vec::new()
        } else {
            parameters_text(params, i, model).into_iter().chain(extra_text.iter().cloned()).collect()
        };
        let path = output_path(&args.output, i, images.len());
        let bytes = encode_png(image, &text)?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

fn dump_latents(dir: &Path, generated: &Generated) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("latents.safetensors");
    let tensors = [
        ("initial_noise", generated.initial_noise.to_device(&candle_core::Device::Cpu)?),
        ("final_latents", generated.final_latents.to_device(&candle_core::Device::Cpu)?),
    ];
    candle_core::safetensors::save(&std::collections::HashMap::from(tensors), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("latents written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_size("512x768"), Ok((512, 768)));
        assert!(parse_size("512").unwrap_err().contains("not WxH"));
        assert!(parse_size("ax8").unwrap_err().contains("not a number"));
    }

    #[test]
    fn batch_outputs_are_numbered() {
        assert_eq!(output_path(Path::new("d/out.png"), 0, 1), PathBuf::from("d/out.png"));
        assert_eq!(output_path(Path::new("d/out.png"), 2, 3), PathBuf::from("d/out-2.png"));
    }
}
