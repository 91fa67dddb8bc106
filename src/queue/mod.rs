//! The NATS JetStream transport. Jobs arrive on a work-queue stream shared by every worker through one durable pull
//! consumer (more workers = more throughput); results go to a results stream and the requester's reply subject;
//! progress events and cancellations are subjects of their own; large images live in an object store bucket.
//! See the README's protocol section for the full picture.

mod admin;
mod client;
mod config;
mod connect;
mod private_jobs;
mod setup;
mod transport;
mod worker;

pub use admin::{serve_admin, StoredObject, UserDeletion, UserExport};
pub use config::{ConnectConfig, Names, QueueConfig};
pub use connect::connect;
pub use setup::Queue;
pub use transport::{TrainingSample, JOB_ID_HEADER, USER_HEADER};
pub use worker::{Shutdown, Worker, WorkerReport, WorkerSettings};

/// Transport failures (the job-level failures are [`crate::job::JobError`]).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("connecting to NATS: {0}")]
    Connect(String),
    #[error("setting up streams: {0}")]
    Setup(String),
    #[error("publishing: {0}")]
    Publish(String),
    #[error("no result within {0:?}")]
    Timeout(std::time::Duration),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The engine's device failed in a way that needs a fresh process (a context-killing CUDA fault); the worker
    /// handed its jobs back and stopped, for its supervisor to restart it.
    #[error("the device failed and the worker stopped (its jobs were handed back): {0}")]
    DeviceLost(String),
}
