//! Sealed jobs in the job vocabulary: the rules a message's `sealed` part must follow, building a sealed message
//! (the client), and taking opened content into a validated job (the worker). The cryptography is
//! [`crate::private::seal`].

use base64::Engine as _;

use super::validate::{check_object_key, check_prompt, JobError, JobLimits, JobSpec};
use super::wire::{ErrorCode, ImageRef, JobKind, JobMessage, SealedContent};
use crate::private::seal::{self, JobContent, KeyId, PublicKey, SealError, SealedBox, SecretKey, KEY_LEN};
use crate::private::{wipe_vec, SecretBytes};

/// A validated `sealed` part: what the worker needs to open the content and to seal the result.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedSpec {
    pub key_id: String,
    pub encapsulated_key: [u8; KEY_LEN],
    /// Where the ciphertext is: inline, or in the object store.
    pub ciphertext: ImageRef,
    /// The client's one-time key the result images are sealed to.
    pub reply_key: PublicKey,
}

/// An opened sealed job's inputs, in secret buffers.
#[derive(Debug, Default)]
pub struct OpenedInputs {
    pub image: Option<SecretBytes>,
    pub mask: Option<SecretBytes>,
}

impl From<SealError> for JobError {
    fn from(e: SealError) -> Self {
        let code = match &e {
            SealError::UnknownKey { .. } => ErrorCode::SealUnknownKey,
            SealError::NotOpened | SealError::Malformed(_) => ErrorCode::SealInvalid,
            SealError::KeyFile { .. } | SealError::Seal(_) => ErrorCode::Internal,
        };
        JobError::new(code, e.to_string())
    }
}

/// The private-content rules of a message: a sealed job is private and carries no clear content, and its sealed
/// part is well formed; an unsealed private job names a `reply` subject, the only place its images may go.
pub(super) fn check_private_content(msg: &JobMessage) -> Result<Option<SealedSpec>, JobError> {
    let Some(sealed) = &msg.sealed else {
        if msg.private && msg.reply.is_none() {
            return Err(JobError::new(
                ErrorCode::InvalidParameter,
                "an unsealed private job needs `reply`: its images are sent only there, never stored",
            ));
        }
        return Ok(None);
    };
    if !msg.private {
        return Err(JobError::new(ErrorCode::InvalidParameter, "a sealed job must be private (`private: true`)"));
    }
    if !msg.prompt.is_empty() || !msg.negative_prompt.is_empty() || msg.image.is_some() || msg.mask.is_some() {
        return Err(JobError::new(
            ErrorCode::InvalidParameter,
            "a sealed job carries its prompt, negative prompt, image and mask only inside `sealed`: leave the clear \
             fields empty",
        ));
    }
    let invalid = |message: &str| JobError::new(ErrorCode::SealInvalid, message);
    if !KeyId::is_well_formed(&sealed.key_id) {
        return Err(invalid("sealed.key_id must be 16 lowercase hex digits"));
    }
    let encapsulated_key = base64::engine::general_purpose::STANDARD
        .decode(&sealed.encapsulated_key)
        .ok()
        .and_then(|bytes| <[u8; KEY_LEN]>::try_from(bytes).ok())
        .ok_or_else(|| invalid("sealed.encapsulated_key must be base64 of 32 bytes"))?;
    let reply_key = PublicKey::from_base64(&sealed.reply_key)
        .map_err(|_| invalid("sealed.reply_key must be base64 of a 32-byte X25519 public key"))?;
    check_object_key(&sealed.ciphertext)?;
    Ok(Some(SealedSpec {
        key_id: sealed.key_id.clone(),
        encapsulated_key,
        ciphertext: sealed.ciphertext.clone(),
        reply_key,
    }))
}

/// Takes opened content into `spec`: the prompts move into it, the image and mask are returned. Checked as the
/// clear fields would have been: prompt lengths, an image for an edit and none for a generate job, input sizes.
pub fn accept_opened_content(
    spec: &mut JobSpec,
    content: JobContent,
    limits: &JobLimits,
    max_input_bytes: usize,
) -> Result<OpenedInputs, JobError> {
    check_prompt("prompt", content.prompt.expose(), limits)?;
    check_prompt("negative_prompt", content.negative_prompt.expose(), limits)?;
    match spec.kind {
        JobKind::Generate if content.image.is_some() || content.mask.is_some() => {
            return Err(JobError::new(
                ErrorCode::InvalidParameter,
                "the sealed content of a generate job holds an image or mask (use kind \"edit\")",
            ));
        }
        JobKind::Edit if content.image.is_none() => {
            return Err(JobError::new(ErrorCode::ImageRequired, "the sealed content of an edit job holds no image"));
        }
        _ => {}
    }
    for (name, input) in [("image", &content.image), ("mask", &content.mask)] {
        if let Some(bytes) = input.as_ref().filter(|b| b.len() > max_input_bytes) {
            return Err(JobError::new(
                ErrorCode::ImageTooLarge,
                format!("the sealed {name} is {} bytes, over {max_input_bytes}", bytes.len()),
            ));
        }
    }
    spec.prompt = content.prompt;
    spec.negative_prompt = content.negative_prompt;
    Ok(OpenedInputs { image: content.image, mask: content.mask })
}

/// The largest ciphertext a worker fetches for a sealed job: two inputs, two prompts (4 bytes a character at most)
/// and the frame's and the tag's overhead.
pub fn max_sealed_bytes(limits: &JobLimits, max_input_bytes: usize) -> usize {
    2 * max_input_bytes + 2 * 4 * limits.max_prompt_chars + 64
}

impl JobMessage {
    /// Seals `content` into this job for the fleet key (the client's side), the ciphertext inline (see
    /// [`JobMessage::attach_sealed`]). Returns the one-time secret key that opens the result. The job's `id` must
    /// be final: the content is bound to it.
    pub fn seal(&mut self, content: &JobContent, fleet_key: &PublicKey) -> Result<SecretKey, SealError> {
        let reply_key = SecretKey::generate();
        let sealed = seal::seal_job(fleet_key, &self.id, content)?;
        let ciphertext = ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(&sealed.ciphertext));
        self.attach_sealed(fleet_key, &sealed, ciphertext, reply_key.public_key());
        Ok(reply_key)
    }

    /// Makes this a sealed job: private, its clear prompt, negative prompt, image and mask emptied (the prompts
    /// wiped), and `sealed` naming the fleet key, the encapsulated key, where the ciphertext is and the reply key.
    pub fn attach_sealed(
        &mut self,
        fleet_key: &PublicKey,
        sealed: &SealedBox,
        ciphertext: ImageRef,
        reply_key: &PublicKey,
    ) {
        for text in [&mut self.prompt, &mut self.negative_prompt] {
            wipe_vec(&mut std::mem::take(text).into_bytes());
        }
        self.image = None;
        self.mask = None;
        self.private = true;
        self.sealed = Some(SealedContent {
            key_id: fleet_key.key_id().to_string(),
            encapsulated_key: base64::engine::general_purpose::STANDARD.encode(sealed.encapsulated_key),
            ciphertext,
            reply_key: reply_key.to_base64(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{parse, validate};
    use crate::private::seal::FleetKeyring;
    use crate::private::SecretString;

    fn content(image: Option<&[u8]>) -> JobContent {
        JobContent {
            prompt: SecretString::from("a sealed red circle".to_string()),
            negative_prompt: SecretString::default(),
            image: image.map(SecretBytes::copy_from),
            mask: None,
        }
    }

    fn sealed_job(kind: JobKind, image: Option<&[u8]>) -> (JobMessage, SecretKey) {
        let fleet = SecretKey::from_bytes(&[7; 32]).unwrap();
        let mut job = JobMessage { kind, ..JobMessage::generate("sealed-1", "clear words") };
        job.seal(&content(image), fleet.public_key()).unwrap();
        (job, fleet)
    }

    fn code(job: &JobMessage) -> ErrorCode {
        let bytes = serde_json::to_vec(job).unwrap();
        validate(parse(&bytes).unwrap(), &JobLimits::default()).unwrap_err().code
    }

    #[test]
    fn a_sealed_job_validates_and_its_opened_content_fills_the_spec() {
        let (job, fleet) = sealed_job(JobKind::Edit, Some(b"image file"));
        assert!(job.private && job.prompt.is_empty() && job.image.is_none());
        let json = serde_json::to_string(&job).unwrap();
        assert!(!json.contains("clear words") && !json.contains("sealed red"), "{json}");
        let mut spec = validate(parse(json.as_bytes()).unwrap(), &JobLimits::default()).unwrap();
        let sealed = spec.sealed.clone().unwrap();
        assert_eq!(sealed.key_id, fleet.key_id().to_string());
        assert_eq!(spec.edit.as_ref().unwrap().image, None);
        let ImageRef::Inline(ciphertext) = &sealed.ciphertext else { panic!("inline ciphertext") };
        let ciphertext = base64::engine::general_purpose::STANDARD.decode(ciphertext).unwrap();
        let opened = FleetKeyring::new(vec![fleet])
            .open_job(&sealed.key_id, &sealed.encapsulated_key, &ciphertext, &spec.id)
            .unwrap();
        let inputs = accept_opened_content(&mut spec, opened, &JobLimits::default(), 1 << 20).unwrap();
        assert_eq!(spec.prompt.expose(), "a sealed red circle");
        assert_eq!(inputs.image.unwrap().expose(), b"image file");
        assert!(inputs.mask.is_none());
    }

    #[test]
    fn sealed_jobs_break_no_rule_of_private_content() {
        let (job, _) = sealed_job(JobKind::Generate, None);
        type Breakage = (fn(&mut JobMessage), ErrorCode);
        let broken: [Breakage; 7] = [
            (|j| j.private = false, ErrorCode::InvalidParameter),
            (|j| j.prompt = "clear".into(), ErrorCode::InvalidParameter),
            (|j| j.negative_prompt = "clear".into(), ErrorCode::InvalidParameter),
            (|j| j.mask = Some(ImageRef::Inline("AAAA".into())), ErrorCode::InvalidParameter),
            (|j| j.sealed.as_mut().unwrap().key_id = "not-hex".into(), ErrorCode::SealInvalid),
            (|j| j.sealed.as_mut().unwrap().encapsulated_key = "AAAA".into(), ErrorCode::SealInvalid),
            (|j| j.sealed.as_mut().unwrap().reply_key = "%%".into(), ErrorCode::SealInvalid),
        ];
        for (i, (change, expected)) in broken.into_iter().enumerate() {
            let mut bad = job.clone();
            change(&mut bad);
            assert_eq!(code(&bad), expected, "case {i}");
        }
        let unsealed_private = JobMessage { private: true, ..JobMessage::generate("p-1", "x") };
        assert_eq!(code(&unsealed_private), ErrorCode::InvalidParameter);
        let with_reply = JobMessage { reply: Some("inbox.1".into()), ..unsealed_private };
        let bytes = serde_json::to_vec(&with_reply).unwrap();
        assert!(validate(parse(&bytes).unwrap(), &JobLimits::default()).is_ok());
    }

    #[test]
    fn opened_content_must_match_the_kind_and_the_limits() {
        let limits = JobLimits::default();
        let accept = |kind: JobKind, content: JobContent, max_input: usize| {
            let (job, _) = sealed_job(kind, None);
            let bytes = serde_json::to_vec(&job).unwrap();
            let mut spec = validate(parse(&bytes).unwrap(), &limits).unwrap();
            accept_opened_content(&mut spec, content, &limits, max_input).map(|_| ()).unwrap_err().code
        };
        assert_eq!(accept(JobKind::Edit, content(None), 100), ErrorCode::ImageRequired);
        assert_eq!(accept(JobKind::Generate, content(Some(b"img")), 100), ErrorCode::InvalidParameter);
        assert_eq!(accept(JobKind::Edit, content(Some(&[0; 101])), 100), ErrorCode::ImageTooLarge);
        let long = JobContent { prompt: SecretString::from("x".repeat(2001)), ..content(None) };
        assert_eq!(accept(JobKind::Generate, long, 100), ErrorCode::InvalidPrompt);
    }

    #[test]
    fn seal_errors_map_to_their_wire_codes() {
        let unknown = SealError::UnknownKey { key_id: "x".into(), held: "no keys".into() };
        assert_eq!(JobError::from(unknown).code, ErrorCode::SealUnknownKey);
        assert_eq!(JobError::from(SealError::NotOpened).code, ErrorCode::SealInvalid);
        assert_eq!(JobError::from(SealError::Malformed("x".into())).code, ErrorCode::SealInvalid);
        assert!(!ErrorCode::SealInvalid.is_transient() && !ErrorCode::SealUnknownKey.is_transient());
    }
}
