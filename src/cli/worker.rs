//! `imago worker`: the service. Pulls jobs from NATS and answers them until SIGTERM/SIGINT (drain) or a second
//! signal (hand back running jobs and quit).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::hub::HubOptions;
use imago::diffusion::input::InputLimits;
use imago::diffusion::model::LoadOptions;
use imago::engine::{CacheLimits, Engine, EngineConfig, ModelDirectory};
use imago::job::JobLimits;
use imago::private::seal::FleetKeyring;
use imago::queue::{serve_admin, QueueConfig, Shutdown, Worker, WorkerSettings};
use imago::telemetry::Metrics;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::watch;

use super::connect::{ConnectArgs, DEFAULT_NATS_URL, DEFAULT_PREFIX};
use super::device::{parse_device, parse_dtype};

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// TOML file with any of the settings below (flags and environment variables override it).
    #[arg(long, env = "IMAGO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (file + environment + flags, secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Folder of model folders; a job's `model` names one of them (besides `default` and cached hub repo ids).
    #[arg(long, env = "IMAGO_MODELS")]
    pub models: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu]
    #[arg(long, env = "IMAGO_DEVICE")]
    pub device: Option<String>,
    /// f32, f16 or bf16 [default: f16 on CUDA, f32 on CPU]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Jobs run at once [default: 1]
    #[arg(long)]
    pub slots: Option<usize>,
    /// Seconds before an unacknowledged job is redelivered; running jobs send progress acks within it [default: 30]
    #[arg(long)]
    pub ack_wait: Option<u64>,
    /// Deliveries before a failing job is dead-lettered [default: 5]
    #[arg(long)]
    pub max_deliver: Option<i64>,
    /// Seconds in-flight jobs get to finish after SIGTERM before they are handed back [default: 60]
    #[arg(long)]
    pub drain_timeout: Option<u64>,
    /// Results larger than this many bytes go through the object store [default: 524288]
    #[arg(long)]
    pub inline_limit: Option<usize>,
    /// First retry delay of a transient failure in milliseconds, doubling per delivery [default: 1000]
    #[arg(long)]
    pub retry_backoff_ms: Option<u64>,
    /// Hours results and stored images are kept (retention) [default: 24]
    #[arg(long)]
    pub retention_hours: Option<u64>,
    /// Most images one pipeline call generates for queued generate jobs that share model, size, steps, scheduler
    /// and guidance (private jobs always run alone); 1 turns batching off [default: 1]
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Milliseconds a free slot waits for companions of a job it could batch [default: 50]
    #[arg(long)]
    pub batch_wait_ms: Option<u64>,
    /// Bytes of model weights kept loaded; beyond it the least recently used models are dropped; 0: no limit
    /// [default: 0]
    #[arg(long)]
    pub model_cache_bytes: Option<u64>,
    /// Bytes of encoded prompts kept for jobs that repeat a prompt (never from private jobs); 0 turns it off
    /// [default: 67108864]
    #[arg(long)]
    pub prompt_cache_bytes: Option<u64>,
    /// Serve Prometheus metrics and health checks here, e.g. 0.0.0.0:9464 (port 0 picks one and prints it).
    #[arg(long, env = "IMAGO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Worker name in results and server monitoring [default: imago-<pid>]
    #[arg(long)]
    pub name: Option<String>,
    /// A fleet secret key file (`imago keygen`) sealed jobs are opened with; repeat it to accept several keys
    /// during a rotation. Without one, sealed jobs get `seal_unknown_key`.
    #[arg(long = "fleet-key", value_name = "FILE", env = "IMAGO_FLEET_KEYS", value_delimiter = ',')]
    pub fleet_keys: Vec<PathBuf>,
    /// Do not lock the process's memory (mlockall); secret buffers are still locked one by one.
    #[arg(long)]
    pub no_memory_lock: bool,
}

/// The effective worker configuration; also the schema of the `--config` TOML file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub nats: String,
    pub creds: Option<PathBuf>,
    pub nkey: Option<String>,
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub prefix: String,
    pub models: Option<PathBuf>,
    pub device: String,
    pub dtype: Option<String>,
    pub slots: usize,
    pub ack_wait: u64,
    pub max_deliver: i64,
    pub drain_timeout: u64,
    pub inline_limit: usize,
    pub retry_backoff_ms: u64,
    pub retention_hours: u64,
    pub max_batch: usize,
    pub batch_wait_ms: u64,
    /// 0: no limit.
    pub model_cache_bytes: u64,
    /// 0: off.
    pub prompt_cache_bytes: u64,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub name: String,
    /// Fleet secret key files for sealed jobs (paths only: the keys never appear in the configuration).
    pub fleet_keys: Vec<PathBuf>,
    /// Lock all of the process's memory when permitted, so no page of a job can reach swap.
    pub memory_lock: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let queue = QueueConfig::default();
        let caches = CacheLimits::default();
        Self {
            nats: DEFAULT_NATS_URL.into(),
            creds: None,
            nkey: None,
            nats_user: None,
            nats_password: None,
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            prefix: DEFAULT_PREFIX.into(),
            models: None,
            device: "cpu".into(),
            dtype: None,
            slots: queue.slots,
            ack_wait: queue.ack_wait.as_secs(),
            max_deliver: queue.max_deliver,
            drain_timeout: queue.drain_timeout.as_secs(),
            inline_limit: queue.inline_limit,
            retry_backoff_ms: queue.retry_backoff.as_millis() as u64,
            retention_hours: queue.results_max_age.as_secs() / 3600,
            max_batch: queue.max_batch,
            batch_wait_ms: queue.batch_wait.as_millis() as u64,
            model_cache_bytes: caches.model_bytes.unwrap_or(0),
            prompt_cache_bytes: caches.prompt_embedding_bytes,
            metrics_addr: None,
            name: format!("imago-{}", std::process::id()),
            fleet_keys: Vec::new(),
            memory_lock: true,
        }
    }
}

/// Defaults, then the file, then environment variables and flags (clap reads both).
pub fn resolve(args: &WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid worker config", path.display()))?
        }
        None => WorkerConfig::default(),
    };
    let a = &args.connect;
    macro_rules! overlay {
        ($($field:ident <- $value:expr),* $(,)?) => { $( if let Some(v) = $value { c.$field = v; } )* };
    }
    overlay!(nats <- a.nats.clone(), prefix <- a.prefix.clone(), device <- args.device.clone(), slots <- args.slots,
        ack_wait <- args.ack_wait, max_deliver <- args.max_deliver, drain_timeout <- args.drain_timeout,
        inline_limit <- args.inline_limit, retry_backoff_ms <- args.retry_backoff_ms,
        retention_hours <- args.retention_hours, name <- args.name.clone(), max_batch <- args.max_batch,
        batch_wait_ms <- args.batch_wait_ms, model_cache_bytes <- args.model_cache_bytes,
        prompt_cache_bytes <- args.prompt_cache_bytes);
    overlay!(creds <- a.creds.clone().map(Some), nkey <- a.nkey.clone().map(Some),
        nats_user <- a.nats_user.clone().map(Some), nats_password <- a.nats_password.clone().map(Some),
        tls_ca <- a.tls_ca.clone().map(Some), tls_cert <- a.tls_cert.clone().map(Some),
        tls_key <- a.tls_key.clone().map(Some), models <- args.models.clone().map(Some),
        dtype <- args.dtype.clone().map(Some), metrics_addr <- args.metrics_addr.map(Some));
    c.tls |= a.tls;
    if !args.fleet_keys.is_empty() {
        c.fleet_keys = args.fleet_keys.clone();
    }
    c.memory_lock &= !args.no_memory_lock;
    Ok(c)
}

impl WorkerConfig {
    fn connect_args(&self) -> ConnectArgs {
        ConnectArgs {
            nats: Some(self.nats.clone()),
            creds: self.creds.clone(),
            nkey: self.nkey.clone(),
            nats_user: self.nats_user.clone(),
            nats_password: self.nats_password.clone(),
            tls: self.tls,
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            prefix: Some(self.prefix.clone()),
        }
    }

    /// TOML with secrets replaced.
    fn redacted_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        let hide = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("<redacted>".into());
            }
        };
        hide(&mut shown.nkey);
        hide(&mut shown.nats_password);
        Ok(toml::to_string(&shown)?)
    }
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let config = resolve(&args)?;
    if args.print_config {
        println!("{}", config.redacted_toml()?.trim_end());
        return Ok(());
    }
    // Before any thread exists or any job arrives: no core dumps, no ptrace by peers, no swap.
    let hardening = imago::private::harden_process(config.memory_lock);
    if hardening.complete() {
        tracing::info!(%hardening, "process hardened");
    } else {
        tracing::warn!(%hardening, "process hardening incomplete");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(c: WorkerConfig) -> anyhow::Result<()> {
    let keyring = FleetKeyring::load(&c.fleet_keys)?;
    let key_ids = keyring.key_ids().iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    tracing::info!(keys = %key_ids, "fleet keys for sealed jobs");
    let device = parse_device(&c.device)?;
    let dtype = parse_dtype(c.dtype.as_deref(), &device)?;
    let queue_config = QueueConfig {
        slots: c.slots.max(1),
        ack_wait: Duration::from_secs(c.ack_wait.max(1)),
        max_deliver: c.max_deliver.max(1),
        drain_timeout: Duration::from_secs(c.drain_timeout),
        inline_limit: c.inline_limit,
        retry_backoff: Duration::from_millis(c.retry_backoff_ms),
        results_max_age: Duration::from_secs(c.retention_hours.max(1) * 3600),
        max_batch: c.max_batch.max(1),
        batch_wait: Duration::from_millis(c.batch_wait_ms),
        worker_name: c.name.clone(),
        ..QueueConfig::default()
    };
    let queue = Arc::new(c.connect_args().queue(&c.name, queue_config).await?);
    let input_limits = InputLimits::default();
    let caches = CacheLimits {
        model_bytes: (c.model_cache_bytes > 0).then_some(c.model_cache_bytes),
        prompt_embedding_bytes: c.prompt_cache_bytes,
    };
    let engine = Engine::with_caches(
        EngineConfig {
            models: ModelDirectory {
                models_dir: c.models.clone(),
                default_model: default_model_dir(),
                hub: HubOptions::from_env(),
            },
            load: LoadOptions { device, dtype },
            input_limits,
        },
        caches,
    );
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = c.metrics_addr {
        let (bound, _server) = imago::telemetry::serve(addr, metrics.clone()).await?;
        eprintln!("metrics on http://{bound}/metrics (health: /healthz, /readyz)");
    }
    let admin = serve_admin(queue.clone()).await?;
    let settings =
        WorkerSettings { limits: JobLimits::default(), max_input_bytes: input_limits.max_bytes, metrics, keyring };
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
