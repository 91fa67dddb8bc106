//! The job protocol: wire types (versioned JSON, with JSON Schemas) and validation into a typed [`JobSpec`].
//! The shared vocabulary of the queue and the engine.

mod validate;
mod wire;

pub use validate::{parse, salvage_id, valid_id, validate, EditSpec, JobError, JobLimits, JobSpec};
pub use wire::{
    json_schemas, ErrorBody, ErrorCode, ImageRef, JobKind, JobMessage, JobResult, JobStatus, OutputFormat,
    ProgressEvent, Timings, PROTOCOL_VERSION,
};
