//! The worker loop: pull as many jobs as there are free slots, run each on the engine with heartbeats and progress,
//! answer, acknowledge. Failures decide the message's fate by their code: invalid → error result + Term;
//! transient → Nak with backoff, dead letter after the last delivery; cancelled → cancelled result + Ack.
//! A context-killing device fault stops the worker: its jobs are handed back and [`Worker::run`] returns
//! [`QueueError::DeviceLost`], for a supervisor to start a fresh process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

mod batching;

use super::private_jobs::seal_output;
use super::setup::Queue;
use super::QueueError;
use crate::engine::{JobControl, JobInputs, JobOutput, JobRunner};
use crate::job::{
    self, ErrorCode, JobError, JobLimits, JobResult, JobSpec, JobStatus, ProgressEvent, PROTOCOL_VERSION,
};
use crate::private::seal::FleetKeyring;
use crate::telemetry::{JobRecord, Metrics};

/// What the signal handler asks of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop pulling, let running jobs finish within the drain timeout, hand back the rest.
    Drain,
    /// Hand back running jobs now.
    Quit,
}

/// Counts of what a worker did, reported when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub handed_back: u64,
    pub answered_from_results: u64,
}

/// A running job as seen by the cancel listener and the drain.
struct Running {
    control: JobControl,
    /// Set when the worker stops a job to hand it back (drain), not because the user cancelled it.
    handback: Arc<AtomicBool>,
}

/// How a worker judges and measures jobs.
pub struct WorkerSettings {
    pub limits: JobLimits,
    /// Largest input image accepted (inline or from the object store).
    pub max_input_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// The fleet keys sealed jobs are opened with (empty: every sealed job gets `seal_unknown_key`).
    pub keyring: FleetKeyring,
}

pub struct Worker {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    engine: Arc<dyn JobRunner>,
    limits: JobLimits,
    max_input_bytes: usize,
    keyring: FleetKeyring,
    running: Mutex<HashMap<String, Running>>,
    report: Mutex<WorkerReport>,
    /// The device fault that stops this worker, once one happened; `stop` wakes the pull loop for it.
    device_lost: Mutex<Option<String>>,
    stop: tokio::sync::Notify,
}

enum Outcome {
    Completed,
    Failed,
    Cancelled,
    HandedBack,
    Answered,
}

impl Worker {
    pub fn new(queue: Arc<Queue>, engine: Arc<dyn JobRunner>, settings: WorkerSettings) -> Arc<Self> {
        Arc::new(Self {
            queue,
            metrics: settings.metrics,
            engine,
            limits: settings.limits,
            max_input_bytes: settings.max_input_bytes,
            keyring: settings.keyring,
            running: Mutex::new(HashMap::new()),
            report: Mutex::new(WorkerReport::default()),
            device_lost: Mutex::new(None),
            stop: tokio::sync::Notify::new(),
        })
    }

    /// Runs until `shutdown` says otherwise; returns what it did.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<Option<Shutdown>>,
    ) -> Result<WorkerReport, QueueError> {
        // Subscribed before the first pull: that pull can be what makes the server give up a job and announce it.
        let names = &self.queue.config.names;
        let subscribe_error = |e: async_nats::SubscribeError| QueueError::Setup(format!("subscribing: {e}"));
        let cancels = self.queue.client.subscribe(names.cancel("*")).await.map_err(subscribe_error)?;
        let group = format!("{}-dead-letter", names.consumer());
        let advisories =
            self.queue.client.queue_subscribe(names.max_deliveries_advisory(), group).await.map_err(subscribe_error)?;
        self.queue.client.flush().await.map_err(|e| QueueError::Setup(format!("subscribing: {e}")))?;
        let listeners = [
            tokio::spawn(self.clone().listen_for_cancels(cancels)),
            tokio::spawn(self.clone().listen_for_exhausted_jobs(advisories)),
        ];
        let slots = Arc::new(Semaphore::new(self.queue.config.slots));
        let mut tasks = JoinSet::new();
        tracing::info!(worker = %self.queue.config.worker_name, slots = self.queue.config.slots, "worker started");
        self.metrics.set_ready(true);
        // 1. pull while there is a free slot and no shutdown
        while shutdown.borrow().is_none() && self.lost_device().is_none() {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.map_err(|e| QueueError::Setup(e.to_string()))?,
                _ = shutdown.changed() => break,
                _ = self.stop.notified() => break,
            };
            if self.lost_device().is_some() {
                break; // the permit of the job that found the fault came back together with the stop
            }
            while tasks.try_join_next().is_some() {}
            let mut pulled = self.pull().await;
            let worker = self.clone();
            if pulled.len() > 1 {
                tasks.spawn(async move {
                    worker.handle_several(pulled).await;
                    drop(permit);
                });
            } else if let Some(message) = pulled.pop() {
                tasks.spawn(async move {
                    worker.handle(message).await;
                    drop(permit);
                });
            }
        }
        // 2. drain: finish within the timeout, then hand back what is still running
        let mode = *shutdown.borrow();
        let quit = mode == Some(Shutdown::Quit) || self.lost_device().is_some();
        let deadline =
            tokio::time::Instant::now() + if quit { Duration::ZERO } else { self.queue.config.drain_timeout };
        tracing::info!(?mode, running = tasks.len(), "worker draining");
        self.metrics.set_ready(false);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    self.hand_back_running();
                    break;
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() == Some(Shutdown::Quit) {
                        self.hand_back_running();
                        break;
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        for l in listeners {
            l.abort();
        }
        let _ = self.queue.client.flush().await;
        let report = self.report.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tracing::info!(?report, "worker stopped");
        match self.lost_device() {
            Some(fault) => Err(QueueError::DeviceLost(fault)),
            None => Ok(report),
        }
    }

    fn lost_device(&self) -> Option<String> {
        self.device_lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops pulling and hands every running job back: the device cannot run anything any more.
    fn stop_for_lost_device(&self, fault: String) {
        tracing::error!(%fault, "the device is lost; handing jobs back and stopping");
        self.device_lost.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(fault);
        self.stop.notify_one();
        self.hand_back_running();
    }

    fn hand_back_running(&self) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (id, job) in running.iter() {
            tracing::info!(job = %id, "handing back");
            job.handback.store(true, Ordering::SeqCst);
            job.control.cancel.store(true, Ordering::SeqCst);
        }
    }

    async fn handle(self: Arc<Self>, message: jetstream::Message) {
        let outcome = self.process(&message).await;
        self.record(outcome);
    }

    fn record(&self, outcome: Outcome) {
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Outcome::Completed => report.completed += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::Cancelled => report.cancelled += 1,
            Outcome::HandedBack => report.handed_back += 1,
            Outcome::Answered => report.answered_from_results += 1,
        }
    }

    async fn process(&self, message: &jetstream::Message) -> Outcome {
        let deliveries = message.info().map(|i| i.delivered).unwrap_or(1);
        // 1. parse and validate: a bad job is answered and terminated, never retried
        let spec = match job::parse(&message.payload).and_then(|m| job::validate(m, &self.limits)) {
            Ok(spec) => spec,
            Err(e) => return self.reject(message, e).await,
        };
        let span =
            tracing::info_span!("job", id = %spec.id, kind = spec.kind.as_str(), model = %spec.model, deliveries);
        let private = spec.private;
        let outcome = self.process_valid(message, spec, deliveries).instrument(span).await;
        if private {
            wipe_payload(message);
        }
        outcome
    }

    async fn process_valid(&self, message: &jetstream::Message, mut spec: JobSpec, deliveries: i64) -> Outcome {
        // 2. answered before (a redelivery after the result was published) or cancelled while queued?
        if let Some(outcome) = self.settled_before_running(message, &spec).await {
            return outcome;
        }
        // 3. inputs, then the run itself
        let run = match self.fetch_inputs(&mut spec).await {
            Ok(inputs) => self
                .run_with_heartbeats(message, &spec, inputs)
                .await
                .and_then(|output| seal_output(&spec, output).map_err(Stop::Failed)),
            Err(e) => Err(Stop::Failed(e)),
        };
        self.conclude(message, &spec, run, deliveries).await
    }

    /// Answers a job that needs no run: one answered before (a redelivery after its result was published) or one
    /// cancelled while queued.
    async fn settled_before_running(&self, message: &jetstream::Message, spec: &JobSpec) -> Option<Outcome> {
        if let Some(existing) = self.queue.existing_result(&spec.id).await {
            if let Some(reply) = &spec.reply {
                let _ = self.queue.forward_result(existing, reply).await;
            }
            ack(message, AckKind::Ack).await;
            return Some(Outcome::Answered);
        }
        if self.queue.is_cancelled(&spec.id).await {
            let result =
                JobResult::failed(&spec.id, JobStatus::Cancelled, ErrorCode::Cancelled, "cancelled before it started");
            return Some(self.finish_without_output(message, spec, result, AckKind::Ack, Outcome::Cancelled).await);
        }
        None
    }

    /// Answers, hands back or retries a job after its run.
    async fn conclude(
        &self,
        message: &jetstream::Message,
        spec: &JobSpec,
        run: Result<JobOutput, Stop>,
        deliveries: i64,
    ) -> Outcome {
        match run {
            Ok(output) => self.complete(message, spec, output).await,
            Err(Stop::HandedBack) => {
                ack(message, AckKind::Nak(None)).await;
                Outcome::HandedBack
            }
            Err(Stop::Failed(_)) if self.engine.device_lost().is_some() => {
                ack(message, AckKind::Nak(None)).await;
                self.stop_for_lost_device(self.engine.device_lost().unwrap_or_default());
                Outcome::HandedBack
            }
            Err(Stop::Failed(e)) => self.fail(message, spec, e, deliveries).await,
        }
    }

    /// The job's inputs in secret buffers; a sealed job's content is opened here (its prompts go into `spec`).
    async fn fetch_inputs(&self, spec: &mut JobSpec) -> Result<JobInputs, JobError> {
        if spec.sealed.is_some() {
            return self.queue.open_sealed_inputs(&self.keyring, spec, &self.limits, self.max_input_bytes).await;
        }
        let Some(edit) = &spec.edit else { return Ok(JobInputs::default()) };
        let Some(image) = &edit.image else {
            return Err(JobError::new(ErrorCode::ImageRequired, "edit jobs need an image"));
        };
        let image = Some(self.queue.fetch_image(image, self.max_input_bytes).await?);
        let mask = match &edit.mask {
            Some(m) => Some(self.queue.fetch_image(m, self.max_input_bytes).await?),
            None => None,
        };
        Ok(JobInputs { image, mask })
    }

    /// Runs the engine on a blocking thread, acking progress to the server and publishing step events meanwhile.
    async fn run_with_heartbeats(
        &self,
        message: &jetstream::Message,
        spec: &JobSpec,
        inputs: JobInputs,
    ) -> Result<JobOutput, Stop> {
        let control = JobControl { cancel: Arc::new(AtomicBool::new(false)), deadline: spec.deadline };
        let handback = Arc::new(AtomicBool::new(false));
        self.track_running(&spec.id, Some(Running { control: control.clone(), handback: handback.clone() }));
        let (steps_tx, mut steps_rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = self.engine.clone();
        let (job, run_control) = (spec.clone(), control.clone());
        let mut work = tokio::task::spawn_blocking(move || {
            engine.run(&job, &inputs, &run_control, &mut |p| {
                let _ = steps_tx.send((0, p));
            })
        });
        let result = self.heartbeat_until(&[message], &[&spec.id], &mut work, &mut steps_rx).await;
        self.track_running(&spec.id, None);
        let result =
            result.unwrap_or_else(|e| Err(JobError::new(ErrorCode::Internal, format!("the job's thread failed: {e}"))));
        stop_reason(result, &handback)
    }

    /// Adds (`Some`) or removes (`None`) a running job.
    fn track_running(&self, id: &str, job: Option<Running>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match job {
            Some(job) => running.insert(id.to_string(), job),
            None => running.remove(id),
        };
        self.metrics.set_in_flight(running.len());
    }

    async fn complete(&self, message: &jetstream::Message, spec: &JobSpec, output: JobOutput) -> Outcome {
        let queue_ms = message.info().ok().and_then(|i| {
            let published =
                SystemTime::UNIX_EPOCH + Duration::from_nanos(i.published.unix_timestamp_nanos().max(0) as u64);
            SystemTime::now().duration_since(published).ok()
        });
        let mut timings = output.timings.clone();
        timings.queue_ms = queue_ms.map(|d| (d.as_millis() as u64).saturating_sub(timings.total_ms));
        if let Some(wait) = timings.queue_ms {
            self.metrics.observe_queue_wait(Duration::from_millis(wait));
        }
        let mut result = JobResult {
            v: PROTOCOL_VERSION,
            id: spec.id.clone(),
            status: JobStatus::Ok,
            images: output
                .images
                .iter()
                .map(|b| {
                    crate::job::ImageRef::Inline(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b))
                })
                .collect(),
            seeds: output.seeds.clone(),
            width: Some(output.width),
            height: Some(output.height),
            format: Some(output.format),
            timings: Some(timings),
            error: None,
            worker: Some(self.queue.config.worker_name.clone()),
            sealed: spec.sealed.is_some(),
        };
        let inline_size: usize = result
            .images
            .iter()
            .map(|i| match i {
                crate::job::ImageRef::Inline(s) => s.len(),
                crate::job::ImageRef::Object(_) => 0,
            })
            .sum();
        // An unsealed private job's images travel inline to `reply` only: never into the object store.
        let unsealed_private = spec.private && spec.sealed.is_none();
        if inline_size > self.queue.config.inline_limit && !unsealed_private {
            let (user, sealed) = (spec.user.as_deref(), result.sealed);
            match self.queue.store_images(&spec.id, user, &output.images, output.format, sealed).await {
                Ok(refs) => result.images = refs,
                Err(e) => {
                    tracing::warn!(error = %e, "storing large result failed; will retry");
                    ack(message, AckKind::Nak(Some(self.queue.config.retry_backoff))).await;
                    return Outcome::Failed;
                }
            }
        }
        let (reply, user) = (spec.reply.as_deref(), spec.user.as_deref());
        let published = if unsealed_private {
            self.queue.publish_private_result(&result, reply, user).await
        } else {
            self.queue.publish_result(&result, reply, user).await
        };
        match published {
            Ok(true) => {}
            Ok(false) => return answered_elsewhere(),
            Err(e) => {
                tracing::warn!(error = %e, "publishing the result failed; handing the job back");
                ack(message, AckKind::Nak(Some(self.queue.config.retry_backoff))).await;
                return Outcome::Failed;
            }
        }
        if spec.training_opt_in && !spec.private {
            self.queue.publish_training_samples(spec, &output).await;
        }
        self.queue.publish_progress(&event(&spec.id, "done", None, None)).await;
        ack(message, AckKind::Ack).await;
        self.metrics.job_finished(JobRecord {
            kind: spec.kind.as_str(),
            model: Some(&spec.model),
            status: "ok",
            error_code: None,
            private: spec.private,
            images: output.images.len() as u64,
            duration: Duration::from_millis(output.timings.total_ms),
        });
        tracing::info!(total_ms = output.timings.total_ms, "job completed");
        Outcome::Completed
    }

    async fn fail(&self, message: &jetstream::Message, spec: &JobSpec, e: JobError, deliveries: i64) -> Outcome {
        if e.code == ErrorCode::Cancelled {
            let result =
                JobResult::failed(&spec.id, JobStatus::Cancelled, ErrorCode::Cancelled, "cancelled while running");
            return self.finish_without_output(message, spec, result, AckKind::Ack, Outcome::Cancelled).await;
        }
        if e.code.is_transient() && deliveries < self.queue.config.max_deliver {
            let delay = self.queue.config.retry_backoff * 2u32.saturating_pow((deliveries.max(1) - 1) as u32);
            tracing::warn!(code = e.code.as_str(), deliveries, ?delay, "transient failure; retrying later");
            ack(message, AckKind::Nak(Some(delay))).await;
            return Outcome::Failed;
        }
        let (code, text) = if e.code.is_transient() {
            let reason = format!("gave up after {deliveries} deliveries: {}", e.message);
            let payload = dead_letter_payload(&message.payload, spec.private);
            self.queue.dead_letter(spec.kind.as_str(), &spec.id, payload, e.code, &reason, deliveries).await;
            (ErrorCode::MaxDeliveriesExceeded, reason)
        } else {
            (e.code, e.message)
        };
        tracing::warn!(code = code.as_str(), "job failed");
        let result = JobResult::failed(&spec.id, JobStatus::Error, code, text);
        self.finish_without_output(message, spec, result, AckKind::Term, Outcome::Failed).await
    }

    async fn finish_without_output(
        &self,
        message: &jetstream::Message,
        spec: &JobSpec,
        mut result: JobResult,
        ack_kind: AckKind,
        outcome: Outcome,
    ) -> Outcome {
        result.worker = Some(self.queue.config.worker_name.clone());
        match self.queue.publish_result(&result, spec.reply.as_deref(), spec.user.as_deref()).await {
            Ok(true) => {}
            Ok(false) => return answered_elsewhere(),
            Err(e) => {
                tracing::warn!(error = %e, "publishing the result failed; handing the job back");
                ack(message, AckKind::Nak(Some(self.queue.config.retry_backoff))).await;
                return Outcome::Failed;
            }
        }
        self.queue.publish_progress(&event(&spec.id, "done", None, None)).await;
        ack(message, ack_kind).await;
        let status = if result.status == JobStatus::Cancelled { "cancelled" } else { "error" };
        self.metrics.job_finished(JobRecord {
            kind: spec.kind.as_str(),
            model: None,
            status,
            error_code: result.error.as_ref().map(|e| e.code.as_str()),
            private: spec.private,
            images: 0,
            duration: Duration::ZERO,
        });
        outcome
    }

    /// A job that failed to parse or validate: error result to whoever can be addressed, then Term.
    async fn reject(&self, message: &jetstream::Message, e: JobError) -> Outcome {
        let id = job::salvage_id(&message.payload)
            .or_else(|| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.to_string())
                    .filter(|id| job::valid_id(id))
            })
            .unwrap_or_else(|| format!("unidentified-{}", message.info().map(|i| i.stream_sequence).unwrap_or(0)));
        let reply = serde_json::from_slice::<serde_json::Value>(&message.payload)
            .ok()
            .and_then(|v| v.get("reply").and_then(|r| r.as_str()).map(str::to_string));
        tracing::warn!(job = %id, code = e.code.as_str(), "job rejected");
        let mut result = JobResult::failed(&id, JobStatus::Error, e.code, e.message);
        result.worker = Some(self.queue.config.worker_name.clone());
        let _ =
            self.queue.publish_result(&result, reply.as_deref().filter(|r| !r.contains(['*', '>', ' '])), None).await;
        ack(message, AckKind::Term).await;
        self.metrics.job_finished(JobRecord {
            kind: "invalid",
            model: None,
            status: "error",
            error_code: Some(e.code.as_str()),
            private: false,
            images: 0,
            duration: Duration::ZERO,
        });
        Outcome::Failed
    }

    /// Sets the cancel flag of running jobs named on `<prefix>.cancel.<id>`.
    async fn listen_for_cancels(self: Arc<Self>, mut cancels: async_nats::Subscriber) {
        while let Some(message) = cancels.next().await {
            let id = message.subject.rsplit('.').next().unwrap_or_default().to_string();
            if let Some(job) = self.running.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                tracing::info!(job = %id, "cancel requested");
                job.control.cancel.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Jobs that crashed workers until JetStream stopped delivering them stay in the work queue: one worker of
    /// the fleet (queue group) moves each to the dead letters and answers its requester.
    async fn listen_for_exhausted_jobs(self: Arc<Self>, mut advisories: async_nats::Subscriber) {
        while let Some(advisory) = advisories.next().await {
            let seq = serde_json::from_slice::<serde_json::Value>(&advisory.payload)
                .ok()
                .and_then(|v| v["stream_seq"].as_u64());
            let Some(seq) = seq else { continue };
            let Ok(raw) = self.queue.jobs.get_raw_message(seq).await else { continue };
            let parsed = job::parse(&raw.payload).ok();
            let id = parsed.as_ref().map(|j| j.id.clone()).unwrap_or_else(|| format!("unidentified-{seq}"));
            let kind = parsed.as_ref().map(|j| j.kind.as_str()).unwrap_or("unknown");
            let reason = format!(
                "delivered {} times without an answer (a worker died on it each time)",
                self.queue.config.max_deliver
            );
            let private = parsed.as_ref().is_none_or(|j| j.private);
            self.queue
                .dead_letter(
                    kind,
                    &id,
                    dead_letter_payload(&raw.payload, private),
                    ErrorCode::MaxDeliveriesExceeded,
                    &reason,
                    self.queue.config.max_deliver,
                )
                .await;
            let mut result = JobResult::failed(&id, JobStatus::Error, ErrorCode::MaxDeliveriesExceeded, reason);
            result.worker = Some(self.queue.config.worker_name.clone());
            let reply = parsed.as_ref().and_then(|j| j.reply.clone());
            if self.queue.existing_result(&id).await.is_none() {
                let _ = self
                    .queue
                    .publish_result(&result, reply.as_deref(), parsed.as_ref().and_then(|j| j.user.as_deref()))
                    .await;
            }
            let _ = self.queue.jobs.delete_message(seq).await;
            tracing::warn!(job = %id, "job dead-lettered after max deliveries");
        }
    }
}

/// Another delivery of this job (whose worker was presumed dead but was only slow) stored its result first and
/// answered: this one neither answers nor acks. The other delivery acks; should its worker die before that, the
/// job comes back and is answered from the stored result.
fn answered_elsewhere() -> Outcome {
    tracing::info!("another delivery of this job stored its result first; leaving the job to it");
    Outcome::Answered
}

/// Why a run ended without output.
enum Stop {
    Failed(JobError),
    /// The worker stopped the job to hand it back to the queue (drain), not the user.
    HandedBack,
}

/// A run's result, a cancellation the worker asked for (`handback`) being a hand-back rather than a failure.
fn stop_reason(result: Result<JobOutput, JobError>, handback: &AtomicBool) -> Result<JobOutput, Stop> {
    match result {
        Err(e) if e.code == ErrorCode::Cancelled && handback.load(Ordering::SeqCst) => Err(Stop::HandedBack),
        other => other.map_err(Stop::Failed),
    }
}

fn event(id: &str, state: &str, step: Option<u32>, total: Option<u32>) -> ProgressEvent {
    ProgressEvent { id: id.to_string(), state: state.to_string(), step, total }
}

/// What a dead letter keeps of the job: all of it, for a re-drive, except for a private job (or one that cannot be
/// read), whose content must not be stored: its dead letter carries only the headers (id, code, reason).
fn dead_letter_payload(payload: &bytes::Bytes, private: bool) -> bytes::Bytes {
    if private {
        bytes::Bytes::new()
    } else {
        payload.clone()
    }
}

/// Zeroes a private job's message in the NATS client's read buffer. async-nats hands the payload out as a `Bytes`
/// view of that buffer and later reuses the buffer without clearing it, so the job's JSON (prompt, inline images)
/// would stay readable in the worker's memory; the zero-on-free allocator never sees it freed. Once the job is
/// answered and acknowledged nothing reads those bytes again: the worker holds the only view of them.
fn wipe_payload(message: &jetstream::Message) {
    let payload = &message.payload;
    // SAFETY: the bytes are valid for `len` bytes, no other code reads them any more (see above), and
    // explicit_bzero is an opaque call, so no load of them can be cached across it.
    unsafe { crate::private::wipe_bytes(payload.as_ptr().cast_mut(), payload.len()) };
}

/// Acks with confirmation from the server (a plain ack can be lost when the process exits right after).
async fn ack(message: &jetstream::Message, kind: AckKind) {
    let result = match kind {
        AckKind::Ack => message.double_ack().await,
        other => message.ack_with(other).await,
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "acknowledgement failed");
    }
}
