//! The worker's GPU fault policy against a real nats-server, with runners standing in for the device (a real
//! context-killing fault needs a real GPU): a device that dies makes its worker hand the job back and stop with
//! `DeviceLost` (the CLI turns that into a non-zero exit for the supervisor), and a healthy worker then finishes
//! the job; nothing was answered in between.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::nats::NatsServer;
use common::workers::{client, job, publish};
use futures::StreamExt;
use imago::diffusion::pipeline::StepProgress;
use imago::engine::{DeviceHealth, JobControl, JobInputs, JobOutput, JobRunner};
use imago::job::{ErrorCode, JobError, JobLimits, JobResult, JobSpec, JobStatus, OutputFormat, Timings};
use imago::queue::{Queue, QueueConfig, QueueError, Shutdown, Worker, WorkerReport, WorkerSettings};
use imago::telemetry::Metrics;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const ILLEGAL_ADDRESS: &str = r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")"#;

/// A GPU whose context dies on the first job, classified by the engine's own [`DeviceHealth`].
#[derive(Default)]
struct DyingDevice {
    health: DeviceHealth,
    runs: AtomicUsize,
}

impl JobRunner for DyingDevice {
    fn run(
        &self,
        _: &JobSpec,
        _: &JobInputs,
        _: &JobControl,
        _: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.health.ensure_usable()?;
        self.health.observe(Err(JobError::new(ErrorCode::Internal, ILLEGAL_ADDRESS)))
    }

    fn device_lost(&self) -> Option<String> {
        self.health.lost()
    }
}

/// A device that answers every job at once with a small picture.
struct HealthyDevice;

impl JobRunner for HealthyDevice {
    fn run(
        &self,
        _: &JobSpec,
        _: &JobInputs,
        _: &JobControl,
        _: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        Ok(JobOutput {
            images: vec![png],
            seeds: vec![1],
            width: 8,
            height: 8,
            format: OutputFormat::Png,
            steps: 1,
            guidance: 0.0,
            scheduler: "euler".into(),
            timings: Timings::default(),
        })
    }
}

/// Starts an in-process worker on `device` with `slots` slots (0: it only listens, e.g. for exhausted jobs); the
/// sender stops it (drop it only after the worker ended).
async fn start_worker(
    url: String,
    name: &str,
    device: Arc<dyn JobRunner>,
    slots: usize,
) -> (watch::Sender<Option<Shutdown>>, JoinHandle<Result<WorkerReport, QueueError>>) {
    let config = QueueConfig {
        ack_wait: Duration::from_secs(2),
        max_deliver: 3,
        worker_name: name.into(),
        slots,
        ..QueueConfig::default()
    };
    let queue = Queue::setup(async_nats::connect(url).await.unwrap(), config).await.unwrap();
    let settings = WorkerSettings {
        limits: JobLimits::default(),
        max_input_bytes: 1 << 20,
        metrics: Arc::new(Metrics::new()),
        keyring: Default::default(),
    };
    let worker = Worker::new(Arc::new(queue), device, settings);
    let (stop, stop_rx) = watch::channel(None);
    (stop, tokio::spawn(worker.run(stop_rx)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_hands_its_job_back_and_stops_the_worker_with_an_error() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    publish(&queue, &job("victim", "sd-turbo", 1)).await;

    let dying = Arc::new(DyingDevice::default());
    let (_stop, worker) = start_worker(server.url(), "dying", dying.clone(), 1).await;
    let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await.expect("the worker stops by itself");
    match stopped.unwrap() {
        Err(QueueError::DeviceLost(fault)) => assert!(fault.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{fault}"),
        other => panic!("expected DeviceLost, got {other:?}"),
    }
    assert_eq!(dying.runs.load(Ordering::SeqCst), 1, "a lost device takes no further job");
    assert!(queue.existing_result("victim").await.is_none(), "nothing may be answered for a handed-back job");
    assert_eq!(queue.jobs.clone().info().await.unwrap().state.messages, 1, "the job is still queued");

    // Handed back with an immediate nak: the next worker gets it at once, not after the ack wait.
    let (stop, worker) = start_worker(server.url(), "healthy", Arc::new(HealthyDevice), 1).await;
    let message = tokio::time::timeout(Duration::from_secs(1), results.next()).await.expect("redelivered at once");
    let result: JobResult = serde_json::from_slice(&message.unwrap().payload).unwrap();
    assert_eq!((result.id.as_str(), result.status), ("victim", JobStatus::Ok));
    assert_eq!(result.worker.as_deref(), Some("healthy"));
    stop.send(Some(Shutdown::Quit)).unwrap();
    let report = worker.await.unwrap().unwrap();
    assert_eq!(report.completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_every_device_it_reaches_is_dead_lettered_after_max_deliveries() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let mut results = queue.client.subscribe(queue.config.names.results("poison")).await.unwrap();
    let mut dead = queue.client.subscribe(queue.config.names.dead("*")).await.unwrap();
    publish(&queue, &job("poison", "sd-turbo", 1)).await;
    for delivery in 1..=3 {
        let device = Arc::new(DyingDevice::default());
        let (_stop, worker) = start_worker(server.url(), &format!("victim-{delivery}"), device, 1).await;
        let stopped = tokio::time::timeout(Duration::from_secs(30), worker).await.expect("the worker stops by itself");
        assert!(matches!(stopped.unwrap(), Err(QueueError::DeviceLost(_))), "delivery {delivery}");
    }
    // The next worker's pull makes the server give the job up; the fleet's advisory listener dead-letters it.
    let (stop, survivor) = start_worker(server.url(), "survivor", Arc::new(HealthyDevice), 1).await;
    let message = tokio::time::timeout(Duration::from_secs(10), results.next()).await.expect("a final result").unwrap();
    let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(result.status, JobStatus::Error);
    assert_eq!(result.error.map(|e| e.code), Some(ErrorCode::MaxDeliveriesExceeded));
    let letter = tokio::time::timeout(Duration::from_secs(5), dead.next()).await.expect("a dead letter").unwrap();
    assert_eq!(letter.headers.unwrap().get("Imago-Job-Id").unwrap().as_str(), "poison");
    // Deleted from the work queue right after the answer.
    let mut queued = 1;
    for _ in 0..50 {
        queued = queue.jobs.clone().info().await.unwrap().state.messages;
        if queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued, 0, "the exhausted job is removed from the work queue");
    stop.send(Some(Shutdown::Quit)).unwrap();
    assert_eq!(survivor.await.unwrap().unwrap().completed, 0, "the poison job never ran again");
}
