//! User images entering the system: decoding under hard limits, orientation, alpha, and fitting to the size the
//! model runs at.
//!
//! Every check that can refuse an input runs before a full decode: byte size, then the format sniffed from the
//! first bytes, then the dimensions read from the header. The decoder itself runs under `image::Limits` as a second
//! line of defence. Policies (documented in the README):
//! - Formats: PNG, JPEG, WebP. Animated WebP/PNG: the first frame.
//! - EXIF orientation is applied, so the picture is upright as the user saw it.
//! - Transparency: images are composited over white; masks are read as luma × alpha (transparent = keep).
//! - Fitting: scale to cover the target size, then crop the centre (Lanczos3), the way a photo fills a frame.

mod webp;

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// Hard limits on one input image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Largest encoded size accepted.
    pub max_bytes: usize,
    /// Largest width × height accepted (checked from the header, before decoding).
    pub max_pixels: u64,
}

impl Default for InputLimits {
    /// 20 MiB and 40 megapixels: any phone photo, nothing that would need gigabytes to decode.
    fn default() -> Self {
        Self { max_bytes: 20 << 20, max_pixels: 40_000_000 }
    }
}

/// Why an input image was refused. [`InputError::code`] is the stable machine-readable form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("the {what} is {size} bytes, over the limit of {limit}")]
    TooManyBytes { what: &'static str, size: usize, limit: usize },
    #[error("the {what} is {width}x{height} pixels, over the limit of {limit} pixels")]
    TooManyPixels { what: &'static str, width: u32, height: u32, limit: u64 },
    #[error("the {what} has no pixels")]
    Empty { what: &'static str },
    #[error("the {what} is not PNG, JPEG or WebP{detail}")]
    UnsupportedFormat { what: &'static str, detail: String },
    #[error("the {what} could not be decoded: {reason}")]
    Undecodable { what: &'static str, reason: String },
    #[error("the mask is {mask_width}x{mask_height} but the image is {width}x{height}")]
    MaskSizeMismatch { mask_width: u32, mask_height: u32, width: u32, height: u32 },
}

impl InputError {
    /// Stable error code for job results.
    pub fn code(&self) -> &'static str {
        match self {
            InputError::TooManyBytes { .. } | InputError::TooManyPixels { .. } => "image_too_large",
            InputError::Empty { .. } | InputError::Undecodable { .. } => "image_undecodable",
            InputError::UnsupportedFormat { .. } => "image_unsupported_format",
            InputError::MaskSizeMismatch { .. } => "mask_size_mismatch",
        }
    }
}

/// Decodes bytes into an upright image, refusing anything over `limits` before it is decoded.
fn decode(bytes: &[u8], limits: &InputLimits, what: &'static str) -> Result<DynamicImage, InputError> {
    if bytes.len() > limits.max_bytes {
        return Err(InputError::TooManyBytes { what, size: bytes.len(), limit: limits.max_bytes });
    }
    let undecodable = |e: &dyn std::fmt::Display| InputError::Undecodable { what, reason: e.to_string() };
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>, InputError> {
        let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| undecodable(&e))?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => Ok(reader),
            Some(other) => Err(InputError::UnsupportedFormat { what, detail: format!(" (it is {other:?})") }),
            None => Err(InputError::UnsupportedFormat { what, detail: String::new() }),
        }
    };
    // 1. dimensions from the header only
    let (width, height) = reader()?.into_dimensions().map_err(|e| undecodable(&e))?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(InputError::Empty { what });
    }
    if pixels > limits.max_pixels {
        return Err(InputError::TooManyPixels { what, width, height, limit: limits.max_pixels });
    }
    // WebP frames carry sizes of their own, which the decoder trusts before the canvas size.
    if let Some((w, h)) = webp::frame_larger_than_canvas(bytes, (width, height)) {
        if w as u64 * h as u64 > limits.max_pixels {
            return Err(InputError::TooManyPixels { what, width: w, height: h, limit: limits.max_pixels });
        }
        return Err(InputError::Undecodable { what, reason: format!("a {w}x{h} frame in a {width}x{height} picture") });
    }
    // 2. full decode under allocation limits: 16-bit RGBA at the accepted size, plus decoder scratch
    let mut reader = reader()?;
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    decode_limits.max_alloc = Some(pixels * 8 + (16 << 20));
    reader.limits(decode_limits);
    let mut decoder = reader.into_decoder().map_err(|e| undecodable(&e))?;
    let orientation = decoder.orientation().map_err(|e| undecodable(&e))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| undecodable(&e))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Decodes a user's image to 8-bit RGB, compositing any transparency over white.
pub fn decode_image(bytes: &[u8], limits: &InputLimits) -> Result<RgbImage, InputError> {
    let image = decode(bytes, limits, "image")?;
    if !image.color().has_alpha() {
        return Ok(image.to_rgb8());
    }
    let rgba = image.to_rgba8();
    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over_white = |c: u8| ((c as u32 * a as u32 + 255 * (255 - a as u32) + 127) / 255) as u8;
        image::Rgb([over_white(r), over_white(g), over_white(b)])
    }))
}

/// Decodes an inpainting mask to 8-bit luma (white = repaint); transparent pixels count as black (keep).
pub fn decode_mask(bytes: &[u8], limits: &InputLimits) -> Result<GrayImage, InputError> {
    let image = decode(bytes, limits, "mask")?;
    if !image.color().has_alpha() {
        return Ok(image.to_luma8());
    }
    let la = image.to_luma_alpha8();
    Ok(GrayImage::from_fn(la.width(), la.height(), |x, y| {
        let [l, a] = la.get_pixel(x, y).0;
        image::Luma([((l as u32 * a as u32 + 127) / 255) as u8])
    }))
}

/// Checks that a mask matches its image before either is resized.
pub fn check_mask_size(image: &RgbImage, mask: &GrayImage) -> Result<(), InputError> {
    if image.dimensions() == mask.dimensions() {
        return Ok(());
    }
    Err(InputError::MaskSizeMismatch {
        mask_width: mask.width(),
        mask_height: mask.height(),
        width: image.width(),
        height: image.height(),
    })
}

/// The crop (x, y, w, h) of a `src` image that has the aspect ratio of `target`, centred.
fn cover_crop((sw, sh): (u32, u32), (tw, th): (u32, u32)) -> (u32, u32, u32, u32) {
    // Compare sw/sh with tw/th without floats: keep full height when the source is wider.
    if sw as u64 * th as u64 > tw as u64 * sh as u64 {
        let w = ((sh as u64 * tw as u64) / th as u64).max(1) as u32;
        ((sw - w) / 2, 0, w, sh)
    } else {
        let h = ((sw as u64 * th as u64) / tw as u64).max(1) as u32;
        (0, (sh - h) / 2, sw, h)
    }
}

/// Scales `image` to cover `width`×`height` and crops the centre.
pub fn fit_image<P>(
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
    P::Subpixel: 'static,
{
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let (x, y, w, h) = cover_crop(image.dimensions(), (width, height));
    let cropped = image::imageops::crop_imm(image, x, y, w, h).to_image();
    image::imageops::resize(&cropped, width, height, image::imageops::FilterType::Lanczos3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn oversized_bytes_are_refused_before_decoding() {
        let limits = InputLimits { max_bytes: 10, max_pixels: 1 << 20 };
        let err = decode_image(&[0u8; 11], &limits).unwrap_err();
        assert_eq!(err.code(), "image_too_large");
    }

    #[test]
    fn too_many_pixels_is_refused_from_the_header() {
        let bytes = png(&DynamicImage::new_rgb8(300, 200));
        let limits = InputLimits { max_bytes: 1 << 20, max_pixels: 50_000 };
        let err = decode_image(&bytes, &limits).unwrap_err();
        assert_eq!(err, InputError::TooManyPixels { what: "image", width: 300, height: 200, limit: 50_000 });
    }

    #[test]
    fn non_image_bytes_are_an_unsupported_format() {
        let err = decode_image(b"GIF89a not really", &InputLimits::default()).unwrap_err();
        assert_eq!(err.code(), "image_unsupported_format");
        let err = decode_image(b"hello", &InputLimits::default()).unwrap_err();
        assert_eq!(err.code(), "image_unsupported_format");
    }

    #[test]
    fn transparency_is_composited_over_white_and_masks_keep_transparent_areas() {
        let rgba = image::RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([0, 0, 0, 0])
            } else {
                image::Rgba([10, 20, 30, 255])
            }
        });
        let bytes = png(&DynamicImage::ImageRgba8(rgba.clone()));
        let rgb = decode_image(&bytes, &InputLimits::default()).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
        let white_strokes =
            image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([255, 255, 255, if x == 0 { 0 } else { 255 }]));
        let mask = decode_mask(&png(&DynamicImage::ImageRgba8(white_strokes)), &InputLimits::default()).unwrap();
        assert_eq!(mask.as_raw(), &vec![0, 255]);
    }

    #[test]
    fn cover_crop_keeps_the_centre_with_the_target_aspect() {
        assert_eq!(cover_crop((400, 200), (100, 100)), (100, 0, 200, 200));
        assert_eq!(cover_crop((200, 400), (100, 100)), (0, 100, 200, 200));
        assert_eq!(cover_crop((300, 300), (64, 32)), (0, 75, 300, 150));
        let img = RgbImage::from_fn(400, 200, |x, _| image::Rgb([if (100..300).contains(&x) { 0 } else { 255 }, 0, 0]));
        let fitted = fit_image(&img, 64, 64);
        assert_eq!(fitted.dimensions(), (64, 64));
        assert!(fitted.pixels().all(|p| p.0[0] < 8), "the red side bands must be cropped away");
    }

    #[test]
    fn mask_must_match_the_image_size() {
        let err = check_mask_size(&RgbImage::new(64, 64), &GrayImage::new(64, 32)).unwrap_err();
        assert_eq!(err.code(), "mask_size_mismatch");
        assert!(err.to_string().contains("64x32"));
    }
}
