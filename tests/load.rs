//! Load: a flood of jobs queued at once, far above what one worker does per second. The queue must absorb it,
//! nothing may be dropped, the worker's memory must not depend on how much is queued (it pulls one job per free
//! slot), and latency must grow linearly with the position in the queue, at the worker's steady service time.
//!
//! A baseline of 100 queued jobs is compared with a flood (CI: 300; documented full run:
//! `IMAGO_LOAD_JOBS=2000 cargo test --test load -- --nocapture`), each answered by a fresh worker process.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::stress::{client_with_max_deliver, jobs_left_after, memory, quantile};
use common::workers::{job, publish, WorkerProcess};
use futures::StreamExt;
use imago::job::{JobResult, JobStatus};
use imago::queue::Queue;

const BASELINE_JOBS: usize = 100;

/// What one worker did with a queue of `jobs` jobs.
struct Phase {
    jobs: usize,
    /// Queue-to-result latency of each job, by its position in the queue.
    latencies: Vec<Duration>,
    /// Time between consecutive results.
    service: Vec<Duration>,
    /// The worker's peak resident memory (VmHWM), and its resident memory after the first tenth of the jobs and
    /// at the end, KiB.
    peak_kib: u64,
    rss_early_kib: u64,
    rss_end_kib: u64,
    elapsed: Duration,
}

impl Phase {
    fn median_service(&self) -> Duration {
        let mut sorted = self.service.clone();
        sorted.sort();
        quantile(&sorted, 0.5)
    }

    /// Median service time over a range of results (by completion order).
    fn median_service_of(&self, range: std::ops::Range<usize>) -> Duration {
        let mut sorted = self.service[range].to_vec();
        sorted.sort();
        quantile(&sorted, 0.5)
    }

    /// Least-squares slope of latency against queue position, and the fit's R².
    fn linear_fit(&self) -> (Duration, f64) {
        let n = self.latencies.len() as f64;
        let xs: Vec<f64> = (0..self.latencies.len()).map(|i| i as f64).collect();
        let ys: Vec<f64> = self.latencies.iter().map(|d| d.as_secs_f64()).collect();
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
        let syy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
        let slope = sxy / sxx;
        (Duration::from_secs_f64(slope.max(0.0)), sxy * sxy / (sxx * syy))
    }
}

/// Queues `jobs` jobs at once, then starts a worker and waits until it answered all of them.
async fn flood(server: &NatsServer, queue: &Queue, label: &str, jobs: usize) -> Phase {
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    let ids: Vec<String> = (0..jobs).map(|i| format!("{label}-{i}")).collect();
    let mut queued_at = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let mut job = job(id, "sd-turbo", 1);
        job.seed = Some(i as u64);
        publish(queue, &job).await;
        queued_at.insert(id.clone(), Instant::now());
    }
    let queued = queue.jobs.clone().info().await.unwrap().state.messages;
    assert_eq!(queued, jobs as u64, "the queue holds the whole flood");

    let worker = WorkerProcess::start(server, label, &[]);
    let pid = worker.child.id();
    let started = Instant::now();
    let mut answered: HashMap<String, Duration> = HashMap::new();
    let mut completions = Vec::with_capacity(jobs);
    let mut rss_early_kib = 0;
    let time_limit = Duration::from_secs(60 + jobs as u64);
    while answered.len() < jobs {
        let message = tokio::time::timeout(Duration::from_secs(30), results.next())
            .await
            .unwrap_or_else(|_| panic!("no result for 30 s; {} of {jobs} answered\n{}", answered.len(), worker.log()))
            .unwrap();
        let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(result.status, JobStatus::Ok, "{result:?}");
        let latency = queued_at[&result.id].elapsed();
        assert!(answered.insert(result.id.clone(), latency).is_none(), "{} answered twice", result.id);
        completions.push(Instant::now());
        if answered.len() == jobs / 10 {
            rss_early_kib = memory(pid).unwrap().rss_kib;
        }
        assert!(started.elapsed() < time_limit, "{} of {jobs} answered after {time_limit:?}", answered.len());
    }
    let elapsed = started.elapsed();
    let end = memory(pid).unwrap();
    assert_eq!(jobs_left_after(queue, Duration::from_secs(5)).await, 0, "every job left the queue");
    let mut worker = worker;
    worker.signal("-TERM");
    assert_eq!(worker.wait(Duration::from_secs(30)), 0, "{}", worker.log());
    Phase {
        jobs,
        latencies: ids.iter().map(|id| answered[id]).collect(),
        service: completions.windows(2).map(|w| w[1] - w[0]).collect(),
        peak_kib: end.peak_kib,
        rss_early_kib,
        rss_end_kib: end.rss_kib,
        elapsed,
    }
}

fn report(label: &str, phase: &Phase) {
    let (slope, r2) = phase.linear_fit();
    println!(
        "load {label}: {} jobs in {:.1?} ({:.1} jobs/s) | service median {:?} | latency first {:?} median {:?} last \
         {:?} | slope {:?}/position, R² {r2:.4} | worker peak RSS {} MiB, RSS at 10% {} MiB, at end {} MiB",
        phase.jobs,
        phase.elapsed,
        phase.jobs as f64 / phase.elapsed.as_secs_f64(),
        phase.median_service(),
        phase.latencies[0],
        phase.latencies[phase.jobs / 2],
        phase.latencies[phase.jobs - 1],
        slope,
        phase.peak_kib / 1024,
        phase.rss_early_kib / 1024,
        phase.rss_end_kib / 1024,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_absorbed_with_bounded_worker_memory_and_linear_latency() {
    let jobs = std::env::var("IMAGO_LOAD_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(300usize);
    let server = NatsServer::start();
    let queue = client_with_max_deliver(&server, 3).await;
    let baseline = flood(&server, &queue, "baseline", BASELINE_JOBS).await;
    report("baseline", &baseline);
    let flooded = flood(&server, &queue, "flood", jobs).await;
    report("flood", &flooded);

    // Memory: the same as with a short queue, and no growth from the first tenth of the jobs to the last.
    let slack_kib = 32 * 1024;
    assert!(
        flooded.peak_kib <= baseline.peak_kib + baseline.peak_kib / 5 + slack_kib,
        "peak RSS {} KiB with {jobs} queued vs {} KiB with {BASELINE_JOBS}",
        flooded.peak_kib,
        baseline.peak_kib
    );
    assert!(
        flooded.rss_end_kib <= flooded.rss_early_kib + slack_kib,
        "RSS grew from {} KiB to {} KiB while working through the flood",
        flooded.rss_early_kib,
        flooded.rss_end_kib
    );
    // Latency: linear in the position, at the steady service time, which does not degrade as the queue drains.
    let service = flooded.median_service();
    let startup_slack = Duration::from_secs(15);
    let last = flooded.latencies[jobs - 1];
    assert!(
        last <= service.mul_f64(1.5 * jobs as f64) + startup_slack,
        "last job waited {last:?}; {jobs} jobs at a median {service:?} each"
    );
    let (slope, r2) = flooded.linear_fit();
    assert!(r2 > 0.95, "latency is not linear in the queue position (R² {r2:.3})");
    assert!(slope <= service.mul_f64(1.5), "latency grows {slope:?} per position at {service:?} per job");
    let tenth = jobs / 10;
    let (early, late) = (flooded.median_service_of(0..tenth), flooded.median_service_of(jobs - 1 - tenth..jobs - 1));
    assert!(late <= early.mul_f64(1.5) + Duration::from_millis(20), "service slowed from {early:?} to {late:?}");
}
