//! Helpers of the chaos and load tests: a client whose consumer settings match workers started with another
//! `--max-deliver`, publishing that rides out a restarting server, and a process's resident memory.

use std::time::Duration;

use imago::job::JobMessage;
use imago::queue::{Queue, QueueConfig};

use super::nats::NatsServer;

/// A client of `server` whose topology matches test workers (`--ack-wait 2`) started with `--max-deliver
/// max_deliver` (the first to connect creates the shared consumer, so its settings must be the workers').
pub async fn client_with_max_deliver(server: &NatsServer, max_deliver: i64) -> Queue {
    let client = async_nats::connect(server.url()).await.unwrap();
    let config = QueueConfig { ack_wait: Duration::from_secs(2), max_deliver, ..QueueConfig::default() };
    Queue::setup(client, config).await.unwrap()
}

/// Publishes `job` with its id as `Nats-Msg-Id`, retrying until the server acknowledges it: a retry of a publish
/// that did land is dropped by the server's deduplication, so the job is queued exactly once.
pub async fn publish_until_acknowledged(queue: &Queue, job: &JobMessage) {
    let payload = bytes::Bytes::from(serde_json::to_vec(job).unwrap());
    let subject = queue.config.names.jobs(job.kind.as_str());
    for attempt in 1.. {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        let published = match queue.js.publish_with_headers(subject.clone(), headers, payload.clone()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => return,
            Err(e) if attempt < 100 => {
                eprintln!("publishing {} failed ({e}); retrying", job.id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publishing {} failed {attempt} times: {e}", job.id),
        }
    }
}

/// Messages left in the work queue once it had `timeout` to drain (a job's result is published just before its
/// acknowledgement, so the last ones may still be on their way).
pub async fn jobs_left_after(queue: &Queue, timeout: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = queue.jobs.clone().info().await.unwrap().state.messages;
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process's resident memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident so far (VmHWM), KiB.
    pub peak_kib: u64,
}

/// The memory of process `pid`, or `None` once it has exited.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some(Memory { rss_kib: field("VmRSS:")?, peak_kib: field("VmHWM:")? })
}

/// The value at quantile `q` (0..=1) of sorted values.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or_default()
}
