//! Observability without user content: Prometheus metrics (aggregate counts only) and health endpoints.

mod http;
mod metrics;

pub use http::serve;
pub use metrics::{resident_memory_bytes, JobRecord, Metrics};
