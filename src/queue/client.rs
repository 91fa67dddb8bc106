//! The requester's side: submit a job, follow its progress, receive its result, fetch its images, cancel it; seal
//! a private job's content and open its sealed result. Used by `imago submit`, the examples and the tests.

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use super::setup::Queue;
use super::QueueError;
use crate::job::{ImageRef, JobMessage, JobResult, ProgressEvent};
use crate::private::seal::{self, JobContent, PublicKey, SecretKey};
use crate::private::SecretBytes;

/// How often a waiting client looks for a stored result it may have missed.
const STORED_RESULT_RECHECK: Duration = Duration::from_secs(5);

impl Queue {
    /// Publishes `job` (its id as `Nats-Msg-Id`, so a resubmit is deduplicated) and waits for its result,
    /// calling `on_progress` for each progress event. A job answered before (a duplicate submit) returns the
    /// stored result. An unsealed private job's result is awaited on its `reply` subject, the only place its images
    /// are sent (the results stream holds a record without them).
    pub async fn submit(
        &self,
        job: &JobMessage,
        timeout: Duration,
        mut on_progress: impl FnMut(&ProgressEvent),
    ) -> Result<JobResult, QueueError> {
        let names = &self.config.names;
        let answers = match (&job.reply, job.private && job.sealed.is_none()) {
            (Some(reply), true) => reply.clone(),
            (None, true) => return Err(QueueError::Protocol("an unsealed private job needs `reply`".into())),
            (_, false) => names.results(&job.id),
        };
        // Subscribe before publishing so no event can be missed.
        let mut results = self.client.subscribe(answers).await.map_err(|e| QueueError::Publish(e.to_string()))?;
        let mut progress =
            self.client.subscribe(names.progress(&job.id)).await.map_err(|e| QueueError::Publish(e.to_string()))?;
        let payload = serde_json::to_vec(job).map_err(|e| QueueError::Publish(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        let ack = self
            .js
            .publish_with_headers(names.jobs(job.kind.as_str()), headers, payload.into())
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?;
        if ack.duplicate {
            if let Some(existing) = self.existing_result(&job.id).await {
                return parse_result(&existing);
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        // A result published while this client was reconnecting never reaches the subscription, but it is stored
        // (except an unsealed private job's images, which are only ever sent): look it up now and then.
        let stored_answer = !(job.private && job.sealed.is_none());
        let mut recheck = tokio::time::interval(STORED_RESULT_RECHECK);
        recheck.tick().await;
        loop {
            tokio::select! {
                Some(message) = results.next() => return parse_result(&message.payload),
                _ = recheck.tick(), if stored_answer => {
                    if let Some(stored) = self.existing_result(&job.id).await {
                        return parse_result(&stored);
                    }
                }
                Some(message) = progress.next() => {
                    if let Ok(event) = serde_json::from_slice::<ProgressEvent>(&message.payload) {
                        on_progress(&event);
                    }
                }
                _ = &mut deadline => return Err(QueueError::Timeout(timeout)),
            }
        }
    }

    /// Asks the fleet to cancel a job, queued or running.
    pub async fn cancel(&self, id: &str) -> Result<(), QueueError> {
        self.js
            .publish(self.config.names.cancel(id), "cancel".into())
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?;
        Ok(())
    }

    /// The bytes of a result image, inline or from the object store.
    pub async fn image_bytes(&self, image: &ImageRef) -> Result<Vec<u8>, QueueError> {
        match image {
            ImageRef::Inline(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| QueueError::Protocol(format!("result image is not base64: {e}"))),
            ImageRef::Object(key) => {
                let mut object =
                    self.images.get(key).await.map_err(|e| QueueError::Protocol(format!("object {key}: {e}")))?;
                let mut bytes = Vec::new();
                object.read_to_end(&mut bytes).await.map_err(|e| QueueError::Protocol(format!("object {key}: {e}")))?;
                Ok(bytes)
            }
        }
    }

    /// Seals `content` into `job` for the fleet key (see [`JobMessage::attach_sealed`]); a ciphertext too large to
    /// travel inline goes to the object store under `inputs/<job id>/sealed` (still ciphertext). Returns the
    /// one-time secret key that opens the result ([`Queue::open_result`]).
    pub async fn seal_job(
        &self,
        job: &mut JobMessage,
        content: &JobContent,
        fleet_key: &PublicKey,
    ) -> Result<SecretKey, QueueError> {
        let sealing_error = |e: seal::SealError| QueueError::Protocol(format!("sealing the job: {e}"));
        let reply_key = SecretKey::generate();
        let sealed = seal::seal_job(fleet_key, &job.id, content).map_err(sealing_error)?;
        let ciphertext =
            if base64::encoded_len(sealed.ciphertext.len(), true).unwrap_or(usize::MAX) <= self.config.inline_limit {
                ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(&sealed.ciphertext))
            } else {
                self.upload_input(&job.id, "sealed", &sealed.ciphertext, job.user.as_deref()).await?
            };
        job.attach_sealed(fleet_key, &sealed, ciphertext, reply_key.public_key());
        Ok(reply_key)
    }

    /// The images of a sealed job's result, opened with the job's one-time secret key into secret buffers.
    pub async fn open_result(&self, result: &JobResult, reply_key: &SecretKey) -> Result<Vec<SecretBytes>, QueueError> {
        if !result.sealed && !result.images.is_empty() {
            return Err(QueueError::Protocol(format!("the result of {} is not sealed", result.id)));
        }
        let mut images = Vec::with_capacity(result.images.len());
        for (index, image) in result.images.iter().enumerate() {
            let sealed = self.image_bytes(image).await?;
            let opened = reply_key
                .open_result(&result.id, index, &sealed)
                .map_err(|e| QueueError::Protocol(format!("result image {index} of {}: {e}", result.id)))?;
            images.push(opened);
        }
        Ok(images)
    }

    /// Uploads an input image to the object store under `inputs/<job id>/<name>`, tagged with the user (so a
    /// deletion request removes inputs too).
    pub async fn upload_input(
        &self,
        job_id: &str,
        name: &str,
        bytes: &[u8],
        user: Option<&str>,
    ) -> Result<ImageRef, QueueError> {
        let key = format!("inputs/{job_id}/{name}");
        let mut metadata = std::collections::HashMap::from([("job".to_string(), job_id.to_string())]);
        if let Some(user) = user {
            metadata.insert("user".to_string(), user.to_string());
        }
        let meta =
            async_nats::jetstream::object_store::ObjectMetadata { name: key.clone(), metadata, ..Default::default() };
        self.images.put(meta, &mut &bytes[..]).await.map_err(|e| QueueError::Publish(format!("{key}: {e}")))?;
        Ok(ImageRef::Object(key))
    }
}

fn parse_result(payload: &[u8]) -> Result<JobResult, QueueError> {
    serde_json::from_slice(payload).map_err(|e| QueueError::Protocol(format!("result is not valid v1 JSON: {e}")))
}
