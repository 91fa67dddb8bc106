//! Sealed jobs: the client seals a private job's content to the worker fleet's public key, so the NATS streams and
//! the object store only ever hold ciphertext; the worker opens it into secret buffers and seals each output image
//! to a one-time key the client sent along.
//!
//! HPKE (RFC 9180) in base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305:
//!
//! | direction | `info` | AAD | sealed to |
//! |---|---|---|---|
//! | job content (a [`JobContent`] frame) | `imago job v1` | the job id | the fleet key named by its [`KeyId`] |
//! | result image `i` | `imago result v1` | `<job id>/<i>` | the client's one-time reply key |
//!
//! The AAD binds a ciphertext to its job (and image): replayed under another job id it does not open. The `info`
//! strings keep the two directions apart and name the format version. Ciphertexts carry the 16-byte tag at their
//! end; a sealed result image travels as `encapsulated key (32 bytes) ‖ ciphertext`.
//!
//! Keys rotate through a [`FleetKeyring`]: a worker accepts every key on its ring, clients seal to the newest.

mod frame;
mod key_file;
mod keys;

use std::fmt;
use std::path::{Path, PathBuf};

use hpke::aead::AeadTag;
use hpke::inout::InOutBuf;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};

pub use frame::{JobContent, FRAME_MAGIC, FRAME_VERSION};
pub use key_file::{generate_key_files, KeyFiles, PUBLIC_KEY_LABEL, SECRET_KEY_LABEL};
pub use keys::{KeyId, PublicKey, SecretKey};

use super::SecretBytes;

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// HPKE `info` of a job's content.
pub const JOB_INFO: &[u8] = b"imago job v1";
/// HPKE `info` of a result image.
pub const RESULT_INFO: &[u8] = b"imago result v1";
/// Length of X25519 secret and public keys, and of an encapsulated key.
pub const KEY_LEN: usize = 32;
/// Length of the authentication tag at the end of every ciphertext.
pub const TAG_LEN: usize = 16;

/// Why sealing or opening failed. [`SealError::code`] gives the stable code.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The content names a key that is not on this keyring.
    #[error("the content is sealed to key {key_id:?}, which this worker does not hold (it holds: {held})")]
    UnknownKey { key_id: String, held: String },
    /// Authentication failed: the ciphertext was tampered with or truncated, or it was sealed to another key, for
    /// another job id or image, or in the other direction.
    #[error("the sealed content does not open: tampered with, truncated, or sealed to another key or for another job")]
    NotOpened,
    /// A key, encapsulated key or content frame of the wrong shape.
    #[error("malformed sealed content: {0}")]
    Malformed(String),
    /// A key file that cannot be read, parsed or written.
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// Sealing itself failed (an internal error of the cipher).
    #[error("sealing failed: {0}")]
    Seal(String),
}

impl SealError {
    /// Stable code: `seal_unknown_key`, `seal_invalid` (does not open, or malformed), `seal_key_file` or
    /// `seal_failed`.
    pub fn code(&self) -> &'static str {
        match self {
            SealError::UnknownKey { .. } => "seal_unknown_key",
            SealError::NotOpened | SealError::Malformed(_) => "seal_invalid",
            SealError::KeyFile { .. } => "seal_key_file",
            SealError::Seal(_) => "seal_failed",
        }
    }
}

/// Ciphertext under HPKE: the encapsulated key the recipient needs, and the ciphertext with its tag at the end.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBox {
    pub encapsulated_key: [u8; KEY_LEN],
    pub ciphertext: Vec<u8>,
}

impl SealedBox {
    /// `encapsulated key ‖ ciphertext`, the form of a sealed result image.
    pub fn to_bytes(&self) -> Vec<u8> {
        [&self.encapsulated_key[..], &self.ciphertext].concat()
    }
}

impl fmt::Debug for SealedBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedBox({} ciphertext bytes)", self.ciphertext.len())
    }
}

/// The secret keys a worker accepts sealed jobs for. During a rotation it holds the old and the new key.
#[derive(Clone, Default)]
pub struct FleetKeyring {
    keys: Vec<SecretKey>,
}

impl FleetKeyring {
    pub fn new(keys: Vec<SecretKey>) -> Self {
        Self { keys }
    }

    /// Reads every secret key file (the `imago keygen` format).
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, SealError> {
        let keys = paths.iter().map(|p| SecretKey::read_file(p.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(SecretKey::key_id).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Opens the content of job `job_id`, sealed to the key named `key_id`, into secret buffers.
    pub fn open_job(
        &self,
        key_id: &str,
        encapsulated_key: &[u8],
        ciphertext: &[u8],
        job_id: &str,
    ) -> Result<JobContent, SealError> {
        let Some(key) = self.keys.iter().find(|k| k.key_id().as_str() == key_id) else {
            let held = self.key_ids().iter().map(KeyId::to_string).collect::<Vec<_>>();
            let held = if held.is_empty() { "no keys".to_string() } else { held.join(", ") };
            return Err(SealError::UnknownKey { key_id: key_id.chars().take(64).collect(), held });
        };
        let frame = open_with(key, JOB_INFO, job_id.as_bytes(), encapsulated_key, ciphertext)?;
        JobContent::from_frame(frame.expose())
    }
}

impl fmt::Debug for FleetKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FleetKeyring").field(&self.key_ids()).finish()
    }
}

/// Seals the content of job `job_id` to the fleet key.
pub fn seal_job(fleet_key: &PublicKey, job_id: &str, content: &JobContent) -> Result<SealedBox, SealError> {
    let frame = content.to_frame()?;
    seal_to(fleet_key, JOB_INFO, job_id.as_bytes(), frame.expose())
}

/// Seals result image `index` of job `job_id` to the client's reply key: `encapsulated key ‖ ciphertext`.
pub fn seal_result(reply_key: &PublicKey, job_id: &str, index: usize, image: &[u8]) -> Result<Vec<u8>, SealError> {
    Ok(seal_to(reply_key, RESULT_INFO, result_aad(job_id, index).as_bytes(), image)?.to_bytes())
}

/// `/` cannot occur in a job id, so the id and the index cannot run into each other.
fn result_aad(job_id: &str, index: usize) -> String {
    format!("{job_id}/{index}")
}

fn seal_to(recipient: &PublicKey, info: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<SealedBox, SealError> {
    let mut ciphertext = vec![0u8; plaintext.len() + TAG_LEN];
    let (body, tag_bytes) = ciphertext.split_at_mut(plaintext.len());
    // Encrypted from the caller's buffer straight into the ciphertext: no copy of the plaintext is made.
    let buffer = InOutBuf::new(plaintext, body).map_err(|e| SealError::Seal(e.to_string()))?;
    let (encapsulated, tag) = hpke::single_shot_seal_inout_detached::<Aead, Kdf, Kem>(
        &OpModeS::Base,
        &recipient.to_hpke()?,
        info,
        buffer,
        aad,
    )
    .map_err(|e| match e {
        // The recipient key is a low-order point: no secret can be agreed with it (a client's bad reply key).
        hpke::HpkeError::EncapError => SealError::Malformed("the recipient key is not a usable X25519 key".into()),
        other => SealError::Seal(other.to_string()),
    })?;
    tag.write_exact(tag_bytes);
    let mut encapsulated_key = [0u8; KEY_LEN];
    encapsulated.write_exact(&mut encapsulated_key);
    Ok(SealedBox { encapsulated_key, ciphertext })
}

/// Decrypts straight into a secret buffer.
fn open_with(
    key: &SecretKey,
    info: &[u8],
    aad: &[u8],
    encapsulated_key: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, SealError> {
    let encapsulated = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated_key).map_err(|_| {
        SealError::Malformed(format!("the encapsulated key is {KEY_LEN} bytes, not {}", encapsulated_key.len()))
    })?;
    let Some(body_len) = ciphertext.len().checked_sub(TAG_LEN) else {
        return Err(SealError::Malformed(format!("a ciphertext is at least its {TAG_LEN}-byte tag")));
    };
    let (body, tag) = ciphertext.split_at(body_len);
    let tag = AeadTag::<Aead>::from_bytes(tag).map_err(|_| SealError::NotOpened)?;
    let mut plaintext = SecretBytes::zeroed(body_len);
    let buffer = InOutBuf::new(body, plaintext.expose_mut()).map_err(|e| SealError::Malformed(e.to_string()))?;
    hpke::single_shot_open_inout_detached::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &key.to_hpke()?,
        &encapsulated,
        info,
        buffer,
        aad,
        &tag,
    )
    .map_err(|_| SealError::NotOpened)?;
    Ok(plaintext)
}

/// The secret key of the `seal_open` fuzz target and its seed corpus. Public knowledge: never use it for anything
/// else.
#[doc(hidden)]
pub const FUZZ_KEY: [u8; KEY_LEN] = [0x5a; KEY_LEN];
/// The job id the `seal_open` seed corpus is sealed for.
#[doc(hidden)]
pub const FUZZ_JOB_ID: &str = "fuzz-job";

/// What the `seal_open` fuzz target runs on every input: the frame parser on the whole input, and the opener on
/// the input read as `encapsulated key (32 bytes) ‖ ciphertext` with [`FUZZ_KEY`] and [`FUZZ_JOB_ID`] (the seed
/// corpus holds boxes sealed to them, so the fuzzer starts past authentication).
#[doc(hidden)]
pub fn fuzz_open(data: &[u8]) -> (Result<JobContent, SealError>, Result<JobContent, SealError>) {
    let frame = JobContent::from_frame(data);
    let opened = SecretKey::from_bytes(&FUZZ_KEY).and_then(|key| {
        let key_id = key.key_id();
        let (encapsulated_key, ciphertext) = data.split_at(data.len().min(KEY_LEN));
        FleetKeyring::new(vec![key]).open_job(key_id.as_str(), encapsulated_key, ciphertext, FUZZ_JOB_ID)
    });
    (frame, opened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::private::SecretString;

    fn content(prompt: &str, image: Option<&[u8]>) -> JobContent {
        JobContent {
            prompt: SecretString::from(prompt.to_string()),
            negative_prompt: SecretString::from("blurry".to_string()),
            image: image.map(SecretBytes::copy_from),
            mask: image.map(|_| SecretBytes::copy_from(b"mask file")),
        }
    }

    fn open(ring: &FleetKeyring, key: &PublicKey, sealed: &SealedBox, job_id: &str) -> Result<JobContent, SealError> {
        ring.open_job(key.key_id().as_str(), &sealed.encapsulated_key, &sealed.ciphertext, job_id)
    }

    #[test]
    fn job_content_round_trips_through_the_fleet_key() {
        let fleet = SecretKey::generate();
        let ring = FleetKeyring::new(vec![fleet.clone()]);
        let sent = content("a red circle", Some(b"\x89PNG file"));
        let sealed = seal_job(fleet.public_key(), "job-1", &sent).unwrap();
        assert_eq!(sealed.ciphertext.len(), sent.to_frame().unwrap().len() + TAG_LEN);
        assert!(!sealed.ciphertext.windows(12).any(|w| w == b"a red circle"), "the prompt is not in the clear");
        assert_eq!(open(&ring, fleet.public_key(), &sealed, "job-1").unwrap(), sent);
    }

    #[test]
    fn result_images_round_trip_through_the_reply_key_and_only_for_their_index() {
        let reply = SecretKey::generate();
        let sealed = seal_result(reply.public_key(), "job-1", 1, b"png bytes").unwrap();
        assert_eq!(sealed.len(), KEY_LEN + 9 + TAG_LEN);
        assert_eq!(reply.open_result("job-1", 1, &sealed).unwrap().expose(), b"png bytes");
        for (job, index) in [("job-1", 0), ("job-2", 1)] {
            assert!(matches!(reply.open_result(job, index, &sealed), Err(SealError::NotOpened)), "{job}/{index}");
        }
        let stranger = SecretKey::generate();
        assert!(matches!(stranger.open_result("job-1", 1, &sealed), Err(SealError::NotOpened)));
    }

    #[test]
    fn a_key_id_not_on_the_ring_is_an_unknown_key() {
        let fleet = SecretKey::generate();
        let other = SecretKey::generate();
        let sealed = seal_job(fleet.public_key(), "job-1", &content("x", None)).unwrap();
        let err = open(&FleetKeyring::new(vec![other.clone()]), fleet.public_key(), &sealed, "job-1").unwrap_err();
        assert_eq!(err.code(), "seal_unknown_key");
        assert!(err.to_string().contains(other.key_id().as_str()), "{err}");
        let err = open(&FleetKeyring::default(), fleet.public_key(), &sealed, "job-1").unwrap_err();
        assert!(err.to_string().contains("no keys"), "{err}");
        // Naming a key on the ring that the content was not sealed to: it does not open.
        let ring = FleetKeyring::new(vec![other.clone()]);
        assert!(matches!(open(&ring, other.public_key(), &sealed, "job-1"), Err(SealError::NotOpened)));
    }

    #[test]
    fn any_tampered_byte_stops_the_content_from_opening() {
        let fleet = SecretKey::generate();
        let ring = FleetKeyring::new(vec![fleet.clone()]);
        let sealed = seal_job(fleet.public_key(), "job-1", &content("a red circle", None)).unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut tampered = sealed.clone();
            tampered.ciphertext[i] ^= 0x01;
            assert!(matches!(open(&ring, fleet.public_key(), &tampered, "job-1"), Err(SealError::NotOpened)), "{i}");
        }
        for i in [0, 17, KEY_LEN - 1] {
            let mut tampered = sealed.clone();
            tampered.encapsulated_key[i] ^= 0x01;
            assert!(open(&ring, fleet.public_key(), &tampered, "job-1").is_err(), "encapsulated key byte {i}");
        }
    }

    #[test]
    fn content_moved_to_another_job_id_or_direction_does_not_open() {
        let fleet = SecretKey::generate();
        let ring = FleetKeyring::new(vec![fleet.clone()]);
        let sealed = seal_job(fleet.public_key(), "job-1", &content("x", None)).unwrap();
        assert!(matches!(open(&ring, fleet.public_key(), &sealed, "job-2"), Err(SealError::NotOpened)));
        // A result sealed to the fleet key (the other `info`) does not open as a job.
        let frame = content("x", None).to_frame().unwrap();
        let result = seal_result(fleet.public_key(), "job-1", 0, frame.expose()).unwrap();
        let (encapsulated_key, ciphertext) = result.split_at(KEY_LEN);
        let err = ring.open_job(fleet.key_id().as_str(), encapsulated_key, ciphertext, "job-1").unwrap_err();
        assert!(matches!(err, SealError::NotOpened));
    }

    #[test]
    fn truncated_ciphertexts_and_keys_are_refused() {
        let fleet = SecretKey::generate();
        let ring = FleetKeyring::new(vec![fleet.clone()]);
        let sealed = seal_job(fleet.public_key(), "job-1", &content("x", None)).unwrap();
        let id = fleet.key_id();
        for len in 0..sealed.ciphertext.len() {
            let err = ring.open_job(id.as_str(), &sealed.encapsulated_key, &sealed.ciphertext[..len], "job-1");
            assert_eq!(err.unwrap_err().code(), "seal_invalid", "ciphertext cut to {len} bytes");
        }
        let err = ring.open_job(id.as_str(), &sealed.encapsulated_key[..31], &sealed.ciphertext, "job-1");
        assert!(matches!(err, Err(SealError::Malformed(_))));
        assert!(matches!(fleet.open_result("job-1", 0, &[0u8; 60]), Err(SealError::NotOpened)));
        assert!(matches!(fleet.open_result("job-1", 0, &[0u8; 20]), Err(SealError::Malformed(_))));
    }

    #[test]
    fn a_reply_key_no_secret_can_be_agreed_with_is_refused_as_invalid() {
        let degenerate = PublicKey::from_bytes(&[0; KEY_LEN]).unwrap();
        let err = seal_result(&degenerate, "job-1", 0, b"png").unwrap_err();
        assert_eq!(err.code(), "seal_invalid", "{err}");
    }

    #[test]
    fn every_key_on_a_rotating_ring_opens_what_was_sealed_to_it() {
        let (old, new) = (SecretKey::generate(), SecretKey::generate());
        let ring = FleetKeyring::new(vec![old.clone(), new.clone()]);
        assert_eq!(ring.key_ids(), vec![old.key_id(), new.key_id()]);
        for key in [&old, &new] {
            let sealed = seal_job(key.public_key(), "job-1", &content("rotating", None)).unwrap();
            assert_eq!(open(&ring, key.public_key(), &sealed, "job-1").unwrap().prompt.expose(), "rotating");
        }
    }

    #[test]
    fn key_ids_are_sixteen_hex_digits_of_the_public_key_hash() {
        let key = SecretKey::from_bytes(&FUZZ_KEY).unwrap();
        let again = SecretKey::from_bytes(key.expose()).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        assert!(KeyId::is_well_formed(key.key_id().as_str()), "{}", key.key_id());
        assert!(!KeyId::is_well_formed("0123456789ABCDEF") && !KeyId::is_well_formed("0123"));
        assert_ne!(key.key_id(), SecretKey::generate().key_id());
        assert_eq!(format!("{key:?}"), format!("SecretKey({})", key.key_id()));
        let public = PublicKey::from_base64(&key.public_key().to_base64()).unwrap();
        assert_eq!(&public, key.public_key());
        assert_eq!(PublicKey::from_bytes(&[1; 31]).unwrap_err().code(), "seal_invalid");
    }

    /// `IMAGO_WRITE_SEAL_CORPUS=1 cargo test --lib seal_open_seed` rewrites the committed seed corpus.
    #[test]
    fn the_seal_open_seed_corpus_holds_valid_frames_and_boxes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/seal_open");
        if std::env::var_os("IMAGO_WRITE_SEAL_CORPUS").is_some() {
            let key = SecretKey::from_bytes(&FUZZ_KEY).unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            let png = include_bytes!("../../tests/data/hostile/truncated.png");
            let samples = [
                ("generate", content("a red circle", None)),
                ("edit", content("a blue square", Some(&png[..64]))),
                ("empty", JobContent::default()),
            ];
            for (name, sample) in samples {
                std::fs::write(dir.join(format!("frame-{name}")), sample.to_frame().unwrap().expose()).unwrap();
                let sealed = seal_job(key.public_key(), FUZZ_JOB_ID, &sample).unwrap();
                std::fs::write(dir.join(format!("box-{name}")), sealed.to_bytes()).unwrap();
            }
        }
        let (mut frames, mut boxes) = (0, 0);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let (frame, opened) = fuzz_open(&data);
            frames += usize::from(frame.is_ok());
            boxes += usize::from(opened.is_ok());
        }
        assert_eq!((frames, boxes), (3, 3));
    }
}
