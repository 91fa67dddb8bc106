//! WebP frames declare their own sizes, and the decoder allocates for a frame before comparing its size with the
//! picture's: a 235-byte animated WebP with a 31×23 canvas whose frame claimed 16128×16383 pixels made it allocate
//! 264 MB (found by fuzzing, `fuzz/corpus/image_decode/regression-webp-frame-larger-than-canvas.webp`). So every
//! VP8/VP8L bitstream in the file, at the top level or inside an animation frame, is checked against the canvas
//! before anything is decoded.

/// The size a frame declares when it is larger than `canvas` in either direction (the first such frame).
pub(super) fn frame_larger_than_canvas(file: &[u8], canvas: (u32, u32)) -> Option<(u32, u32)> {
    if file.len() < 12 || &file[..4] != b"RIFF" || &file[8..12] != b"WEBP" {
        return None;
    }
    oversized_in_chunks(&file[12..], canvas, 0)
}

/// Walks the RIFF chunks of `data` (one level of nesting: animation frames hold chunks of their own).
fn oversized_in_chunks(data: &[u8], canvas: (u32, u32), depth: usize) -> Option<(u32, u32)> {
    let mut rest = data;
    while rest.len() >= 8 {
        let size = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let payload = &rest[8..8 + size.min(rest.len() - 8)];
        let declared = match &rest[..4] {
            b"VP8 " => vp8_size(payload),
            b"VP8L" => vp8l_size(payload),
            // ANMF: 16 bytes of frame position, size, duration and flags, then the frame's chunks.
            b"ANMF" if depth == 0 => {
                if let Some(oversized) = oversized_in_chunks(payload.get(16..).unwrap_or_default(), canvas, 1) {
                    return Some(oversized);
                }
                None
            }
            _ => None,
        };
        if let Some((width, height)) = declared {
            if width > canvas.0 || height > canvas.1 {
                return Some((width, height));
            }
        }
        // Chunks are padded to an even size.
        let next = 8usize.saturating_add(size).saturating_add(size & 1);
        rest = rest.get(next..).unwrap_or_default();
    }
    None
}

/// A lossy key frame: 3-byte frame tag, start code 9d 01 2a, then 14-bit width and height.
fn vp8_size(payload: &[u8]) -> Option<(u32, u32)> {
    if payload.len() < 10 || payload[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let side = |lo: u8, hi: u8| (u16::from_le_bytes([lo, hi]) & 0x3fff) as u32;
    Some((side(payload[6], payload[7]), side(payload[8], payload[9])))
}

/// A lossless bitstream: signature 0x2f, then width − 1 and height − 1 in 14 bits each.
fn vp8l_size(payload: &[u8]) -> Option<(u32, u32)> {
    if payload.len() < 5 || payload[0] != 0x2f {
        return None;
    }
    let bits = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(fourcc: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = fourcc.to_vec();
        out.extend((payload.len() as u32).to_le_bytes());
        out.extend(payload);
        if payload.len() % 2 == 1 {
            out.push(0);
        }
        out
    }

    fn riff(chunks: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = chunks.concat();
        let mut out = b"RIFF".to_vec();
        out.extend((body.len() as u32 + 4).to_le_bytes());
        out.extend(b"WEBP");
        out.extend(body);
        out
    }

    fn vp8_key_frame(width: u16, height: u16) -> Vec<u8> {
        let mut payload = vec![0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a];
        payload.extend(width.to_le_bytes());
        payload.extend(height.to_le_bytes());
        payload
    }

    fn animation_frame(inner: Vec<u8>) -> Vec<u8> {
        chunk(b"ANMF", &[vec![0; 16], inner].concat())
    }

    #[test]
    fn frames_within_the_canvas_pass() {
        let simple = riff(&[chunk(b"VP8 ", &vp8_key_frame(31, 23))]);
        assert_eq!(frame_larger_than_canvas(&simple, (31, 23)), None);
        let lossless = riff(&[chunk(b"VP8L", &[0x2f, 30, 0x80, 0x05, 0x00])]); // 31×23
        assert_eq!(vp8l_size(&[0x2f, 30, 0x80, 0x05, 0x00]), Some((31, 23)));
        assert_eq!(frame_larger_than_canvas(&lossless, (31, 23)), None);
        let animated = riff(&[chunk(b"VP8X", &[0; 10]), animation_frame(chunk(b"VP8 ", &vp8_key_frame(16, 8)))]);
        assert_eq!(frame_larger_than_canvas(&animated, (31, 23)), None);
    }

    #[test]
    fn a_frame_larger_than_the_canvas_is_found_at_any_level() {
        let top = riff(&[chunk(b"VP8X", &[0; 10]), chunk(b"VP8 ", &vp8_key_frame(4000, 23))]);
        assert_eq!(frame_larger_than_canvas(&top, (31, 23)), Some((4000, 23)));
        let second_frame = riff(&[
            chunk(b"VP8X", &[0; 10]),
            animation_frame(chunk(b"VP8 ", &vp8_key_frame(31, 23))),
            animation_frame(chunk(b"VP8 ", &vp8_key_frame(16383, 16383))),
        ]);
        assert_eq!(frame_larger_than_canvas(&second_frame, (31, 23)), Some((16383, 16383)));
    }

    #[test]
    fn truncated_and_foreign_files_are_left_to_the_decoder() {
        let frame = riff(&[chunk(b"VP8 ", &vp8_key_frame(9999, 9999))]);
        for cut in 0..frame.len() {
            let _ = frame_larger_than_canvas(&frame[..cut], (1, 1)); // never panics on a prefix
        }
        assert_eq!(frame_larger_than_canvas(b"\x89PNG\r\n\x1a\n", (1, 1)), None);
        let huge_size = [b"RIFF".as_slice(), &[0; 4], b"WEBP", b"VP8 ", &u32::MAX.to_le_bytes()].concat();
        assert_eq!(frame_larger_than_canvas(&huge_size, (1, 1)), None);
    }
}
