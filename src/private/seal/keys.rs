//! The keys of sealing: X25519 public and secret keys (the fleet's, and each client's one-time reply key) and the
//! key ids that name them.

use std::fmt;

use base64::Engine as _;
use hpke::{Deserializable, Kem as _, Serializable};
use sha2::Digest as _;

use super::{open_with, result_aad, Kem, SealError, KEY_LEN, RESULT_INFO, TAG_LEN};
use crate::private::SecretBytes;

/// Names a public key without revealing anything: the first 8 bytes of SHA-256 of the key, as 16 lowercase hex
/// digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &PublicKey) -> Self {
        let digest = sha2::Sha256::digest(key.as_bytes());
        Self(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` has the shape of a key id (16 lowercase hex digits).
    pub fn is_well_formed(text: &str) -> bool {
        text.len() == 16 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// An X25519 public key: the fleet's (clients seal jobs to it) or a client's one-time reply key (the worker seals
/// the result to it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let bytes = <[u8; KEY_LEN]>::try_from(bytes)
            .map_err(|_| SealError::Malformed(format!("a public key is {KEY_LEN} bytes, not {}", bytes.len())))?;
        Ok(Self(bytes))
    }

    /// A key from the base64 (standard alphabet, padded) of its 32 bytes, as it travels in a job.
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| SealError::Malformed(format!("a public key is not base64: {e}")))?;
        Self::from_bytes(&bytes)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(self)
    }

    pub(super) fn to_hpke(self) -> Result<<Kem as hpke::Kem>::PublicKey, SealError> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0).map_err(|e| SealError::Malformed(format!("public key: {e}")))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// An X25519 secret key, held in a locked, zeroed-on-drop [`SecretBytes`]: the fleet's (made by `imago keygen`)
/// or a client's one-time reply key ([`SecretKey::generate`] per job).
#[derive(Clone)]
pub struct SecretKey {
    /// The clamped scalar, as RFC 9180 serializes X25519 secret keys.
    scalar: SecretBytes,
    public: PublicKey,
}

impl SecretKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Self {
        let (secret, public) = Kem::gen_keypair();
        let mut scalar = SecretBytes::zeroed(KEY_LEN);
        secret.write_exact(scalar.expose_mut());
        let mut public_bytes = [0u8; KEY_LEN];
        public.write_exact(&mut public_bytes);
        Self { scalar, public: PublicKey(public_bytes) }
    }

    /// A key from its 32 bytes (clamped as X25519 requires).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| SealError::Malformed(format!("a secret key is {KEY_LEN} bytes, not {}", bytes.len())))?;
        let mut scalar = SecretBytes::zeroed(KEY_LEN);
        secret.write_exact(scalar.expose_mut());
        let mut public = [0u8; KEY_LEN];
        Kem::sk_to_pk(&secret).write_exact(&mut public);
        Ok(Self { scalar, public: PublicKey(public) })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn key_id(&self) -> KeyId {
        self.public.key_id()
    }

    /// The 32 secret bytes (for writing the key file).
    pub fn expose(&self) -> &[u8] {
        self.scalar.expose()
    }

    /// Opens result image `index` of job `job_id`, sealed by the worker to this (one-time) key: `sealed` is
    /// `encapsulated key ‖ ciphertext`.
    pub fn open_result(&self, job_id: &str, index: usize, sealed: &[u8]) -> Result<SecretBytes, SealError> {
        let Some((encapsulated_key, ciphertext)) = sealed.split_at_checked(KEY_LEN) else {
            return Err(SealError::Malformed(format!("a sealed image is at least {} bytes", KEY_LEN + TAG_LEN)));
        };
        open_with(self, RESULT_INFO, result_aad(job_id, index).as_bytes(), encapsulated_key, ciphertext)
    }

    /// The hpke form of the key: a short-lived copy that zeroes itself on drop.
    pub(super) fn to_hpke(&self) -> Result<<Kem as hpke::Kem>::PrivateKey, SealError> {
        <Kem as hpke::Kem>::PrivateKey::from_bytes(self.scalar.expose())
            .map_err(|e| SealError::Malformed(format!("secret key: {e}")))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.key_id())
    }
}
