//! Private jobs on the queue. A sealed job's content is opened from its ciphertext into secret buffers and each
//! output image is sealed to the client's one-time key before it leaves the worker (so what is stored is
//! ciphertext). An unsealed private job's output is never stored: the results stream gets a content-free record
//! and the images go only to the job's `reply` subject.

use super::setup::Queue;
use super::QueueError;
use crate::engine::{JobInputs, JobOutput};
use crate::job::{accept_opened_content, max_sealed_bytes, ErrorCode, JobError, JobLimits, JobResult, JobSpec};
use crate::private::seal::{seal_result, FleetKeyring};
use crate::private::wipe_vec;

impl Queue {
    /// Fetches a sealed job's ciphertext, opens it with the keyring and takes the content into `spec` (prompts)
    /// and the returned inputs (image, mask), all in secret buffers. A job that is not sealed has no inputs here.
    pub(super) async fn open_sealed_inputs(
        &self,
        keyring: &FleetKeyring,
        spec: &mut JobSpec,
        limits: &JobLimits,
        max_input_bytes: usize,
    ) -> Result<JobInputs, JobError> {
        let Some(sealed) = &spec.sealed else { return Ok(JobInputs::default()) };
        let ciphertext =
            self.fetch_image(&sealed.ciphertext, max_sealed_bytes(limits, max_input_bytes)).await.map_err(|e| {
                let code = if e.code == ErrorCode::ImageUndecodable { ErrorCode::SealInvalid } else { e.code };
                JobError::new(code, format!("sealed content: {}", e.message))
            })?;
        let content = keyring.open_job(&sealed.key_id, &sealed.encapsulated_key, ciphertext.expose(), &spec.id)?;
        let opened = accept_opened_content(spec, content, limits, max_input_bytes)?;
        Ok(JobInputs { image: opened.image, mask: opened.mask })
    }

    /// Publishes the result of an unsealed private job: the results stream stores a content-free record (status,
    /// size, timings; no images, no seeds), so that a redelivered job is answered and a duplicate is dropped, and
    /// only `reply` (core NATS, never stored) gets the images. Returns whether this publish stored the record;
    /// when another delivery stored one first, nothing is sent.
    pub async fn publish_private_result(
        &self,
        result: &JobResult,
        reply: Option<&str>,
        user: Option<&str>,
    ) -> Result<bool, QueueError> {
        let record = JobResult {
            v: result.v,
            id: result.id.clone(),
            status: result.status,
            images: Vec::new(),
            seeds: Vec::new(),
            width: result.width,
            height: result.height,
            format: result.format,
            timings: result.timings.clone(),
            error: result.error.clone(),
            worker: result.worker.clone(),
            sealed: false,
        };
        let stored = self.store_result(&record, user).await?;
        if let Some(reply) = reply.filter(|_| stored) {
            let payload = serde_json::to_vec(result).map_err(|e| QueueError::Publish(e.to_string()))?;
            self.forward_result(payload.into(), reply).await?;
        }
        Ok(stored)
    }
}

/// Seals each output image of a sealed job to the job's reply key and wipes the plaintext images; other jobs'
/// output passes unchanged.
pub(super) fn seal_output(spec: &JobSpec, mut output: JobOutput) -> Result<JobOutput, JobError> {
    let Some(sealed) = &spec.sealed else { return Ok(output) };
    let sealed_images = output
        .images
        .iter()
        .enumerate()
        .map(|(index, image)| seal_result(&sealed.reply_key, &spec.id, index, image))
        .collect::<Result<Vec<_>, _>>();
    output.images.iter_mut().for_each(wipe_vec);
    output.images = sealed_images?;
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{parse, validate, JobKind, JobMessage, OutputFormat, Timings};
    use crate::private::seal::{JobContent, SecretKey};

    #[test]
    fn a_sealed_jobs_output_leaves_only_as_ciphertext_for_its_reply_key() {
        let fleet = SecretKey::generate();
        let mut job = JobMessage::generate("sealed-out", "");
        let reply_key = job.seal(&JobContent::default(), fleet.public_key()).unwrap();
        let spec = validate(parse(&serde_json::to_vec(&job).unwrap()).unwrap(), &JobLimits::default()).unwrap();
        let output = JobOutput {
            images: vec![b"first png".to_vec(), b"second png".to_vec()],
            seeds: vec![1, 2],
            width: 8,
            height: 8,
            format: OutputFormat::Png,
            steps: 1,
            guidance: 0.0,
            scheduler: "euler".into(),
            timings: Timings::default(),
        };
        let sealed = seal_output(&spec, output).unwrap();
        assert!(sealed.images.iter().all(|i| !i.windows(3).any(|w| w == b"png")));
        assert_eq!(reply_key.open_result("sealed-out", 1, &sealed.images[1]).unwrap().expose(), b"second png");
        assert!(reply_key.open_result("sealed-out", 0, &sealed.images[1]).is_err());
        assert_eq!(spec.kind, JobKind::Generate);
    }
}
