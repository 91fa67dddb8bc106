//! `imago dev …`: tools for developers and tests.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use imago::diffusion::tiny::{write_model, ModelScale, TinyFamily, TinyOptions};

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a miniature diffusers folder (real layout and tensor names, random weights, a few MB).
    TinyModel(TinyModelArgs),
}

#[derive(Debug, Args)]
pub struct TinyModelArgs {
    /// sd15, sd21, sd-turbo, sdxl or sdxl-turbo.
    #[arg(long, default_value = "sd15")]
    pub family: String,
    /// Seed of the random weights; the same seed writes the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write `*.fp16.safetensors` weight variants.
    #[arg(long)]
    pub fp16: bool,
    /// The family's published architecture instead of a miniature (gigabytes of random weights, for measuring
    /// speed and memory without the real weights).
    #[arg(long)]
    pub full_size: bool,
    /// Output folder (created).
    pub out: PathBuf,
}

pub fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::TinyModel(args) => {
            let family: TinyFamily = args.family.parse()?;
            let options = TinyOptions { family, seed: args.seed, fp16_variant: args.fp16 };
            let (scale, size) =
                if args.full_size { (ModelScale::FullSize, "full-size") } else { (ModelScale::Miniature, "tiny") };
            write_model(&args.out, options, scale).with_context(|| format!("writing {}", args.out.display()))?;
            println!("wrote {size} {family} model to {}", args.out.display());
            Ok(())
        }
    }
}
