//! The plaintext of a sealed job: a small binary frame, so that the worker parses it straight into secret buffers
//! (no JSON or base64 copies of the content in ordinary memory).
//!
//! Layout, all integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `IMJC` |
//! | 1 | version, 1 |
//! | 4 + n | prompt, UTF-8 |
//! | 4 + n | negative prompt, UTF-8 |
//! | 4 + n | input image file (PNG, JPEG or WebP); length 0 = absent |
//! | 4 + n | mask file; length 0 = absent |
//!
//! Nothing may follow the mask.

use std::fmt;

use super::SealError;
use crate::private::{SecretBytes, SecretString};

/// First bytes of every frame.
pub const FRAME_MAGIC: &[u8; 4] = b"IMJC";
/// The frame version this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Magic, version and four length prefixes.
const HEADER_LEN: usize = FRAME_MAGIC.len() + 1 + 4 * 4;

/// A job's content, as sealed by the client and opened by the worker. Every part lives in secret memory.
#[derive(Clone, Default, PartialEq)]
pub struct JobContent {
    pub prompt: SecretString,
    pub negative_prompt: SecretString,
    /// The picture to edit (the file's bytes).
    pub image: Option<SecretBytes>,
    /// The inpainting mask (the file's bytes).
    pub mask: Option<SecretBytes>,
}

impl fmt::Debug for JobContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContent")
            .field("prompt", &self.prompt)
            .field("negative_prompt", &self.negative_prompt)
            .field("image", &self.image)
            .field("mask", &self.mask)
            .finish()
    }
}

impl JobContent {
    /// The frame of this content, in a secret buffer (it is the plaintext that gets sealed). Fails only for a part
    /// over 4 GiB, which no length prefix can describe.
    pub fn to_frame(&self) -> Result<SecretBytes, SealError> {
        let parts: [&[u8]; 4] = [
            self.prompt.expose().as_bytes(),
            self.negative_prompt.expose().as_bytes(),
            self.image.as_ref().map(SecretBytes::expose).unwrap_or_default(),
            self.mask.as_ref().map(SecretBytes::expose).unwrap_or_default(),
        ];
        let mut frame = SecretBytes::zeroed(HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>());
        let out = frame.expose_mut();
        out[..4].copy_from_slice(FRAME_MAGIC);
        out[4] = FRAME_VERSION;
        let mut at = 5;
        for part in parts {
            let len = u32::try_from(part.len())
                .map_err(|_| SealError::Malformed(format!("a part of {} bytes does not fit a frame", part.len())))?;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            at += 4;
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(frame)
    }

    /// Parses a frame. Each part is copied into a secret buffer of its own; `frame` itself stays the caller's to
    /// wipe (it is a secret buffer when it comes from [`super::FleetKeyring::open_job`]).
    pub fn from_frame(frame: &[u8]) -> Result<Self, SealError> {
        let malformed = |what: &str| SealError::Malformed(format!("content frame: {what}"));
        if frame.len() < FRAME_MAGIC.len() + 1 || &frame[..4] != FRAME_MAGIC {
            return Err(malformed("it does not start with the frame magic"));
        }
        if frame[4] != FRAME_VERSION {
            return Err(malformed(&format!(
                "version {} is not supported (this build reads {FRAME_VERSION})",
                frame[4]
            )));
        }
        let mut rest = &frame[5..];
        let mut next_part = |name: &str| -> Result<SecretBytes, SealError> {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(malformed(&format!("truncated before the length of the {name}")));
            };
            let len = u32::from_be_bytes(*len) as usize;
            if len > tail.len() {
                return Err(malformed(&format!("the {name} claims {len} bytes but only {} follow", tail.len())));
            }
            let (part, tail) = tail.split_at(len);
            rest = tail;
            Ok(SecretBytes::copy_from(part))
        };
        let text = |bytes: SecretBytes, name: &str| {
            SecretString::from_utf8(bytes).map_err(|_| malformed(&format!("the {name} is not UTF-8")))
        };
        let prompt = text(next_part("prompt")?, "prompt")?;
        let negative_prompt = text(next_part("negative prompt")?, "negative prompt")?;
        let present = |bytes: SecretBytes| Some(bytes).filter(|b| !b.is_empty());
        let image = present(next_part("image")?);
        let mask = present(next_part("mask")?);
        if !rest.is_empty() {
            return Err(malformed(&format!("{} bytes follow the mask", rest.len())));
        }
        Ok(Self { prompt, negative_prompt, image, mask })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> JobContent {
        JobContent {
            prompt: SecretString::from("a red circle".to_string()),
            negative_prompt: SecretString::from("blur".to_string()),
            image: Some(SecretBytes::copy_from(b"\x89PNG image bytes")),
            mask: None,
        }
    }

    #[test]
    fn frames_round_trip_with_absent_parts_as_empty() {
        let frame = content().to_frame().unwrap();
        assert_eq!(&frame.expose()[..5], b"IMJC\x01");
        assert_eq!(frame.len(), HEADER_LEN + 12 + 4 + 16);
        let parsed = JobContent::from_frame(frame.expose()).unwrap();
        assert_eq!(parsed, content());
        assert_eq!(parsed.mask, None);
        let empty = JobContent::default().to_frame().unwrap();
        assert_eq!(JobContent::from_frame(empty.expose()).unwrap(), JobContent::default());
    }

    #[test]
    fn every_truncation_of_a_frame_is_refused() {
        let frame = content().to_frame().unwrap();
        for len in 0..frame.len() {
            let err = JobContent::from_frame(&frame.expose()[..len]).unwrap_err();
            assert_eq!(err.code(), "seal_invalid", "prefix of {len} bytes");
        }
    }

    #[test]
    fn malformed_frames_say_what_is_wrong() {
        let frame = content().to_frame().unwrap();
        let message = |bytes: &[u8]| JobContent::from_frame(bytes).unwrap_err().to_string();
        let mut wrong_version = frame.expose().to_vec();
        wrong_version[4] = 2;
        assert!(message(&wrong_version).contains("version 2"), "{}", message(&wrong_version));
        let mut trailing = frame.expose().to_vec();
        trailing.push(0);
        assert!(message(&trailing).contains("1 bytes follow the mask"));
        let mut huge = frame.expose().to_vec();
        huge[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(message(&huge).contains("claims 4294967295 bytes"));
        let mut not_utf8 = frame.expose().to_vec();
        not_utf8[9] = 0xff;
        assert!(message(&not_utf8).contains("prompt is not UTF-8"));
        assert!(message(b"PNG\x01").contains("magic"));
    }

    #[test]
    fn debug_shows_only_lengths() {
        let shown = format!("{:?}", content());
        assert!(!shown.contains("red") && !shown.contains("PNG"), "{shown}");
        assert!(shown.contains("SecretString(12 bytes)"), "{shown}");
    }
}
