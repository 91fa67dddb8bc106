//! Subcommands. Each lives in its own file; this one parses and dispatches.

mod dev;
mod device;
mod edit;
mod generate;
mod models;

use clap::{Parser, Subcommand};

/// imago: Stable-Diffusion-family image generation on candle.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). Logs never contain prompts or image bytes.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Generate(generate::GenerateArgs),
    /// Edit an image: image-to-image, or inpainting with a mask.
    Edit(edit::EditArgs),
    /// List installed models and where weights are looked for.
    Models(models::ModelsArgs),
    /// Developer tools.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Models(args) => models::run(args),
        Command::Dev(cmd) => dev::run(cmd),
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the verbosity flags.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,imago=info",
        1 => "info,imago=debug",
        _ => "debug,imago=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
