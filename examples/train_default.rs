//! Trains imago's embedded default model from scratch on the CPU: a miniature Stable Diffusion (VAE, CLIP text
//! encoder, UNet) that draws coloured shapes from captions, written as a diffusers folder.
//!
//! ```text
//! cargo run --release --example train_default -- --out models/default --seed 0 --threads 1
//! ```
//!
//! Stage 1 trains the VAE on procedurally drawn shapes, stage 2 the text encoder and UNet on its latents. The run
//! is reproducible from `--seed` (bit-identical for the same `--threads`); it writes `loss.png` and
//! `training.json` next to the model. See `models/default/README.md` for the measured numbers.

#[path = "train_default/autoencoder.rs"]
mod autoencoder;
#[path = "train_default/denoiser.rs"]
mod denoiser;
#[path = "train_default/folder.rs"]
mod folder;
#[path = "train_default/params.rs"]
mod params;
#[path = "train_default/plot.rs"]
mod plot;
#[path = "train_default/progress.rs"]
mod progress;
#[path = "train_default/scenes.rs"]
#[allow(dead_code)]
mod scenes;
#[path = "train_default/text.rs"]
mod text;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use imago::diffusion::model::ModelDefaults;
use imago::diffusion::on_compute_pool;
use serde_json::json;

use autoencoder::{train_autoencoder, AutoencoderSettings, IMAGE_SIDE};
use denoiser::{train_denoiser, DenoiserSettings};
use params::{curve, tail_mean};
use plot::{write_plot, Panel};

/// Train the default model (coloured shapes from captions) from scratch.
#[derive(Debug, Parser)]
struct Args {
    /// Output folder (a diffusers model folder).
    #[arg(long, default_value = "models/default")]
    out: PathBuf,
    /// Seed of the data, the initial weights and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stage 1 (VAE) optimizer steps.
    #[arg(long, default_value_t = 5000)]
    vae_steps: usize,
    /// Stage 1 images per step.
    #[arg(long, default_value_t = 4)]
    vae_batch: usize,
    /// Stage 1 peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    vae_lr: f64,
    /// Weight of the VAE's KL term against its L1 reconstruction loss.
    #[arg(long, default_value_t = 1e-4)]
    kl_weight: f64,
    /// Extra VAE loss weight on pixels the shape covers.
    #[arg(long, default_value_t = 4.0)]
    foreground_weight: f64,
    /// Weight of the VAE's edge loss (L1 of pixel differences), which sharpens reconstructions.
    #[arg(long, default_value_t = 1.0)]
    edge_weight: f64,
    /// Noise on the latents the VAE decoder learns from, as a fraction of their spread (robustness to the UNet's
    /// error).
    #[arg(long, default_value_t = 0.3)]
    latent_noise: f64,
    /// Stage 2 (text encoder + UNet) optimizer steps.
    #[arg(long, default_value_t = 6000)]
    steps: usize,
    /// Stage 2 images per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Stage 2 images sharing one diffusion timestep (the batch is split into groups).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Stage 2 peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Decay of the weight average that is saved.
    #[arg(long, default_value_t = 0.995)]
    ema_decay: f64,
    /// Fraction of empty captions (teaches the unconditional prediction classifier-free guidance needs).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// Reuse the VAE of an earlier run's output folder instead of training stage 1 (for experiments on stage 2).
    #[arg(long)]
    vae_from: Option<PathBuf>,
    /// UNet channels at the 8×8 and the 4×4 latent level.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 128])]
    unet_channels: Vec<usize>,
    /// Cross-attention at the 8×8 latent level too (by default only at 4×4 and in the middle).
    #[arg(long)]
    attention_at_8x8: bool,
    /// Lower clamp of the per-timestep loss weight (SNR of the clean-image error); 0 gives plain Min-SNR.
    #[arg(long, default_value_t = 1.0)]
    snr_floor: f64,
    /// Upper clamp of that weight (Min-SNR-γ): higher gives the nearly noise-free steps, where edges and corners
    /// are refined, more of the gradient.
    #[arg(long, default_value_t = 20.0)]
    min_snr_gamma: f64,
    /// CPU threads (0: all cores). The model is small enough that on 2 cores one thread is faster than two
    /// (0.43 against 0.51 s per UNet step).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Sampling defaults written to `imago.json`, chosen by the content test's accuracy on the trained model.
fn sampling_defaults() -> ModelDefaults {
    ModelDefaults {
        steps: Some(20),
        guidance: Some(3.0),
        width: Some(IMAGE_SIDE),
        height: Some(IMAGE_SIDE),
        scheduler: Some("dpm++2m".into()),
        family: Some("imago-shapes".into()),
    }
}

/// Training allocates and frees many same-sized activation buffers per step. glibc returns large blocks to the
/// kernel on free by default, so every step page-faults them in again; keeping freed memory in the heap makes
/// training several times faster.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> Result<()> {
    keep_freed_memory();
    let args = Args::parse();
    if args.threads > 0 {
        // Read by rayon and candle when their thread pools start, which has not happened yet.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let started = Instant::now();
    let vae_settings = AutoencoderSettings {
        steps: args.vae_steps,
        batch: args.vae_batch,
        learning_rate: args.vae_lr,
        kl_weight: args.kl_weight,
        foreground_weight: args.foreground_weight,
        edge_weight: args.edge_weight,
        latent_noise: args.latent_noise,
        seed: args.seed,
    };
    let denoiser_settings = DenoiserSettings {
        steps: args.steps,
        batch: args.batch,
        group: args.group,
        learning_rate: args.lr,
        caption_dropout: args.caption_dropout,
        ema_decay: args.ema_decay,
        min_snr_gamma: args.min_snr_gamma,
        snr_floor: args.snr_floor,
        unet_channels: <[usize; 2]>::try_from(args.unet_channels.as_slice())
            .map_err(|_| anyhow::anyhow!("--unet-channels takes two numbers, like 32,64"))?,
        attention_at_8x8: args.attention_at_8x8,
        seed: args.seed,
    };

    // On a compute-pool thread, as the pipeline runs its models: every tensor operation then starts where its
    // parallel pieces run instead of handing each one over from this thread.
    let autoencoder = on_compute_pool(&Device::Cpu, || match &args.vae_from {
        Some(folder) => autoencoder::load_autoencoder(folder, args.seed),
        None => train_autoencoder(vae_settings),
    })?;
    let denoiser = on_compute_pool(&Device::Cpu, || train_denoiser(denoiser_settings, &autoencoder))?;

    std::fs::create_dir_all(&args.out)?;
    let defaults = sampling_defaults();
    folder::write_model_folder(&args.out, &autoencoder, &denoiser, &defaults)?;

    let vae_curve = curve(&autoencoder.losses, 200);
    let unet_curve = curve(&denoiser.losses, 200);
    write_plot(
        &args.out.join("loss.png"),
        &[
            Panel { title: "stage 1: VAE reconstruction L1 per step", points: &vae_curve, log_y: true },
            Panel { title: "stage 2: UNet v-prediction MSE per step", points: &unet_curve, log_y: true },
        ],
    )?;
    let total = started.elapsed().as_secs_f64();
    let report = json!({
        // As the cargo command, not the binary's path on this machine.
        "command": format!("cargo run --release --example train_default -- {}", std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
        "seed": args.seed,
        "threads": if args.threads > 0 { args.threads } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) },
        "total_seconds": total.round(),
        "vae": {
            "steps": vae_settings.steps, "batch": vae_settings.batch, "learning_rate": vae_settings.learning_rate,
            "kl_weight": vae_settings.kl_weight,
            "foreground_weight": vae_settings.foreground_weight,
            "edge_weight": vae_settings.edge_weight, "latent_noise": vae_settings.latent_noise, "seconds": autoencoder.seconds.round(),
            "final_l1": tail_mean(&autoencoder.losses, 0.05), "held_out_l1": autoencoder.eval_l1,
            "scaling_factor": autoencoder.config.scaling_factor, "curve": vae_curve,
        },
        "denoiser": {
            "steps": denoiser_settings.steps, "batch": denoiser_settings.batch, "group": denoiser_settings.group,
            "learning_rate": denoiser_settings.learning_rate, "ema_decay": denoiser_settings.ema_decay,
            "caption_dropout": denoiser_settings.caption_dropout, "min_snr_gamma": denoiser_settings.min_snr_gamma,
            "snr_floor": denoiser_settings.snr_floor,
            "unet_channels": denoiser_settings.unet_channels,
            "attention_at_8x8": denoiser_settings.attention_at_8x8,
            "unet_parameters": denoiser.unet_parameters, "text_encoder_trainable_parameters": denoiser.text_parameters,
            "seconds": denoiser.seconds.round(), "final_loss": tail_mean(&denoiser.losses, 0.05),
            "held_out_loss": denoiser.eval_loss.captioned,
            "held_out_loss_without_captions": denoiser.eval_loss.uncaptioned, "curve": unet_curve,
        },
    });
    std::fs::write(args.out.join("training.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    println!(
        "wrote {} in {:.1} min: VAE held-out L1 {:.4}, UNet held-out loss {:.4}",
        args.out.display(),
        total / 60.0,
        autoencoder.eval_l1,
        denoiser.eval_loss.captioned
    );
    Ok(())
}
