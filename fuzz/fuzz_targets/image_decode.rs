//! Arbitrary bytes as a user's image and mask: decoding under small limits must never panic, never return more
//! pixels than the limit, and never allocate past the bound the decoder is given (the run's `-malloc_limit_mb`
//! turns any larger single allocation into a failure). Decoded images are fitted to a generation size, as the
//! engine does.

#![no_main]

use imago::diffusion::input::{check_mask_size, decode_image, decode_mask, fit_image, InputLimits};
use libfuzzer_sys::fuzz_target;

/// Small limits keep each run fast (the seed photos are 128×85); the checks are the same at any size.
const LIMITS: InputLimits = InputLimits { max_bytes: 1 << 20, max_pixels: 1 << 14 };

fuzz_target!(|data: &[u8]| {
    let image = decode_image(data, &LIMITS);
    let mask = decode_mask(data, &LIMITS);
    // The same bytes decode as both or as neither: the mask path differs only in its colour conversion.
    assert_eq!(image.is_ok(), mask.is_ok(), "image {:?} vs mask {:?}", image.as_ref().err(), mask.as_ref().err());
    if let (Ok(image), Ok(mask)) = (image, mask) {
        let (w, h) = image.dimensions();
        assert!(w > 0 && h > 0 && w as u64 * h as u64 <= LIMITS.max_pixels);
        assert_eq!(mask.dimensions(), (w, h));
        assert!(check_mask_size(&image, &mask).is_ok());
        // Small targets of both orientations: the crop arithmetic is what is at stake, not the resampling.
        assert_eq!(fit_image(&image, 16, 12).dimensions(), (16, 12));
        assert_eq!(fit_image(&mask, 4, 32).dimensions(), (4, 32));
    }
});
