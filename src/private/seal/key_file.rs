//! Key files, one line of text each:
//!
//! ```text
//! imago-fleet-secret-v1 <base64 of the 32-byte X25519 secret key>
//! imago-fleet-public-v1 <base64 of the 32-byte X25519 public key>
//! ```
//!
//! Base64 is the standard alphabet, padded; surrounding whitespace is ignored. `imago keygen` writes the pair as
//! `fleet-<key id>.key` (mode 0600) and `fleet-<key id>.pub`, and never overwrites a file. The secret key is read
//! and decoded inside secret buffers.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::{KeyId, PublicKey, SealError, SecretKey, KEY_LEN};
use crate::private::SecretBytes;

/// First word of a secret key file.
pub const SECRET_KEY_LABEL: &str = "imago-fleet-secret-v1";
/// First word of a public key file.
pub const PUBLIC_KEY_LABEL: &str = "imago-fleet-public-v1";

/// The files `generate_key_files` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub key_id: KeyId,
}

fn key_file_error(path: &Path, reason: impl Into<String>) -> SealError {
    SealError::KeyFile { path: path.to_path_buf(), reason: reason.into() }
}

/// The 32 key bytes of a key file's text, decoded into a secret buffer.
fn parse_key_text(text: &[u8], label: &str) -> Result<SecretBytes, String> {
    let text = text.trim_ascii();
    let Some(encoded) = text.strip_prefix(label.as_bytes()).and_then(|rest| rest.strip_prefix(b" ")) else {
        return Err(format!("expected one line `{label} <base64>`"));
    };
    let encoded = encoded.trim_ascii();
    let mut key = SecretBytes::zeroed(base64::decoded_len_estimate(encoded.len()));
    let len = base64::engine::general_purpose::STANDARD
        .decode_slice(encoded, key.expose_mut())
        .map_err(|e| format!("the key is not base64: {e}"))?;
    key.truncate(len);
    if len != KEY_LEN {
        return Err(format!("the key is {len} bytes, not {KEY_LEN}"));
    }
    Ok(key)
}

/// `<label> <base64>\n` in a secret buffer.
fn key_text(label: &str, key: &[u8]) -> SecretBytes {
    let encoded_len = base64::encoded_len(key.len(), true).unwrap_or(0);
    let mut text = SecretBytes::zeroed(label.len() + 1 + encoded_len + 1);
    let out = text.expose_mut();
    out[..label.len()].copy_from_slice(label.as_bytes());
    out[label.len()] = b' ';
    let written = base64::engine::general_purpose::STANDARD.encode_slice(key, &mut out[label.len() + 1..]).unwrap_or(0);
    out[label.len() + 1 + written] = b'\n';
    text.truncate(label.len() + 1 + written + 1);
    text
}

impl SecretKey {
    /// Reads a secret key file.
    pub fn read_file(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read(path).map_err(|e| key_file_error(path, e.to_string()))?;
        let text = SecretBytes::from_vec(text);
        let key = parse_key_text(text.expose(), SECRET_KEY_LABEL).map_err(|reason| key_file_error(path, reason))?;
        Self::from_bytes(key.expose())
    }

    /// The text of this key's secret key file.
    pub fn file_text(&self) -> SecretBytes {
        key_text(SECRET_KEY_LABEL, self.expose())
    }
}

impl PublicKey {
    /// Reads a public key file.
    pub fn read_file(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read(path).map_err(|e| key_file_error(path, e.to_string()))?;
        let key = parse_key_text(&text, PUBLIC_KEY_LABEL).map_err(|reason| key_file_error(path, reason))?;
        Self::from_bytes(key.expose())
    }

    /// The text of this key's public key file.
    pub fn file_text(&self) -> String {
        String::from_utf8_lossy(key_text(PUBLIC_KEY_LABEL, self.as_bytes()).expose()).into_owned()
    }
}

/// Makes a new fleet key pair and writes it into `dir` (created if missing): `fleet-<key id>.key`, readable by its
/// owner only, and `fleet-<key id>.pub`. Existing files are never overwritten.
pub fn generate_key_files(dir: &Path) -> Result<KeyFiles, SealError> {
    std::fs::create_dir_all(dir).map_err(|e| key_file_error(dir, e.to_string()))?;
    let key = SecretKey::generate();
    let key_id = key.key_id();
    let secret = dir.join(format!("fleet-{key_id}.key"));
    let public = dir.join(format!("fleet-{key_id}.pub"));
    write_new_file(&secret, key.file_text().expose(), 0o600)?;
    write_new_file(&public, key.public_key().file_text().as_bytes(), 0o644)?;
    Ok(KeyFiles { secret, public, key_id })
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SealError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
            key_file_error(path, format!("cannot create it ({e}); an existing key is never overwritten"))
        })?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(|e| key_file_error(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn generated_key_files_read_back_and_the_secret_one_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate_key_files(dir.path()).unwrap();
        assert_eq!(files.secret, dir.path().join(format!("fleet-{}.key", files.key_id)));
        let mode = std::fs::metadata(&files.secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = SecretKey::read_file(&files.secret).unwrap();
        let public = PublicKey::read_file(&files.public).unwrap();
        assert_eq!(secret.public_key(), &public);
        assert_eq!(public.key_id(), files.key_id);
        let text = std::fs::read_to_string(&files.public).unwrap();
        assert!(text.starts_with("imago-fleet-public-v1 ") && text.ends_with('\n') && text.lines().count() == 1);
    }

    #[test]
    fn existing_key_files_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let path = dir.path().join("taken.key");
        std::fs::write(&path, "precious").unwrap();
        let err = write_new_file(&path, key.file_text().expose(), 0o600).unwrap_err();
        assert_eq!(err.code(), "seal_key_file");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn malformed_key_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let public_text = key.public_key().file_text();
        let cases = [
            (write("swapped.key", &public_text), "expected one line `imago-fleet-secret-v1 <base64>`"),
            (write("short.key", "imago-fleet-secret-v1 AAAA"), "the key is 3 bytes, not 32"),
            (write("garbled.key", "imago-fleet-secret-v1 !!!!"), "not base64"),
        ];
        for (path, reason) in cases {
            let err = SecretKey::read_file(&path).unwrap_err();
            assert!(err.to_string().contains(reason), "{err}");
            assert_eq!(err.code(), "seal_key_file");
        }
        assert!(SecretKey::read_file(&dir.path().join("missing.key")).is_err());
        let padded = write("padded.pub", &format!("\n  {public_text}  \n"));
        assert_eq!(&PublicKey::read_file(&padded).unwrap(), key.public_key());
    }
}
