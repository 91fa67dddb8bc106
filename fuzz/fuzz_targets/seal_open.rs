//! Arbitrary bytes as sealed content: the content-frame parser and the opener (a fixed key; the input read as
//! encapsulated key ‖ ciphertext) must never panic, every refusal is `seal_invalid`, and whatever parses or opens
//! accounts for every byte of its input.

#![no_main]

use imago::private::seal::{fuzz_open, JobContent, KEY_LEN, TAG_LEN};
use libfuzzer_sys::fuzz_target;

/// Magic, version and four length prefixes.
const FRAME_HEADER_LEN: usize = 4 + 1 + 4 * 4;

fn frame_len(content: &JobContent) -> usize {
    let part = |bytes: Option<&imago::private::SecretBytes>| bytes.map_or(0, |b| b.len());
    FRAME_HEADER_LEN
        + content.prompt.len()
        + content.negative_prompt.len()
        + part(content.image.as_ref())
        + part(content.mask.as_ref())
}

fuzz_target!(|data: &[u8]| {
    let (frame, opened) = fuzz_open(data);
    match frame {
        Ok(content) => assert_eq!(frame_len(&content), data.len()),
        Err(e) => assert_eq!(e.code(), "seal_invalid", "{e}"),
    }
    match opened {
        Ok(content) => assert_eq!(frame_len(&content) + KEY_LEN + TAG_LEN, data.len()),
        Err(e) => assert_eq!(e.code(), "seal_invalid", "{e}"),
    }
});
