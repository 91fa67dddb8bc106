//! Pixels in and out: generated tensors to RGB images, and PNG encoding with the generation parameters as text.

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::pipeline::GenerateParams;
use super::{Error, Result};

/// (batch, 3, h, w) u8 → one RGB image per batch entry.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, channels, height, width) = images.dims4()?;
    if channels != 3 || images.dtype() != DType::U8 {
        return Err(Error::Image(format!(
            "expected (batch, 3, h, w) u8 pixels, got {:?} {:?}",
            images.shape(),
            images.dtype()
        )));
    }
    (0..batch)
        .map(|i| {
            let hwc = images.get(i)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<u8>()?;
            RgbImage::from_raw(width as u32, height as u32, hwc)
                .ok_or_else(|| Error::Image("pixel buffer does not match the image size".into()))
        })
        .collect()
}

/// The parameters of image `index` of a generation, as PNG text entries (prompt, seed, steps, …), so an image can
/// be reproduced from the file alone.
pub fn parameters_text(params: &GenerateParams, index: usize, model: &str) -> Vec<(&'static str, String)> {
    vec![
        ("prompt", params.prompt.clone()),
        ("negative_prompt", params.negative_prompt.clone()),
        ("seed", params.seed.wrapping_add(index as u64).to_string()),
        ("steps", params.steps.to_string()),
        ("guidance", params.guidance.to_string()),
        ("scheduler", params.scheduler.name().to_string()),
        ("size", format!("{}x{}", params.width, params.height)),
        ("model", model.to_string()),
        ("software", format!("imago {}", env!("CARGO_PKG_VERSION"))),
    ]
}

/// Encodes `image` as JPEG at `quality` (1–100).
pub fn encode_jpeg(image: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(image)
        .map_err(|e| Error::Image(format!("JPEG: {e}")))?;
    Ok(out)
}

/// Encodes `image` as PNG with `text` entries as tEXt chunks (keyword, value), e.g. the prompt and seed so an image
/// can be reproduced. Pass no entries for an image that must not carry its parameters.
pub fn encode_png(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            encoder
                .add_itxt_chunk(keyword.to_string(), value.clone())
                .map_err(|e| Error::Image(format!("PNG metadata {keyword}: {e}")))?;
        }
        let mut writer = encoder.write_header().map_err(|e| Error::Image(format!("PNG header: {e}")))?;
        writer.write_image_data(image.as_raw()).map_err(|e| Error::Image(format!("PNG data: {e}")))?;
        writer.finish().map_err(|e| Error::Image(format!("PNG end: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tensor_layout_becomes_pixels_in_the_right_places() {
        // One 1×2 image: left pixel (1, 2, 3), right pixel (4, 5, 6), stored channel-first.
        let t = Tensor::new(&[1u8, 4, 2, 5, 3, 6], &Device::Cpu).unwrap().reshape((1, 3, 1, 2)).unwrap();
        let images = tensor_to_images(&t).unwrap();
        assert_eq!(images[0].get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(images[0].get_pixel(1, 0).0, [4, 5, 6]);
    }

    #[test]
    fn png_round_trips_pixels_and_carries_text() {
        let image = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let bytes = encode_png(&image, &[("prompt", "a red circle ✓".into()), ("seed", "42".into())]).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded, image);
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
        let texts: Vec<(String, String)> =
            reader.info().utf8_text.iter().map(|c| (c.keyword.clone(), c.get_text().unwrap())).collect();
        assert_eq!(texts, vec![("prompt".into(), "a red circle ✓".into()), ("seed".into(), "42".into())]);
    }

    #[test]
    fn png_without_text_has_no_text_chunks() {
        let image = RgbImage::new(2, 2);
        let bytes = encode_png(&image, &[]).unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
        assert!(reader.info().utf8_text.is_empty() && reader.info().uncompressed_latin1_text.is_empty());
    }
}
