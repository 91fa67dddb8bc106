//! Batching in the worker: a free slot pulls up to `max_batch` jobs (waiting up to `batch_wait` for companions when
//! some of them could share a pipeline call), groups the compatible generate jobs ([`plan_batches`]) and runs the
//! groups one after another; every other job runs alone as usual. Each job keeps its own progress events,
//! cancellation, deadline, result and acknowledgement. Jobs waiting for their group's turn get progress acks, see
//! cancels, and are handed back with the running ones on drain or quit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;

use super::{ack, event, seal_output, stop_reason, Outcome, Running, Stop, Worker};
use crate::diffusion::pipeline::StepProgress;
use crate::engine::{batch_key, plan_batches, BatchJob, JobControl, JobOutput};
use crate::job::{self, ErrorCode, JobError, JobSpec};

/// A valid job pulled with others, registered as running while it waits so that cancels and hand-backs reach it.
struct Pulled {
    index: usize,
    spec: JobSpec,
    deliveries: i64,
    control: JobControl,
    handback: Arc<AtomicBool>,
}

impl Worker {
    /// The next jobs for one free slot: what the queue holds, up to `max_batch` messages (waiting up to a second
    /// for the first), then, when one of them could share a pipeline call, companions arriving within
    /// `batch_wait` (at most a third of the ack wait: the pulled jobs get no progress acks meanwhile).
    pub(super) async fn pull(&self) -> Vec<jetstream::Message> {
        let config = &self.queue.config;
        let max = config.max_batch.max(1);
        let fetched = self.queue.consumer.fetch().max_messages(max).expires(Duration::from_secs(1)).messages().await;
        let mut pulled = match fetched {
            Ok(batch) => collect_messages(batch).await,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Vec::new();
            }
        };
        let wait = config.batch_wait.min(config.ack_wait / 3);
        if pulled.is_empty() || pulled.len() >= max || wait.is_zero() || !pulled.iter().any(|m| self.batchable(m)) {
            return pulled;
        }
        match self.queue.consumer.batch().max_messages(max - pulled.len()).expires(wait).messages().await {
            Ok(batch) => pulled.extend(collect_messages(batch).await),
            Err(e) => tracing::warn!(error = %e, "pulling companions failed; running what was pulled"),
        }
        pulled
    }

    fn batchable(&self, message: &jetstream::Message) -> bool {
        let spec = job::parse(&message.payload).and_then(|m| job::validate(m, &self.limits));
        spec.is_ok_and(|spec| batch_key(&spec).is_some())
    }

    /// Runs the jobs one slot pulled: groups of compatible jobs as one pipeline call each, every other job alone,
    /// one after another, in the order they arrived.
    pub(super) async fn handle_several(self: Arc<Self>, messages: Vec<jetstream::Message>) {
        let mut pulled: Vec<Option<Pulled>> = messages.iter().enumerate().map(|(i, m)| self.register(i, m)).collect();
        let keys: Vec<_> =
            pulled.iter().map(|p| p.as_ref().map_or((None, 1), |p| (batch_key(&p.spec), p.spec.batch))).collect();
        let groups = plan_batches(&keys, self.queue.config.max_batch as u32);
        let waiting = Mutex::new(vec![true; messages.len()]);
        let work = async {
            for group in groups {
                for &i in &group {
                    waiting.lock().unwrap_or_else(|e| e.into_inner())[i] = false;
                }
                let jobs: Vec<Pulled> = group.iter().filter_map(|&i| pulled[i].take()).collect();
                match (group.as_slice(), jobs.len()) {
                    // a message that does not parse is rejected on the usual path
                    (&[i], 0) => self.record(self.process(&messages[i]).await),
                    (_, 1) => self.run_alone(&messages, jobs.into_iter().next()).await,
                    _ => self.run_group(&messages, jobs).await,
                }
            }
        };
        let heartbeats = async {
            let mut heartbeat = tokio::time::interval(self.queue.config.ack_wait / 3);
            heartbeat.tick().await;
            loop {
                heartbeat.tick().await;
                let still_waiting: Vec<usize> = {
                    let waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
                    (0..waiting.len()).filter(|&i| waiting[i]).collect()
                };
                for i in still_waiting {
                    ack(&messages[i], AckKind::Progress).await;
                }
            }
        };
        tokio::select! {
            _ = work => {}
            _ = heartbeats => {}
        }
    }

    /// Parses and validates a pulled message and registers the job as running; `None` for a message that fails to.
    fn register(&self, index: usize, message: &jetstream::Message) -> Option<Pulled> {
        let spec = job::parse(&message.payload).and_then(|m| job::validate(m, &self.limits)).ok()?;
        let control = JobControl { cancel: Arc::default(), deadline: spec.deadline };
        let handback = Arc::new(AtomicBool::new(false));
        self.track_running(&spec.id, Some(Running { control: control.clone(), handback: handback.clone() }));
        let deliveries = message.info().map(|i| i.delivered).unwrap_or(1);
        Some(Pulled { index, spec, deliveries, control, handback })
    }

    /// A job of a pulled set that runs on its own: the usual path, unless it was handed back while waiting.
    async fn run_alone(&self, messages: &[jetstream::Message], job: Option<Pulled>) {
        let Some(job) = job else { return };
        let message = &messages[job.index];
        self.track_running(&job.spec.id, None);
        if job.handback.load(Ordering::SeqCst) {
            ack(message, AckKind::Nak(None)).await;
            return self.record(Outcome::HandedBack);
        }
        self.record(self.process(message).await);
    }

    /// Compatible generate jobs as one call of [`crate::engine::JobRunner::run_batch`].
    async fn run_group(&self, messages: &[jetstream::Message], jobs: Vec<Pulled>) {
        let mut runnable = Vec::with_capacity(jobs.len());
        for job in jobs {
            let message = &messages[job.index];
            let settled = if job.handback.load(Ordering::SeqCst) {
                ack(message, AckKind::Nak(None)).await;
                Some(Outcome::HandedBack)
            } else {
                self.settled_before_running(message, &job.spec).await
            };
            match settled {
                Some(outcome) => {
                    self.track_running(&job.spec.id, None);
                    self.record(outcome);
                }
                None => runnable.push(job),
            }
        }
        if runnable.is_empty() {
            return;
        }
        let span = tracing::info_span!("batch", jobs = runnable.len());
        let results = self.run_batch_with_heartbeats(messages, &runnable).instrument(span).await;
        for (job, result) in runnable.into_iter().zip(results) {
            self.track_running(&job.spec.id, None);
            let spec = &job.spec;
            let run =
                stop_reason(result, &job.handback).and_then(|output| seal_output(spec, output).map_err(Stop::Failed));
            let (id, kind, deliveries) = (&spec.id, spec.kind.as_str(), job.deliveries);
            let span = tracing::info_span!("job", %id, kind, model = %spec.model, deliveries);
            let outcome = self.conclude(&messages[job.index], spec, run, job.deliveries).instrument(span).await;
            self.record(outcome);
        }
    }

    /// Runs the engine's batch on a blocking thread, with heartbeats and each job's progress events meanwhile.
    async fn run_batch_with_heartbeats(
        &self,
        messages: &[jetstream::Message],
        jobs: &[Pulled],
    ) -> Vec<Result<JobOutput, JobError>> {
        let (steps_tx, mut steps_rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = self.engine.clone();
        let specs: Vec<JobSpec> = jobs.iter().map(|j| j.spec.clone()).collect();
        let controls: Vec<JobControl> = jobs.iter().map(|j| j.control.clone()).collect();
        let mut work = tokio::task::spawn_blocking(move || {
            let mut senders: Vec<_> = (0..specs.len())
                .map(|i| {
                    let steps = steps_tx.clone();
                    move |p: StepProgress| {
                        let _ = steps.send((i, p));
                    }
                })
                .collect();
            let mut batch: Vec<BatchJob> = specs
                .iter()
                .zip(&controls)
                .zip(senders.iter_mut())
                .map(|((spec, control), on_step)| BatchJob { spec, control, on_step })
                .collect();
            engine.run_batch(&mut batch)
        });
        let group_messages: Vec<&jetstream::Message> = jobs.iter().map(|j| &messages[j.index]).collect();
        let ids: Vec<&str> = jobs.iter().map(|j| j.spec.id.as_str()).collect();
        match self.heartbeat_until(&group_messages, &ids, &mut work, &mut steps_rx).await {
            Ok(results) if results.len() == jobs.len() => results,
            Ok(_) => failed_all(jobs.len(), "the batch returned a result count that does not match its jobs"),
            Err(e) => failed_all(jobs.len(), &format!("the batch's thread failed: {e}")),
        }
    }

    /// Waits for `work`, meanwhile acking progress on `messages` every third of the ack wait and publishing the
    /// step events that arrive on `steps` as `(job index, step)` for the job `ids[index]`.
    pub(super) async fn heartbeat_until<T>(
        &self,
        messages: &[&jetstream::Message],
        ids: &[&str],
        work: &mut JoinHandle<T>,
        steps: &mut UnboundedReceiver<(usize, StepProgress)>,
    ) -> Result<T, JoinError> {
        for id in ids {
            self.queue.publish_progress(&event(id, "started", None, None)).await;
        }
        let mut heartbeat = tokio::time::interval(self.queue.config.ack_wait / 3);
        heartbeat.tick().await;
        let mut last_step = std::time::Instant::now();
        // Every job of a batch reports each step: the step time is observed once per step.
        let mut last_reported = None;
        loop {
            tokio::select! {
                done = &mut *work => return done,
                Some((job, step)) = steps.recv() => {
                    if last_reported != Some(step.step) {
                        self.metrics.step(last_step.elapsed());
                        last_step = std::time::Instant::now();
                        last_reported = Some(step.step);
                    }
                    let Some(id) = ids.get(job) else { continue };
                    let progress = event(id, "step", Some(step.step as u32), Some(step.total as u32));
                    self.queue.publish_progress(&progress).await;
                }
                _ = heartbeat.tick() => {
                    for message in messages {
                        ack(message, AckKind::Progress).await;
                    }
                }
            }
        }
    }
}

/// Every message of a pull (ending at the pull's expiry).
async fn collect_messages(mut batch: jetstream::consumer::pull::Batch) -> Vec<jetstream::Message> {
    let mut messages = Vec::new();
    while let Some(next) = batch.next().await {
        match next {
            Ok(message) => messages.push(message),
            Err(e) => {
                tracing::warn!(error = %e, "pull returned an error");
                break;
            }
        }
    }
    messages
}

fn failed_all(jobs: usize, why: &str) -> Vec<Result<JobOutput, JobError>> {
    (0..jobs).map(|_| Err(JobError::new(ErrorCode::Internal, why))).collect()
}
