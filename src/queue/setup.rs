//! Creating (or updating) the streams, the shared consumer and the bucket a worker needs. Idempotent: every worker
//! runs it at start, the first one creates, the others find everything in place.

use async_nats::jetstream::{self, consumer, object_store, stream};

use super::config::QueueConfig;
use super::QueueError;

/// Handles to everything the worker and clients use.
pub struct Queue {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    pub results: stream::Stream,
    pub cancels: stream::Stream,
    pub dead: stream::Stream,
    pub training: stream::Stream,
    pub consumer: consumer::PullConsumer,
    pub images: object_store::ObjectStore,
    pub config: QueueConfig,
}

fn setup_error(what: &str) -> impl Fn(&dyn std::fmt::Display) -> QueueError + '_ {
    move |e| QueueError::Setup(format!("{what}: {e}"))
}

/// Creates the stream or updates its config, then returns a handle to it.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    what: &str,
) -> Result<stream::Stream, QueueError> {
    let name = config.name.clone();
    js.create_or_update_stream(config).await.map_err(|e| setup_error(what)(&e))?;
    js.get_stream(name).await.map_err(|e| setup_error(what)(&e))
}

impl Queue {
    /// Ensures the topology exists and returns handles to it.
    pub async fn setup(client: async_nats::Client, config: QueueConfig) -> Result<Self, QueueError> {
        let js = jetstream::new(client.clone());
        let n = &config.names;
        // Jobs: a work queue on disk; each message is removed when acked. Dedup on Nats-Msg-Id = job id.
        let jobs = ensure_stream(
            &js,
            stream::Config {
                name: n.jobs_stream(),
                subjects: vec![n.jobs("*")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: config.duplicate_window,
                ..Default::default()
            },
            "jobs stream",
        )
        .await?;
        // Results: the last one per job id, kept for redeliveries and late readers.
        let results = ensure_stream(
            &js,
            stream::Config {
                name: n.results_stream(),
                subjects: vec![n.results("*")],
                max_messages_per_subject: 1,
                max_age: config.results_max_age,
                duplicate_window: config.duplicate_window,
                storage: stream::StorageType::File,
                ..Default::default()
            },
            "results stream",
        )
        .await?;
        // Cancellations: remembered for an hour, so a job cancelled while queued is skipped by whoever pulls it.
        let cancels = ensure_stream(
            &js,
            stream::Config {
                name: n.cancel_stream(),
                subjects: vec![n.cancel("*")],
                max_messages_per_subject: 1,
                max_age: std::time::Duration::from_secs(3600),
                storage: stream::StorageType::File,
                ..Default::default()
            },
            "cancel stream",
        )
        .await?;
        let dead = ensure_stream(
            &js,
            stream::Config {
                name: n.dead_stream(),
                subjects: vec![n.dead("*")],
                max_age: std::time::Duration::from_secs(7 * 24 * 3600),
                storage: stream::StorageType::File,
                ..Default::default()
            },
            "dead-letter stream",
        )
        .await?;
        let training = ensure_stream(
            &js,
            stream::Config {
                name: n.training_stream(),
                subjects: vec![n.training()],
                storage: stream::StorageType::File,
                ..Default::default()
            },
            "training stream",
        )
        .await?;
        let consumer: consumer::PullConsumer = jobs
            .get_or_create_consumer(
                &n.consumer(),
                consumer::pull::Config {
                    durable_name: Some(n.consumer()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: config.max_deliver,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup_error("workers consumer")(&e))?;
        let images = match js.get_object_store(n.bucket()).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: n.bucket(),
                    max_age: config.results_max_age,
                    ..Default::default()
                })
                .await
                .map_err(|e| setup_error("images bucket")(&e))?,
        };
        Ok(Self { client, js, jobs, results, cancels, dead, training, consumer, images, config })
    }
}
