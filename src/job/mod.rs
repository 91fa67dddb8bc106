//! The job protocol: wire types (versioned JSON, with JSON Schemas) and validation into a typed [`JobSpec`].
//! The shared vocabulary of the queue and the engine.

mod sealed;
mod validate;
mod wire;

pub use sealed::{accept_opened_content, max_sealed_bytes, OpenedInputs, SealedSpec};
pub use validate::{parse, salvage_id, valid_id, validate, EditSpec, JobError, JobLimits, JobSpec};
pub use wire::{
    json_schemas, ErrorBody, ErrorCode, ImageRef, JobKind, JobMessage, JobResult, JobStatus, OutputFormat,
    ProgressEvent, SealedContent, Timings, PROTOCOL_VERSION,
};
