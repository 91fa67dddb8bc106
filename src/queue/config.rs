//! Names and settings of the queue: subjects, streams, consumer, bucket, timings. Defaults live here, in one place.

use std::path::PathBuf;
use std::time::Duration;

/// Subject and stream names derived from one prefix (default `imago`), so several deployments can share a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    fn upper(&self) -> String {
        self.prefix.to_ascii_uppercase().replace(['.', '-'], "_")
    }

    /// `<prefix>.jobs.generate` / `<prefix>.jobs.edit`
    pub fn jobs(&self, kind: &str) -> String {
        format!("{}.jobs.{kind}", self.prefix)
    }
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper())
    }
    pub fn results(&self, id: &str) -> String {
        format!("{}.results.{id}", self.prefix)
    }
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.upper())
    }
    pub fn progress(&self, id: &str) -> String {
        format!("{}.progress.{id}", self.prefix)
    }
    pub fn cancel(&self, id: &str) -> String {
        format!("{}.cancel.{id}", self.prefix)
    }
    pub fn cancel_stream(&self) -> String {
        format!("{}_CANCEL", self.upper())
    }
    pub fn dead(&self, kind: &str) -> String {
        format!("{}.dead.{kind}", self.prefix)
    }
    pub fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.upper())
    }
    /// Anonymized samples of opted-in jobs.
    pub fn training(&self) -> String {
        format!("{}.training.samples", self.prefix)
    }
    pub fn training_stream(&self) -> String {
        format!("{}_TRAINING", self.upper())
    }
    /// Admin requests (`delete_user`, `export_user`): `<prefix>.admin.<operation>`.
    pub fn admin(&self) -> String {
        format!("{}.admin", self.prefix)
    }
    /// The durable pull consumer every worker shares.
    pub fn consumer(&self) -> String {
        format!("{}-workers", self.prefix.replace('.', "-"))
    }
    /// Object store bucket for images too large to travel inline.
    pub fn bucket(&self) -> String {
        format!("{}-images", self.prefix.replace('.', "-"))
    }
    /// JetStream's advisory when a job exhausted its deliveries.
    pub fn max_deliveries_advisory(&self) -> String {
        format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}", self.jobs_stream(), self.consumer())
    }
}

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Default)]
pub struct ConnectConfig {
    pub url: String,
    pub credentials_file: Option<PathBuf>,
    pub nkey_seed: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub require_tls: bool,
    pub root_certificates: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Connection name shown by the server's monitoring.
    pub name: Option<String>,
}

/// The worker's queue settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub names: Names,
    /// Jobs processed at once (one per GPU is typical; the engine itself uses every CPU core).
    pub slots: usize,
    /// How long the server waits for an ack before redelivering; running jobs send progress acks well inside it.
    pub ack_wait: Duration,
    /// Deliveries before a job is dead-lettered.
    pub max_deliver: i64,
    /// Results (and images) larger than this go through the object store.
    pub inline_limit: usize,
    /// How long results stay in the results stream and the bucket, for redelivery answers and fetches.
    pub results_max_age: Duration,
    /// Window in which a resubmitted job id is dropped by the server.
    pub duplicate_window: Duration,
    /// On SIGTERM, how long in-flight jobs may take to finish before they are handed back.
    pub drain_timeout: Duration,
    /// First retry delay of a transient failure; doubles per delivery.
    pub retry_backoff: Duration,
    /// Most images one pipeline call generates for compatible queued jobs together; 1 runs every job alone.
    pub max_batch: usize,
    /// How long a slot waits for companions of a job it could batch (capped at a third of `ack_wait`).
    pub batch_wait: Duration,
    pub worker_name: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            names: Names::new("imago"),
            slots: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            inline_limit: 512 * 1024,
            results_max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(1),
            max_batch: 1,
            batch_wait: Duration::from_millis(50),
            worker_name: format!("imago-{}", std::process::id()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("acme.img");
        assert_eq!(n.jobs("edit"), "acme.img.jobs.edit");
        assert_eq!(n.jobs_stream(), "ACME_IMG_JOBS");
        assert_eq!(n.results("j1"), "acme.img.results.j1");
        assert_eq!(
            n.max_deliveries_advisory(),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ACME_IMG_JOBS.acme-img-workers"
        );
    }
}
