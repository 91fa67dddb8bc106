//! Chaos: several worker processes on one real nats-server work through miniature jobs while workers are SIGKILLed
//! and restarted at random and the server itself is killed and restarted once (JetStream on disk).
//!
//! What must hold, per job:
//! - the results stream holds exactly one result for it, `ok`; nothing is left in the work queue or dead-lettered;
//! - its requester receives that result on its `reply` subject, and every message it receives there is that stored
//!   result byte for byte: a copy (a worker killed after answering but before acking; the redelivery answers again
//!   from the stored result) repeats the one answer and never contradicts it;
//! - the first message on `imago.results.<id>` is the stored result (later publishes of a job computed twice, when a
//!   worker presumed dead was only slow, are refused by the stream's deduplication and answer no one). Core NATS
//!   is at most once, so a publish made while the requester itself reconnects after the server restart can be
//!   missed; only jobs in flight then are excused, and they are counted.
//!
//! Copies and extra publishes are counted in the figures.
//!
//! CI runs 300 jobs; the documented full run: `IMAGO_CHAOS_JOBS=3000 cargo test --test chaos -- --nocapture`
//! (`IMAGO_CHAOS_SEED` replays a schedule of kills).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::stress::{client_with_max_deliver, jobs_left_after, publish_until_acknowledged, quantile};
use common::workers::{job, WorkerProcess};
use futures::StreamExt;
use imago::job::{JobResult, JobStatus, ProgressEvent};
use rand::{Rng, SeedableRng};

const WORKERS: usize = 3;
/// Deliveries before a job is given up (a setting of the consumer, which this test creates): high, so that a job
/// whose workers are killed under it again and again is still finished (the poison-job path has its own test).
const MAX_DELIVER: i64 = 10;
/// Jobs submitted and not yet answered at any time: enough to keep every worker busy.
const WINDOW: usize = 4 * WORKERS;
/// Silence after which the requester reads outstanding results from the results stream.
const RECOVER_AFTER: Duration = Duration::from_secs(5);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The fleet: one slot per worker, replaced when killed; every incarnation has its own name and log.
struct Fleet {
    workers: Vec<WorkerProcess>,
    started: usize,
    /// The logs of every incarnation, killed ones included.
    logs: Vec<std::path::PathBuf>,
}

impl Fleet {
    fn new(server: &NatsServer) -> Self {
        let mut fleet = Self { workers: Vec::new(), started: 0, logs: Vec::new() };
        for _ in 0..WORKERS {
            let worker = fleet.spawn(server);
            fleet.workers.push(worker);
        }
        fleet
    }

    fn spawn(&mut self, server: &NatsServer) -> WorkerProcess {
        self.started += 1;
        let worker = WorkerProcess::start(server, &format!("chaos-{}", self.started), &[]);
        self.logs.push(worker.log.clone());
        worker
    }

    /// SIGKILLs worker `slot` and starts its replacement.
    fn kill_and_replace(&mut self, server: &NatsServer, slot: usize) {
        let replacement = self.spawn(server);
        let mut killed = std::mem::replace(&mut self.workers[slot], replacement);
        killed.child.kill().unwrap();
        killed.child.wait().unwrap();
    }

    /// The log lines of every incarnation that mention `id`, for explaining a failure.
    fn history(&self, id: &str) -> String {
        let (span, field) = (format!("id={id} "), format!("job={id} "));
        let mut lines = Vec::new();
        for path in &self.logs {
            let text = strip_colours(&std::fs::read_to_string(path).unwrap_or_default());
            let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            let mentions = text.lines().filter(|l| l.contains(&span) || l.contains(&field));
            lines.extend(mentions.map(|l| format!("{name}: {l}")));
        }
        lines.join("\n")
    }
}

/// Log text without its ANSI colour sequences.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    plain
}

/// What the requester saw of one job.
#[derive(Default)]
struct Seen {
    submitted: Option<Instant>,
    replies: Vec<bytes::Bytes>,
    /// When the first answer (reply or stored result) came.
    answered_at: Option<Instant>,
    latency: Option<Duration>,
    /// Messages on `imago.results.<id>`: how many, and the first.
    result_publishes: usize,
    first_publish: Option<bytes::Bytes>,
    starts: usize,
    /// The stored result, fetched by the requester after its reply was lost (core NATS is at most once: a reply
    /// sent while the server restarts is gone; the stored result is not).
    recovered: Option<bytes::Bytes>,
}

/// Counts a message seen on `imago.results.<id>`, keeping the first.
fn record_publish(seen: &mut HashMap<String, Seen>, payload: bytes::Bytes) {
    let result: JobResult = serde_json::from_slice(&payload).unwrap();
    let job = seen.entry(result.id).or_default();
    job.result_publishes += 1;
    job.first_publish.get_or_insert(payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_stored_once_and_answered_with_it_while_workers_and_the_server_die() {
    let jobs = env_number("IMAGO_CHAOS_JOBS", 300) as usize;
    let seed = env_number("IMAGO_CHAOS_SEED", rand::random::<u16>() as u64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    println!("chaos: {jobs} jobs, {WORKERS} workers, schedule seed {seed} (IMAGO_CHAOS_SEED)");

    let mut server = NatsServer::start();
    let queue = client_with_max_deliver(&server, MAX_DELIVER).await;
    // Every acknowledgement is sampled with its delivery count: the redeliveries, as the server counts them.
    let names = &queue.config.names;
    let mut consumer_config = queue.consumer.cached_info().config.clone();
    consumer_config.sample_frequency = 100;
    queue.jobs.update_consumer(consumer_config).await.unwrap();
    let ack_metrics = format!("$JS.EVENT.METRIC.CONSUMER.ACK.{}.{}", names.jobs_stream(), names.consumer());
    let mut acks = queue.client.subscribe(ack_metrics).await.unwrap();
    let mut replies = queue.client.subscribe("chaos.reply.*").await.unwrap();
    let mut results = queue.client.subscribe(names.results("*")).await.unwrap();
    let mut progress = queue.client.subscribe(names.progress("*")).await.unwrap();

    let mut fleet = Fleet::new(&server);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut outstanding: HashSet<String> = HashSet::new();
    let mut answered = 0;
    let (mut recovered, mut last_recovery) = (0, Instant::now());
    let mut deliveries_at_ack: HashMap<u64, u64> = HashMap::new();
    let (mut kills, mut server_restarts) = (0, 0);
    let mut next_kill = Instant::now() + Duration::from_millis(rng.gen_range(500..2500));
    let started = Instant::now();
    let mut last_answer = Instant::now();
    let time_limit = Duration::from_secs(120 + jobs as u64 / 2);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut next_job = 0;
    let mut requester_offline: Option<(Instant, Instant)> = None;
    while answered < jobs {
        // 1. keep the window full
        while next_job < jobs && outstanding.len() < WINDOW {
            let id = format!("chaos-{next_job}");
            let mut job = job(&id, "sd-turbo", 1);
            job.seed = Some(next_job as u64);
            job.reply = Some(format!("chaos.reply.{id}"));
            publish_until_acknowledged(&queue, &job).await;
            seen.entry(id.clone()).or_default().submitted = Some(Instant::now());
            outstanding.insert(id);
            next_job += 1;
        }
        // 2. whatever arrives next
        tokio::select! {
            Some(message) = replies.next() => {
                let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
                assert_eq!(result.status, JobStatus::Ok, "{result:?}");
                let job = seen.entry(result.id.clone()).or_default();
                job.replies.push(message.payload);
                if job.replies.len() == 1 {
                    last_answer = Instant::now();
                    job.answered_at = Some(last_answer);
                    job.latency = job.submitted.map(|t| t.elapsed());
                    outstanding.remove(&result.id);
                    answered += 1;
                }
            }
            Some(message) = results.next() => record_publish(&mut seen, message.payload),
            Some(message) = progress.next() => {
                let event: ProgressEvent = serde_json::from_slice(&message.payload).unwrap();
                if event.state == "started" {
                    seen.entry(event.id).or_default().starts += 1;
                }
            }
            Some(message) = acks.next() => {
                let metric: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                let (Some(seq), Some(deliveries)) = (metric["stream_seq"].as_u64(), metric["deliveries"].as_u64())
                else { continue };
                deliveries_at_ack.insert(seq, deliveries);
            }
            _ = tick.tick() => {}
        }
        // A requester that has heard nothing for a while looks its result up in the results stream.
        if last_answer.elapsed() > RECOVER_AFTER && last_recovery.elapsed() > RECOVER_AFTER {
            last_recovery = Instant::now();
            for id in outstanding.clone() {
                if let Some(stored) = queue.existing_result(&id).await {
                    let job = seen.entry(id.clone()).or_default();
                    job.recovered = Some(stored);
                    job.answered_at = Some(Instant::now());
                    job.latency = job.submitted.map(|t| t.elapsed());
                    outstanding.remove(&id);
                    answered += 1;
                    recovered += 1;
                    last_answer = Instant::now();
                }
            }
        }
        // 3. chaos
        if Instant::now() >= next_kill {
            fleet.kill_and_replace(&server, rng.gen_range(0..WORKERS));
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(500..2500));
        }
        if server_restarts == 0 && answered >= jobs * 2 / 5 {
            let began = Instant::now();
            server.restart();
            server_restarts += 1;
            // Until the requester's own connection is back, messages on its subscriptions are lost like replies.
            let reconnect_by = Instant::now() + Duration::from_secs(10);
            while queue.client.connection_state() != async_nats::connection::State::Connected
                && Instant::now() < reconnect_by
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            requester_offline = Some((began, Instant::now()));
        }
        if started.elapsed() > time_limit || last_answer.elapsed() > Duration::from_secs(30) {
            let consumer = queue.consumer.clone().info().await.map(|i| format!("{i:?}")).unwrap_or_default();
            let stream = queue.jobs.clone().info().await.map(|i| format!("{:?}", i.state)).unwrap_or_default();
            eprintln!("consumer {consumer}\njobs {stream}");
            for id in outstanding.iter().take(5) {
                let s = &seen[id];
                let stored = queue
                    .existing_result(id)
                    .await
                    .map(|b| String::from_utf8_lossy(&b).chars().take(300).collect::<String>());
                eprintln!(
                    "{id}: publishes {} starts {} replies {} stored {stored:?}",
                    s.result_publishes,
                    s.starts,
                    s.replies.len()
                );
                for path in &fleet.logs {
                    let text = strip_colours(&std::fs::read_to_string(path).unwrap_or_default());
                    for line in text.lines().filter(|l| l.contains(id.as_str())) {
                        eprintln!("{}: {line}", path.display());
                    }
                }
            }
            for w in &fleet.workers {
                let log = strip_colours(&w.log());
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- {} (tail)\n{}", w.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            let waiting: Vec<&String> = outstanding.iter().take(5).collect();
            let histories: Vec<String> = waiting.iter().map(|id| fleet.history(id)).collect();
            panic!(
                "{answered} of {jobs} answered after {time_limit:?}; waiting for {waiting:?}\n{}",
                histories.join("\n")
            );
        }
    }
    let elapsed = started.elapsed();
    // Late duplicates would arrive within a redelivery: wait longer than the ack wait, then count again.
    let grace = Instant::now() + Duration::from_secs(4);
    while let Ok(Some(message)) = tokio::time::timeout_at(grace.into(), replies.next()).await {
        let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
        seen.entry(result.id).or_default().replies.push(message.payload);
    }
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(100), results.next()).await {
        record_publish(&mut seen, message.payload);
    }

    // The figures.
    let mut latencies: Vec<Duration> = seen.values().filter_map(|s| s.latency).collect();
    latencies.sort();
    let redelivered = deliveries_at_ack.values().filter(|&&d| d > 1).count();
    let recomputed: usize = seen.values().map(|s| s.starts.saturating_sub(1)).sum();
    let duplicate_publishes: usize = seen.values().map(|s| s.result_publishes.saturating_sub(1)).sum();
    let duplicate_replies: usize = seen.values().map(|s| s.replies.len().saturating_sub(1)).sum();
    // A job in flight while the requester was cut off by the server restart: its result publish may be lost to it.
    let missed_offline = |job: &Seen| match (requester_offline, job.submitted, job.answered_at) {
        (Some((began, back)), Some(submitted), Some(answered)) => submitted < back && answered > began,
        _ => false,
    };
    let publishes_missed = seen.values().filter(|s| s.first_publish.is_none() && s.recovered.is_none()).count();
    println!(
        "chaos figures: jobs {jobs} | worker kills {kills} | server restarts {server_restarts} | \
         jobs redelivered {redelivered} | runs repeated {recomputed} | duplicate result publishes \
         {duplicate_publishes} | duplicate replies {duplicate_replies} | answers lost and read from the store \
         {recovered} | result publishes missed while reconnecting {publishes_missed} | latency p50 {:?} p99 {:?} max {:?} | \
         {elapsed:.1?} ({:.1} jobs/s)",
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        jobs as f64 / elapsed.as_secs_f64(),
    );

    // The guarantees.
    assert_eq!(seen.len(), jobs);
    let unanswered: Vec<&String> =
        seen.iter().filter(|(_, s)| s.replies.is_empty() && s.recovered.is_none()).map(|(id, _)| id).collect();
    let histories: Vec<String> = unanswered.iter().map(|id| fleet.history(id)).collect();
    assert!(unanswered.is_empty(), "requesters without an answer: {unanswered:?}\n{}", histories.join("\n"));
    for (id, job) in &seen {
        let stored = queue.existing_result(id).await.unwrap_or_else(|| panic!("no stored result for {id}"));
        let result: JobResult = serde_json::from_slice(&stored).unwrap();
        assert_eq!((result.id.as_str(), result.status), (id.as_str(), JobStatus::Ok));
        assert!(
            job.replies.iter().all(|r| *r == stored),
            "{id}: a reply differs from the stored result\n{}",
            fleet.history(id)
        );
        assert!(
            job.recovered.as_ref().is_none_or(|r| *r == stored),
            "{id}: the result read back differs from the stored one"
        );
        // The first publish seen is the stored one; the requester may have missed it only if it read the store.
        match &job.first_publish {
            Some(first) => assert_eq!(first, &stored, "{id}: the first result published is not the one stored"),
            None => assert!(
                job.recovered.is_some() || missed_offline(job),
                "{id}: no result published\n{}",
                fleet.history(id)
            ),
        }
    }
    let results_state = queue.results.clone().info().await.unwrap().state.clone();
    assert_eq!(results_state.messages, jobs as u64, "the results stream holds one result per job");
    assert_eq!(jobs_left_after(&queue, Duration::from_secs(10)).await, 0, "every job left the work queue");
    let dead_state = queue.dead.clone().info().await.unwrap().state.clone();
    assert_eq!(dead_state.messages, 0, "nothing was given up");
}
