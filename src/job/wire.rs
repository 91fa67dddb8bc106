//! The v1 wire format: what a dispatcher publishes and what a worker answers, as JSON.
//!
//! Types here hold user content (prompts, images) and therefore have `Debug` impls that print only the job's
//! identity and parameters, never the content.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The protocol version this worker speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Text to image.
    Generate,
    /// Image to image, or inpainting when a mask is given.
    Edit,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Edit => "edit",
        }
    }
}

/// Bytes carried in a message (an image file, or the ciphertext of a sealed job or result image): inline (base64)
/// or a key in the object store.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageRef {
    /// Base64 (standard alphabet, padded) of a PNG, JPEG or WebP file (or of ciphertext, for sealed content).
    Inline(String),
    /// Key in the `imago-images` object store bucket.
    Object(String),
}

impl std::fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Inline(b64) => write!(f, "Inline({} base64 chars)", b64.len()),
            ImageRef::Object(key) => write!(f, "Object({key:?})"),
        }
    }
}

/// The content of a sealed job (Private Mode): prompt, negative prompt, image and mask, sealed by the client with
/// HPKE (RFC 9180: X25519, HKDF-SHA256, ChaCha20-Poly1305) to the worker fleet's public key, so the queue and the
/// object store only ever hold ciphertext. The job's clear `prompt`, `negative_prompt`, `image` and `mask` stay
/// empty. The result's images are sealed to `reply_key`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SealedContent {
    /// The fleet key sealed to: 16 lowercase hex digits, the first 8 bytes of SHA-256 of its public key.
    pub key_id: String,
    /// The HPKE encapsulated key: base64 of 32 bytes.
    pub encapsulated_key: String,
    /// The HPKE ciphertext of the content frame (tag included): inline base64, or a key in the object store for
    /// large inputs.
    pub ciphertext: ImageRef,
    /// The client's one-time X25519 public key (base64 of 32 bytes): each result image is sealed to it.
    pub reply_key: String,
}

impl std::fmt::Debug for SealedContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedContent").field("key_id", &self.key_id).field("ciphertext", &self.ciphertext).finish()
    }
}

/// Encoding of result images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
}

fn default_model() -> String {
    "default".into()
}
fn one() -> u32 {
    1
}

/// A job as published on `<prefix>.jobs.<kind>`. Absent parameters take the model's defaults.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobMessage {
    /// Protocol version; must be 1.
    pub v: u32,
    /// Unique job id, 1–128 characters of `[A-Za-z0-9_-]`; also the `Nats-Msg-Id`, so a resubmit is deduplicated.
    pub id: String,
    pub kind: JobKind,
    /// A model the worker knows: `default`, a folder name under the worker's models directory, or a hub repo id
    /// present in its cache.
    #[serde(default = "default_model")]
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    /// Image i of the batch uses seed + i. Chosen by the worker (and returned) when absent.
    pub seed: Option<u64>,
    /// ddim, euler, euler-a, dpm++2m or dpm++2m-karras.
    pub scheduler: Option<String>,
    #[serde(default = "one")]
    pub batch: u32,
    /// Edit only: 0 keeps the input, 1 replaces it (default 0.6, or 1.0 with a mask).
    pub strength: Option<f64>,
    /// Edit only: Gaussian blur of the mask edge, in pixels.
    #[serde(default)]
    pub mask_blur: f32,
    /// Edit only: the input picture.
    pub image: Option<ImageRef>,
    /// Edit only: inpainting mask of the image's size, white = repaint.
    pub mask: Option<ImageRef>,
    /// Private Mode (see the README): the job's content lives only in locked, wiped memory on the worker, and its
    /// output is never stored in plaintext.
    #[serde(default)]
    pub private: bool,
    /// Whether the user allowed this job's content to be used for training (anonymized). Default false.
    #[serde(default)]
    pub training_opt_in: bool,
    /// Pseudonymous user id; attached to stored outputs so they can be deleted or exported on request.
    pub user: Option<String>,
    /// Subject the result is also sent to (core NATS), e.g. the requester's inbox.
    pub reply: Option<String>,
    /// Unix time in milliseconds after which the job is no longer wanted.
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub output_format: OutputFormat,
    /// A sealed job: its content travels encrypted here (needs `private: true`, and the clear content fields left
    /// empty). See the README's Private Mode section.
    pub sealed: Option<SealedContent>,
}

impl JobMessage {
    /// A text-to-image job with every optional field absent (the model's defaults), for struct-update syntax:
    /// `JobMessage { seed: Some(7), ..JobMessage::generate("job-1", "a red circle") }`.
    pub fn generate(id: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id: id.into(),
            kind: JobKind::Generate,
            model: default_model(),
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            seed: None,
            scheduler: None,
            batch: 1,
            strength: None,
            mask_blur: 0.0,
            image: None,
            mask: None,
            private: false,
            training_opt_in: false,
            user: None,
            reply: None,
            deadline_ms: None,
            output_format: OutputFormat::Png,
            sealed: None,
        }
    }
}

impl std::fmt::Debug for JobMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobMessage")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("private", &self.private)
            .field("sealed", &self.sealed.is_some())
            .finish_non_exhaustive()
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Ok,
    Error,
    Cancelled,
}

/// Why a job failed; stable strings dispatchers can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    UnsupportedVersion,
    InvalidId,
    InvalidParameter,
    InvalidPrompt,
    InvalidSize,
    InvalidSteps,
    InvalidBatch,
    UnknownModel,
    UnknownScheduler,
    ImageRequired,
    ImageTooLarge,
    ImageUndecodable,
    ImageUnsupportedFormat,
    MaskSizeMismatch,
    ObjectNotFound,
    // Sealed jobs: the fleet key named is not on this worker's ring; the content does not open (tampered with,
    // truncated, sealed to another key or for another job id) or is malformed. (Plain comments: doc comments on
    // variants would turn the schema's flat `enum` of codes into a `oneOf`.)
    SealUnknownKey,
    SealInvalid,
    DeadlineExceeded,
    Cancelled,
    OutOfMemory,
    MaxDeliveriesExceeded,
    Internal,
}

impl ErrorCode {
    /// Transient failures are retried (with backoff) up to the consumer's max deliveries; the rest end the job.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::ObjectNotFound | ErrorCode::OutOfMemory)
    }

    /// The wire spelling (`invalid_size`, …), e.g. for log fields and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::InvalidPrompt => "invalid_prompt",
            ErrorCode::InvalidSize => "invalid_size",
            ErrorCode::InvalidSteps => "invalid_steps",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::UnknownScheduler => "unknown_scheduler",
            ErrorCode::ImageRequired => "image_required",
            ErrorCode::ImageTooLarge => "image_too_large",
            ErrorCode::ImageUndecodable => "image_undecodable",
            ErrorCode::ImageUnsupportedFormat => "image_unsupported_format",
            ErrorCode::MaskSizeMismatch => "mask_size_mismatch",
            ErrorCode::ObjectNotFound => "object_not_found",
            ErrorCode::SealUnknownKey => "seal_unknown_key",
            ErrorCode::SealInvalid => "seal_invalid",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::OutOfMemory => "out_of_memory",
            ErrorCode::MaxDeliveriesExceeded => "max_deliveries_exceeded",
            ErrorCode::Internal => "internal",
        }
    }

    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::InvalidJson,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidId,
        ErrorCode::InvalidParameter,
        ErrorCode::InvalidPrompt,
        ErrorCode::InvalidSize,
        ErrorCode::InvalidSteps,
        ErrorCode::InvalidBatch,
        ErrorCode::UnknownModel,
        ErrorCode::UnknownScheduler,
        ErrorCode::ImageRequired,
        ErrorCode::ImageTooLarge,
        ErrorCode::ImageUndecodable,
        ErrorCode::ImageUnsupportedFormat,
        ErrorCode::MaskSizeMismatch,
        ErrorCode::ObjectNotFound,
        ErrorCode::SealUnknownKey,
        ErrorCode::SealInvalid,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::OutOfMemory,
        ErrorCode::MaxDeliveriesExceeded,
        ErrorCode::Internal,
    ];
}

/// An error in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// Human-readable; never contains the prompt or image bytes.
    pub message: String,
}

/// Wall time per stage, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    /// From publication to the start of work (when the job carried its submit time).
    pub queue_ms: Option<u64>,
    pub text_encode_ms: u64,
    pub denoise_ms: u64,
    pub vae_decode_ms: u64,
    pub total_ms: u64,
}

/// A result as published on `<prefix>.results.<id>` and sent to the job's `reply` subject.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobResult {
    pub v: u32,
    pub id: String,
    pub status: JobStatus,
    /// One per batch image, in order; inline base64 or object-store keys for large outputs.
    #[serde(default)]
    pub images: Vec<ImageRef>,
    /// The seed of each image.
    #[serde(default)]
    pub seeds: Vec<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub format: Option<OutputFormat>,
    pub timings: Option<Timings>,
    pub error: Option<ErrorBody>,
    /// Name of the worker that produced the result.
    pub worker: Option<String>,
    /// The images are sealed to the job's `reply_key` (a sealed job): each is base64 (inline) or an object holding
    /// `encapsulated key (32 bytes) ‖ ciphertext`, opened with the one-time secret key and the AAD `<id>/<index>`.
    #[serde(default)]
    pub sealed: bool,
}

impl std::fmt::Debug for JobResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobResult")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("images", &self.images.len())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl JobResult {
    /// A result carrying only an error (or cancellation).
    pub fn failed(id: &str, status: JobStatus, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id: id.to_string(),
            status,
            images: Vec::new(),
            seeds: Vec::new(),
            width: None,
            height: None,
            format: None,
            timings: None,
            error: Some(ErrorBody { code, message: message.into() }),
            worker: None,
            sealed: false,
        }
    }
}

/// A progress event on `<prefix>.progress.<id>` (core NATS, not persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProgressEvent {
    pub id: String,
    /// `started`, `step` or `done`.
    pub state: String,
    pub step: Option<u32>,
    pub total: Option<u32>,
}

/// The JSON Schemas of the job and result messages, for dispatchers in any language.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    let schema = |s: schemars::Schema| s.to_value();
    vec![
        ("job.v1.schema.json", schema(schemars::schema_for!(JobMessage))),
        ("result.v1.schema.json", schema(schemars::schema_for!(JobResult))),
        ("progress.v1.schema.json", schema(schemars::schema_for!(ProgressEvent))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_strings_are_the_wire_spelling() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::Value::String(code.as_str().into()));
        }
    }

    #[test]
    fn debug_never_shows_prompts_or_image_bytes() {
        let job: JobMessage = serde_json::from_value(serde_json::json!({
            "v": 1, "id": "j1", "kind": "edit", "prompt": "secret words", "image": {"inline": "c2VjcmV0IGJ5dGVz"}
        }))
        .unwrap();
        let shown = format!("{job:?} {:?}", job.image);
        assert!(!shown.contains("secret") && !shown.contains("c2VjcmV0"), "{shown}");
        assert_eq!(job.model, "default");
        assert_eq!(job.batch, 1);
    }

    #[test]
    fn image_refs_are_tagged_objects_on_the_wire() {
        let inline: ImageRef = serde_json::from_str(r#"{"inline": "AAAA"}"#).unwrap();
        let object: ImageRef = serde_json::from_str(r#"{"object": "inputs/j1/image"}"#).unwrap();
        assert_eq!(inline, ImageRef::Inline("AAAA".into()));
        assert_eq!(object, ImageRef::Object("inputs/j1/image".into()));
    }
}
