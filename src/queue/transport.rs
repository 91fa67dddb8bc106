//! The worker's and the client's use of the topology: results in and out, cancellations, inputs and outputs in
//! the object store, progress events, dead letters.

use base64::Engine as _;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::setup::Queue;
use super::QueueError;
use crate::engine::JobOutput;
use crate::job::{
    ErrorCode, ImageRef, JobError, JobKind, JobResult, JobSpec, OutputFormat, ProgressEvent, PROTOCOL_VERSION,
};
use crate::private::SecretBytes;

/// Header carrying the job id on results and dead letters (`Nats-Msg-Id` is the server's dedup key).
pub const JOB_ID_HEADER: &str = "Imago-Job-Id";
/// Header carrying the pseudonymous user on stored results.
pub const USER_HEADER: &str = "Imago-User";

/// A training sample: what the model was asked and what it drew, nothing that identifies who asked — no job id,
/// user, reply subject, worker, timing or input image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainingSample {
    pub v: u32,
    pub kind: JobKind,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    pub scheduler: String,
    pub seed: u64,
    pub format: OutputFormat,
    pub image: ImageRef,
}

impl Queue {
    /// A result already published for `id` (a redelivered job is answered from it, not recomputed).
    pub async fn existing_result(&self, id: &str) -> Option<Bytes> {
        let subject = self.config.names.results(id);
        self.results.get_last_raw_message_by_subject(&subject).await.ok().map(|m| m.payload)
    }

    /// Whether a cancellation for `id` was published (and is still remembered).
    pub async fn is_cancelled(&self, id: &str) -> bool {
        let subject = self.config.names.cancel(id);
        self.cancels.get_last_raw_message_by_subject(&subject).await.is_ok()
    }

    /// Publishes a result to the results stream (persisted, deduplicated per job) and to the reply subject. The
    /// pseudonymous user travels in a header so that a deletion or export request can find the user's results.
    /// Returns whether this publish stored the result: `false` when a result for the job was stored before (within
    /// the duplicate window), e.g. by another delivery of the same job; then nothing is sent to `reply`, so that
    /// a requester only ever receives the stored result.
    pub async fn publish_result(
        &self,
        result: &JobResult,
        reply: Option<&str>,
        user: Option<&str>,
    ) -> Result<bool, QueueError> {
        let stored = self.store_result(result, user).await?;
        if let Some(reply) = reply.filter(|_| stored) {
            let payload = serde_json::to_vec(result).map_err(|e| QueueError::Publish(e.to_string()))?;
            self.forward_result(payload.into(), reply).await?;
        }
        Ok(stored)
    }

    /// Stores a result in the results stream (deduplicated per job, the user in a header); returns `false` when
    /// a result for the job was stored before, within the duplicate window.
    pub(super) async fn store_result(&self, result: &JobResult, user: Option<&str>) -> Result<bool, QueueError> {
        let payload = Bytes::from(serde_json::to_vec(result).map_err(|e| QueueError::Publish(e.to_string()))?);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("result-{}", result.id).as_str());
        headers.insert(JOB_ID_HEADER, result.id.as_str());
        if let Some(user) = user {
            headers.insert(USER_HEADER, user);
        }
        let subject = self.config.names.results(&result.id);
        let stored = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?;
        Ok(!stored.duplicate)
    }

    /// Sends an already-published result to a requester's reply subject again.
    pub async fn forward_result(&self, payload: Bytes, reply: &str) -> Result<(), QueueError> {
        self.client.publish(reply.to_string(), payload).await.map_err(|e| QueueError::Publish(e.to_string()))?;
        self.client.flush().await.map_err(|e| QueueError::Publish(e.to_string()))
    }

    /// Publishes a progress event (core NATS: fire and forget, never persisted).
    pub async fn publish_progress(&self, event: &ProgressEvent) {
        if let Ok(payload) = serde_json::to_vec(event) {
            let _ = self.client.publish(self.config.names.progress(&event.id), payload.into()).await;
        }
    }

    /// Stores result images in the bucket under `results/<id>/<i>.<ext>` (`<i>.<ext>.sealed` for the ciphertext of
    /// a sealed job's images), tagged with the user for deletion and export requests.
    pub async fn store_images(
        &self,
        id: &str,
        user: Option<&str>,
        images: &[Vec<u8>],
        format: OutputFormat,
        sealed: bool,
    ) -> Result<Vec<ImageRef>, QueueError> {
        let ext = match format {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
        };
        let suffix = if sealed { ".sealed" } else { "" };
        let mut refs = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let key = format!("results/{id}/{i}.{ext}{suffix}");
            let mut metadata = std::collections::HashMap::from([("job".to_string(), id.to_string())]);
            if let Some(user) = user {
                metadata.insert("user".to_string(), user.to_string());
            }
            let meta = async_nats::jetstream::object_store::ObjectMetadata {
                name: key.clone(),
                metadata,
                ..Default::default()
            };
            self.images
                .put(meta, &mut image.as_slice())
                .await
                .map_err(|e| QueueError::Publish(format!("{key}: {e}")))?;
            refs.push(ImageRef::Object(key));
        }
        Ok(refs)
    }

    /// The bytes behind an image reference. A missing object is transient: its upload may still be on its way.
    /// An input image's file bytes, straight into a secret buffer.
    pub async fn fetch_image(&self, image: &ImageRef, max_bytes: usize) -> Result<SecretBytes, JobError> {
        match image {
            ImageRef::Inline(b64) => {
                if b64.len() / 4 * 3 > max_bytes {
                    return Err(JobError::new(
                        ErrorCode::ImageTooLarge,
                        format!("inline image over {max_bytes} bytes"),
                    ));
                }
                let mut bytes = SecretBytes::zeroed(base64::decoded_len_estimate(b64.len()));
                let len =
                    base64::engine::general_purpose::STANDARD.decode_slice(b64, bytes.expose_mut()).map_err(|e| {
                        JobError::new(ErrorCode::ImageUndecodable, format!("inline image is not base64: {e}"))
                    })?;
                bytes.truncate(len);
                Ok(bytes)
            }
            ImageRef::Object(key) => {
                let not_found = |e: &dyn std::fmt::Display| {
                    JobError::new(ErrorCode::ObjectNotFound, format!("object {key:?}: {e}"))
                };
                let mut object = self.images.get(key).await.map_err(|e| not_found(&e))?;
                if object.info().size > max_bytes {
                    return Err(JobError::new(
                        ErrorCode::ImageTooLarge,
                        format!("object {key:?} is over {max_bytes} bytes"),
                    ));
                }
                let mut bytes = Vec::with_capacity(object.info().size);
                object.read_to_end(&mut bytes).await.map_err(|e| not_found(&e))?;
                Ok(SecretBytes::from_vec(bytes))
            }
        }
    }

    /// Publishes one anonymized sample per image of an opted-in job on `<prefix>.training.samples`. Large images go
    /// to the bucket under a random key with no user tag. Failures are logged: the job itself has succeeded.
    pub async fn publish_training_samples(&self, spec: &JobSpec, output: &JobOutput) {
        for (image, seed) in output.images.iter().zip(&output.seeds) {
            let image_ref = if image.len() * 4 / 3 + 1024 <= self.config.inline_limit {
                ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(image))
            } else {
                let key = format!("training/{}", anonymous_key());
                if let Err(e) = self.images.put(key.as_str(), &mut image.as_slice()).await {
                    tracing::warn!(error = %e, "training sample image not stored");
                    continue;
                }
                ImageRef::Object(key)
            };
            let sample = TrainingSample {
                v: PROTOCOL_VERSION,
                kind: spec.kind,
                model: spec.model.clone(),
                prompt: spec.prompt.expose().to_string(),
                negative_prompt: spec.negative_prompt.expose().to_string(),
                width: output.width,
                height: output.height,
                steps: output.steps,
                guidance: output.guidance,
                scheduler: output.scheduler.clone(),
                seed: *seed,
                format: output.format,
                image: image_ref,
            };
            let Ok(payload) = serde_json::to_vec(&sample) else { continue };
            match self.js.publish(self.config.names.training(), payload.into()).await {
                Ok(ack) => {
                    if let Err(e) = ack.await {
                        tracing::warn!(error = %e, "training sample not acknowledged");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "training sample not published"),
            }
        }
    }

    /// Records a job that will not be retried on `<prefix>.dead.<kind>`, with the reason in headers.
    pub async fn dead_letter(
        &self,
        kind: &str,
        id: &str,
        payload: Bytes,
        code: ErrorCode,
        reason: &str,
        deliveries: i64,
    ) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(JOB_ID_HEADER, id);
        headers.insert("Imago-Error-Code", code.as_str());
        headers.insert("Imago-Reason", reason.replace(['\r', '\n'], " ").as_str());
        headers.insert("Imago-Deliveries", deliveries.to_string().as_str());
        let published = self.js.publish_with_headers(self.config.names.dead(kind), headers, payload).await;
        match published {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::error!(job = id, error = %e, "dead letter not acknowledged");
                }
            }
            Err(e) => tracing::error!(job = id, error = %e, "dead letter not published"),
        }
    }
}

/// A random key that cannot be linked back to a job (OS randomness, not derived from anything of the job).
fn anonymous_key() -> String {
    let mut bytes = [0u8; 16];
    if getrandom_fill(&mut bytes).is_err() {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom_fill(bytes: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)
}
