//! Subcommands. Each lives in its own file; this one parses and dispatches.

mod bench;
mod connect;
mod dev;
mod device;
mod edit;
mod generate;
mod keygen;
mod models;
mod schema;
mod submit;
mod worker;

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
    /// Serve jobs from NATS JetStream until SIGTERM (drain) or a second signal (hand back and quit).
    Worker(worker::WorkerArgs),
    /// Send one job to the queue, follow it, write its images.
    Submit(submit::SubmitArgs),
    /// Cancel a queued or running job.
    Cancel(submit::CancelArgs),
    /// Make a fleet key pair for sealed (Private Mode) jobs.
    Keygen(keygen::KeygenArgs),
    /// Print or write the JSON Schemas of the job protocol.
    Schema(schema::SchemaArgs),
    /// List installed models and where weights are looked for.
    Models(models::ModelsArgs),
    /// Measure a workload: it/s, images/s, stage times, job latency, peak memory, TFLOP/s.
    Bench(bench::BenchArgs),
    /// Developer tools.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Models(args) => models::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Submit(args) => submit::run(args),
        Command::Cancel(args) => submit::run_cancel(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Schema(args) => schema::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Dev(cmd) => dev::run(cmd),
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the verbosity flags — except that libraries which log whole messages
/// at debug/trace level (the NATS client prints payloads: prompts, images, user ids) are held at info whatever is
/// asked, so no log level can reveal user content.
pub fn init_tracing(verbose: u8) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let default = match verbose {
        0 => "warn,imago=info",
        1 => "info,imago=debug",
        _ => "debug,imago=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let no_payloads = tracing_subscriber::filter::filter_fn(|meta| {
        !(PAYLOAD_LOGGING_TARGETS.iter().any(|t| meta.target().starts_with(t)) && *meta.level() > tracing::Level::INFO)
    });
    let fmt =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter).with_filter(no_payloads);
    tracing_subscriber::registry().with(fmt).init();
}

/// Dependencies known to log message contents below info level.
const PAYLOAD_LOGGING_TARGETS: &[&str] = &["async_nats"];

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
