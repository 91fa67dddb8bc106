//! The requester's side: submit a job, follow its progress, receive its result, fetch its images, cancel it.
//! Used by `imago submit`, the examples and the tests.

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use super::setup::Queue;
use super::QueueError;
use crate::job::{ImageRef, JobMessage, JobResult, ProgressEvent};

impl Queue {
    /// Publishes `job` (its id as `Nats-Msg-Id`, so a resubmit is deduplicated) and waits for its result,
    /// calling `on_progress` for each progress event. A job answered before (a duplicate submit) returns the
    /// stored result.
    pub async fn submit(
        &self,
        job: &JobMessage,
        timeout: Duration,
        mut on_progress: impl FnMut(&ProgressEvent),
    ) -> Result<JobResult, QueueError> {
        let names = &self.config.names;
        // Subscribe before publishing so no event can be missed.
        let mut results =
            self.client.subscribe(names.results(&job.id)).await.map_err(|e| QueueError::Publish(e.to_string()))?;
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
        loop {
            tokio::select! {
                Some(message) = results.next() => return parse_result(&message.payload),
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
