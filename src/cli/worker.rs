//! `imago worker`: the service. Pulls jobs from NATS and answers them until SIGTERM/SIGINT (drain) or a second
//! signal (hand back running jobs and quit).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::hub::HubOptions;
use imago::diffusion::input::InputLimits;
use imago::diffusion::model::LoadOptions;
use imago::engine::{Engine, EngineConfig, ModelDirectory};
use imago::job::JobLimits;
use imago::queue::{serve_admin, QueueConfig, Shutdown, Worker, WorkerSettings};
use imago::telemetry::Metrics;
use std::sync::Arc;
use tokio::sync::watch;

use super::connect::ConnectArgs;
use super::device::{parse_device, parse_dtype};

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Folder of model folders; a job's `model` names one of them (besides `default` and cached hub repo ids).
    #[arg(long, env = "IMAGO_MODELS")]
    pub models: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub dtype: Option<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Seconds before an unacknowledged job is redelivered (running jobs send progress acks within it).
    #[arg(long, default_value_t = 30)]
    pub ack_wait: u64,
    /// Deliveries before a failing job is dead-lettered.
    #[arg(long, default_value_t = 5)]
    pub max_deliver: i64,
    /// Seconds in-flight jobs get to finish after SIGTERM before they are handed back.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// Results larger than this many bytes go through the object store.
    #[arg(long, default_value_t = 512 * 1024)]
    pub inline_limit: usize,
    /// First retry delay of a transient failure, in milliseconds (doubles per delivery).
    #[arg(long, default_value_t = 1000)]
    pub retry_backoff_ms: u64,
    /// Serve Prometheus metrics and health checks here (e.g. 0.0.0.0:9464; port 0 picks one and prints it).
    #[arg(long, env = "IMAGO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Worker name in results and server monitoring.
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let name = args.name.clone().unwrap_or_else(|| format!("imago-{}", std::process::id()));
    let config = QueueConfig {
        slots: args.slots.max(1),
        ack_wait: Duration::from_secs(args.ack_wait.max(1)),
        max_deliver: args.max_deliver.max(1),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        inline_limit: args.inline_limit,
        retry_backoff: Duration::from_millis(args.retry_backoff_ms),
        worker_name: name.clone(),
        ..QueueConfig::default()
    };
    let queue = args.connect.queue(&name, config).await?;
    let input_limits = InputLimits::default();
    let engine = Engine::new(EngineConfig {
        models: ModelDirectory {
            models_dir: args.models.clone(),
            default_model: default_model_dir(),
            hub: HubOptions::from_env(),
        },
        load: LoadOptions { device, dtype },
        input_limits,
    });
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = args.metrics_addr {
        let (bound, _server) = imago::telemetry::serve(addr, metrics.clone()).await?;
        eprintln!("metrics on http://{bound}/metrics (health: /healthz, /readyz)");
    }
    let queue = Arc::new(queue);
    let admin = serve_admin(queue.clone()).await?;
    let settings = WorkerSettings { limits: JobLimits::default(), max_input_bytes: input_limits.max_bytes, metrics };
    let worker = Worker::new(queue, Arc::new(engine), settings);
    let (shutdown_tx, shutdown_rx) = watch::channel(None);
    tokio::spawn(translate_signals(shutdown_tx));
    let report = worker.run(shutdown_rx).await?;
    admin.abort();
    eprintln!(
        "worker stopped: {} completed, {} failed, {} cancelled, {} handed back, {} answered from stored results",
        report.completed, report.failed, report.cancelled, report.handed_back, report.answered_from_results
    );
    Ok(())
}

/// The first SIGTERM/SIGINT drains, the second quits.
async fn translate_signals(shutdown: watch::Sender<Option<Shutdown>>) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        tracing::error!("cannot listen for SIGTERM");
        return;
    };
    let mut signals = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signals += 1;
        let mode = if signals == 1 { Shutdown::Drain } else { Shutdown::Quit };
        tracing::info!(?mode, "signal received");
        let _ = shutdown.send(Some(mode));
    }
}
