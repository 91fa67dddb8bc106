//! Worker overhead on the queue, separated from model time: jobs/s and queue-to-result latency (p50/p99) of a
//! worker whose runner answers at once, beside raw JetStream publish + pull + ack throughput on the same server.
//! Starts its own nats-server (loopback, temporary store).
//!
//!     cargo bench --bench queue_overhead [-- JOBS]

#[path = "../tests/common/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use imago::diffusion::pipeline::StepProgress;
use imago::engine::{JobControl, JobInputs, JobOutput, JobRunner};
use imago::job::{JobError, JobLimits, JobMessage, JobResult, JobSpec, OutputFormat, Timings};
use imago::queue::{Queue, QueueConfig, Shutdown, Worker, WorkerSettings};
use imago::telemetry::Metrics;

/// Answers every job at once with the same small PNG: what remains is the worker's own cost.
struct InstantRunner {
    png: Vec<u8>,
}

impl JobRunner for InstantRunner {
    fn run(
        &self,
        _: &JobSpec,
        _: &JobInputs,
        _: &JobControl,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<JobOutput, JobError> {
        on_step(StepProgress { step: 1, total: 1 });
        Ok(JobOutput {
            images: vec![self.png.clone()],
            seeds: vec![0],
            width: 64,
            height: 64,
            format: OutputFormat::Png,
            steps: 1,
            guidance: 0.0,
            scheduler: "euler".into(),
            timings: Timings::default(),
        })
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn raw_jetstream(client: async_nats::Client, n: usize) -> f64 {
    let js = jetstream::new(client);
    let s = js
        .create_stream(stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config { durable_name: Some("raw".into()), ..Default::default() })
        .await
        .unwrap();
    let started = Instant::now();
    // At most 500 unawaited publish acks at a time (thousands can deadlock the client).
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            acks.push(js.publish("raw.job", format!("{i}").into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    let mut done = 0;
    while done < n {
        let mut batch = c.fetch().max_messages(100).messages().await.unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap().double_ack().await.unwrap();
            done += 1;
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn worker_overhead(server: &nats::NatsServer, n: usize) -> (f64, Duration, Duration) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let queue = Queue::setup(client.clone(), QueueConfig::default()).await.unwrap();
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(64, 64)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let worker_queue =
        Queue::setup(async_nats::connect(server.url()).await.unwrap(), QueueConfig::default()).await.unwrap();
    let settings = WorkerSettings {
        limits: JobLimits::default(),
        max_input_bytes: 1 << 20,
        metrics: Arc::new(Metrics::new()),
        keyring: Default::default(),
    };
    let worker = Worker::new(Arc::new(worker_queue), Arc::new(InstantRunner { png }), settings);
    let (stop, stop_rx) = tokio::sync::watch::channel(None);
    let running = tokio::spawn(worker.run(stop_rx));

    let mut results = client.subscribe(queue.config.names.results("*")).await.unwrap();
    let mut sent = HashMap::new();
    let started = Instant::now();
    for i in 0..n {
        let job = JobMessage::generate(format!("b{i}"), "x");
        sent.insert(job.id.clone(), Instant::now());
        queue
            .js
            .publish(queue.config.names.jobs("generate"), serde_json::to_vec(&job).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let m = results.next().await.unwrap();
        let r: JobResult = serde_json::from_slice(&m.payload).unwrap();
        latencies.push(sent[&r.id].elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(Some(Shutdown::Drain));
    running.await.unwrap().unwrap();
    latencies.sort();
    (rate, percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let server = nats::NatsServer::start();
    let raw = raw_jetstream(async_nats::connect(server.url()).await.unwrap(), n).await;
    let (rate, p50, p99) = worker_overhead(&server, n).await;
    println!("| measure | value |\n|---|---|");
    println!("| raw JetStream publish + pull + ack | {raw:.0} msg/s |");
    println!("| worker, instant runner, 1 slot | {rate:.0} jobs/s |");
    println!(
        "| queue-to-result latency p50 / p99 | {:.1} ms / {:.1} ms |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    println!(
        "{}",
        serde_json::json!({"jobs": n, "raw_jetstream_msgs_per_s": raw, "worker_jobs_per_s": rate,
            "latency_p50_ms": p50.as_secs_f64() * 1e3, "latency_p99_ms": p99.as_secs_f64() * 1e3})
    );
}
