//! Parsing and validating a job message into a typed [`JobSpec`]. Everything that can be checked without the model
//! is checked here, so a bad job is refused before any work; model-specific checks follow in the engine.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::sealed::{check_private_content, SealedSpec};
use super::wire::{ErrorCode, ImageRef, JobKind, JobMessage, OutputFormat, PROTOCOL_VERSION};
use crate::diffusion::schedulers::SchedulerKind;
use crate::private::SecretString;

/// Limits a worker applies to every job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobLimits {
    pub max_prompt_chars: usize,
    pub max_side: u32,
    pub max_steps: u32,
    pub max_batch: u32,
    pub max_guidance: f64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self { max_prompt_chars: 2000, max_side: 2048, max_steps: 150, max_batch: 8, max_guidance: 30.0 }
    }
}

/// Why a job was refused: a code for machines and a message for people (never containing the prompt).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// An edit's inputs, still encoded (resolved from the object store by the queue when needed).
#[derive(Debug, Clone, PartialEq)]
pub struct EditSpec {
    /// `None` for a sealed job: its image is inside the sealed content.
    pub image: Option<ImageRef>,
    pub mask: Option<ImageRef>,
    pub strength: Option<f64>,
    pub mask_blur: f32,
}

/// A validated job.
#[derive(Clone)]
pub struct JobSpec {
    pub id: String,
    pub kind: JobKind,
    pub model: String,
    /// The prompts live in secret buffers from validation on, for every job: one rule, no private branch.
    pub prompt: SecretString,
    pub negative_prompt: SecretString,
    pub size: Option<(u32, u32)>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub scheduler: Option<SchedulerKind>,
    pub batch: u32,
    pub edit: Option<EditSpec>,
    pub private: bool,
    pub training_opt_in: bool,
    pub user: Option<String>,
    pub reply: Option<String>,
    pub deadline: Option<SystemTime>,
    pub output_format: OutputFormat,
    /// A sealed job: its prompts, image and mask are opened by the worker before the run.
    pub sealed: Option<SealedSpec>,
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Whether `id` is a usable job id (it becomes part of NATS subjects and object keys).
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes().all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
}

fn valid_model_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && !s.starts_with(['.', '/'])
        && !s.contains("..")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// Parses JSON bytes into a message. The error message is serde's (it may quote a wrong value, so it is returned
/// to the requester but never logged).
pub fn parse(bytes: &[u8]) -> Result<JobMessage, JobError> {
    serde_json::from_slice(bytes)
        .map_err(|e| JobError::new(ErrorCode::InvalidJson, format!("job is not valid v1 JSON: {e}")))
}

/// The id of a message that may not parse, for addressing its error result.
pub fn salvage_id(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("id")?.as_str().filter(|id| valid_id(id)).map(str::to_string)
}

/// Validates a parsed message.
pub fn validate(msg: JobMessage, limits: &JobLimits) -> Result<JobSpec, JobError> {
    use ErrorCode::*;
    let fail = |code, message: String| Err(JobError::new(code, message));
    if msg.v != PROTOCOL_VERSION {
        return fail(
            UnsupportedVersion,
            format!("protocol version {} is not supported (this worker speaks {PROTOCOL_VERSION})", msg.v),
        );
    }
    if !valid_id(&msg.id) {
        return fail(InvalidId, "id must be 1-128 characters of A-Z, a-z, 0-9, '-' and '_'".into());
    }
    if !valid_model_name(&msg.model) {
        return fail(UnknownModel, format!("{:?} is not a valid model name", msg.model));
    }
    check_prompt("prompt", &msg.prompt, limits)?;
    check_prompt("negative_prompt", &msg.negative_prompt, limits)?;
    let sealed = check_private_content(&msg)?;
    let size = match (msg.width, msg.height) {
        (None, None) => None,
        (Some(w), Some(h)) => {
            for (name, side) in [("width", w), ("height", h)] {
                if side == 0 || side % 8 != 0 || side > limits.max_side {
                    return fail(
                        InvalidSize,
                        format!("{name} {side} must be a multiple of 8 in 8..={}", limits.max_side),
                    );
                }
            }
            Some((w, h))
        }
        _ => return fail(InvalidSize, "give both width and height, or neither".into()),
    };
    if let Some(steps) = msg.steps {
        if steps == 0 || steps > limits.max_steps {
            return fail(InvalidSteps, format!("steps {steps} is outside 1..={}", limits.max_steps));
        }
    }
    if msg.batch == 0 || msg.batch > limits.max_batch {
        return fail(InvalidBatch, format!("batch {} is outside 1..={}", msg.batch, limits.max_batch));
    }
    if let Some(g) = msg.guidance {
        if !g.is_finite() || !(0.0..=limits.max_guidance).contains(&g) {
            return fail(InvalidParameter, format!("guidance {g} is outside 0..={}", limits.max_guidance));
        }
    }
    let scheduler = match &msg.scheduler {
        None => None,
        Some(name) => Some(name.parse::<SchedulerKind>().map_err(|e| JobError::new(UnknownScheduler, e.to_string()))?),
    };
    if let Some(reply) = &msg.reply {
        if !valid_subject(reply) {
            return fail(InvalidParameter, "reply is not a valid NATS subject".into());
        }
    }
    if msg.user.as_ref().is_some_and(|u| u.is_empty() || u.len() > 128) {
        return fail(InvalidParameter, "user must be 1-128 bytes".into());
    }
    let edit = match msg.kind {
        JobKind::Generate => {
            if msg.image.is_some() || msg.mask.is_some() || msg.strength.is_some() {
                return fail(
                    InvalidParameter,
                    "generate jobs take no image, mask or strength (use kind \"edit\")".into(),
                );
            }
            None
        }
        JobKind::Edit => {
            if msg.image.is_none() && sealed.is_none() {
                return fail(ImageRequired, "edit jobs need an image".into());
            }
            if let Some(s) = msg.strength {
                if !(0.0..=1.0).contains(&s) {
                    return fail(InvalidParameter, format!("strength {s} is outside 0..=1"));
                }
            }
            if !(0.0..=64.0).contains(&msg.mask_blur) {
                return fail(InvalidParameter, format!("mask_blur {} is outside 0..=64", msg.mask_blur));
            }
            for r in msg.image.iter().chain(msg.mask.as_ref()) {
                check_object_key(r)?;
            }
            Some(EditSpec { image: msg.image, mask: msg.mask, strength: msg.strength, mask_blur: msg.mask_blur })
        }
    };
    Ok(JobSpec {
        id: msg.id,
        kind: msg.kind,
        model: msg.model,
        prompt: SecretString::from_string(msg.prompt),
        negative_prompt: SecretString::from_string(msg.negative_prompt),
        size,
        steps: msg.steps,
        guidance: msg.guidance,
        seed: msg.seed,
        scheduler,
        batch: msg.batch,
        edit,
        private: msg.private,
        training_opt_in: msg.training_opt_in,
        user: msg.user,
        reply: msg.reply,
        deadline: msg.deadline_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        output_format: msg.output_format,
        sealed,
    })
}

/// A prompt within the length limit.
pub(super) fn check_prompt(name: &str, text: &str, limits: &JobLimits) -> Result<(), JobError> {
    let chars = text.chars().count();
    if chars > limits.max_prompt_chars {
        return Err(JobError::new(
            ErrorCode::InvalidPrompt,
            format!("{name} has {chars} characters, over the limit of {}", limits.max_prompt_chars),
        ));
    }
    Ok(())
}

/// An object-store key of a usable length.
pub(super) fn check_object_key(r: &ImageRef) -> Result<(), JobError> {
    match r {
        ImageRef::Object(key) if key.is_empty() || key.len() > 512 => {
            Err(JobError::new(ErrorCode::InvalidParameter, "object keys must be 1-512 bytes"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: serde_json::Value) -> Result<JobSpec, JobError> {
        validate(parse(value.to_string().as_bytes())?, &JobLimits::default())
    }

    fn code(value: serde_json::Value) -> ErrorCode {
        check(value).err().map(|e| e.code).expect("should be refused")
    }

    fn job() -> serde_json::Value {
        json!({"v": 1, "id": "job-1", "kind": "generate", "prompt": "a red circle"})
    }

    fn with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut j = job();
        j[key] = value;
        j
    }

    #[test]
    fn a_minimal_job_takes_defaults() {
        let spec = check(job()).unwrap();
        assert_eq!(spec.model, "default");
        assert_eq!(spec.batch, 1);
        assert_eq!(spec.size, None);
        assert!(!spec.private && !spec.training_opt_in);
    }

    #[test]
    fn every_class_of_bad_job_gets_its_code() {
        use ErrorCode::*;
        assert_eq!(parse(b"not json").unwrap_err().code, InvalidJson);
        assert_eq!(parse(br#"{"v": 1, "id": "x"}"#).unwrap_err().code, InvalidJson);
        assert_eq!(code(with("v", json!(2))), UnsupportedVersion);
        assert_eq!(code(with("id", json!("has space"))), InvalidId);
        assert_eq!(code(with("id", json!("x".repeat(129)))), InvalidId);
        assert_eq!(code(with("model", json!("../etc"))), UnknownModel);
        assert_eq!(code(with("prompt", json!("x".repeat(2001)))), InvalidPrompt);
        assert_eq!(code(with("width", json!(512))), InvalidSize);
        let mut j = with("width", json!(500));
        j["height"] = json!(512);
        assert_eq!(code(j), InvalidSize);
        assert_eq!(code(with("steps", json!(0))), InvalidSteps);
        assert_eq!(code(with("steps", json!(151))), InvalidSteps);
        assert_eq!(code(with("batch", json!(9))), InvalidBatch);
        assert_eq!(code(with("guidance", json!(-1.0))), InvalidParameter);
        assert_eq!(code(with("scheduler", json!("plms"))), UnknownScheduler);
        assert_eq!(code(with("reply", json!("a.*"))), InvalidParameter);
        assert_eq!(code(with("image", json!({"inline": "AAAA"}))), InvalidParameter);
        assert_eq!(code(with("kind", json!("edit"))), ImageRequired);
        let mut e = with("kind", json!("edit"));
        e["image"] = json!({"object": "in/1"});
        e["strength"] = json!(1.5);
        assert_eq!(code(e), InvalidParameter);
    }

    #[test]
    fn edits_carry_their_inputs_and_deadlines_become_times() {
        let mut e = with("kind", json!("edit"));
        e["image"] = json!({"inline": "AAAA"});
        e["mask"] = json!({"object": "masks/1"});
        e["deadline_ms"] = json!(1_000);
        let spec = check(e).unwrap();
        let edit = spec.edit.unwrap();
        assert_eq!(edit.mask, Some(ImageRef::Object("masks/1".into())));
        assert_eq!(spec.deadline, Some(UNIX_EPOCH + Duration::from_secs(1)));
    }

    #[test]
    fn ids_survive_unparseable_jobs_for_the_error_result() {
        assert_eq!(salvage_id(br#"{"id": "abc", "v": "wrong"}"#), Some("abc".into()));
        assert_eq!(salvage_id(br#"{"id": "a b"}"#), None);
        assert_eq!(salvage_id(b"garbage"), None);
    }
}
