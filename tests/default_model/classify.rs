//! Names what a picture of one shape on a plain background shows, from pixel statistics alone: the background
//! colour (border pixels), the shape colour (pixels far from the background) and the shape (how much of its
//! bounding box the shape fills, and whether its mass gathers at the bottom).

use crate::scenes::{Shape, BACKGROUNDS, SHAPE_COLOURS};

/// What the classifier read from one picture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Index into `BACKGROUNDS`; `None` when the border is closest to a shape colour.
    pub background: Option<usize>,
    /// Index into `SHAPE_COLOURS`; `None` when no foreground was found or it is closest to a background colour.
    pub colour: Option<usize>,
    pub shape: Option<Shape>,
    /// Shape area over bounding-box area: square 1, circle π/4, triangle 1/2, star ≈ 0.4.
    pub fill: f32,
    /// Skewness of the mass along the vertical (y downwards): about -0.57 for the upward triangle, near 0 for the
    /// other shapes.
    pub skew: f32,
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

fn as_f32(c: [u8; 3]) -> [f32; 3] {
    c.map(|v| v as f32)
}

/// The named colour nearest to `c`: `Ok(i)` for `SHAPE_COLOURS[i]`, `Err(i)` for `BACKGROUNDS[i]`.
fn nearest_named(c: [f32; 3]) -> Result<usize, usize> {
    let shape = SHAPE_COLOURS.iter().enumerate().map(|(i, (_, v))| (distance(c, as_f32(*v)), Ok(i)));
    let background = BACKGROUNDS.iter().enumerate().map(|(i, (_, v))| (distance(c, as_f32(*v)), Err(i)));
    shape.chain(background).min_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, i)| i).unwrap_or(Err(0))
}

fn median(mut values: Vec<f32>) -> f32 {
    values.sort_by(f32::total_cmp);
    values[values.len() / 2]
}

/// Classifies an RGB picture stored row-major, 3 bytes per pixel, `side`×`side`.
pub fn classify(rgb: &[u8], side: usize) -> Reading {
    let pixel = |x: usize, y: usize| -> [f32; 3] {
        let i = 3 * (y * side + x);
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    // 1. background: per-channel median of the outermost ring
    let ring: Vec<[f32; 3]> =
        (0..side).flat_map(|i| [(i, 0), (i, side - 1), (0, i), (side - 1, i)]).map(|(x, y)| pixel(x, y)).collect();
    let bg = [0, 1, 2].map(|c| median(ring.iter().map(|p| p[c]).collect()));
    let background = nearest_named(bg).err();

    // 2. foreground colour: mean of the pixels farthest from the background (the shape's interior)
    let pixels: Vec<[f32; 3]> = (0..side * side).map(|i| pixel(i % side, i / side)).collect();
    let far = pixels.iter().map(|p| distance(*p, bg)).fold(0f32, f32::max);
    let mut reading = Reading { background, colour: None, shape: None, fill: 0.0, skew: 0.0 };
    if far < 40.0 {
        return reading;
    }
    let core: Vec<&[f32; 3]> = pixels.iter().filter(|p| distance(**p, bg) > 0.6 * far).collect();
    let fg = [0, 1, 2].map(|c| core.iter().map(|p| p[c]).sum::<f32>() / core.len() as f32);
    reading.colour = nearest_named(fg).ok();

    // 3. shape: each pixel's position between background (0) and foreground (1) colour
    let axis = [fg[0] - bg[0], fg[1] - bg[1], fg[2] - bg[2]];
    let norm = axis.iter().map(|v| v * v).sum::<f32>();
    let coverage: Vec<f32> =
        pixels.iter().map(|p| ((0..3).map(|c| (p[c] - bg[c]) * axis[c]).sum::<f32>() / norm).clamp(0.0, 1.0)).collect();
    // Extents from the column and row maxima, so partly covered edge pixels count by their coverage.
    let column_max: Vec<f32> =
        (0..side).map(|x| (0..side).map(|y| coverage[y * side + x]).fold(0f32, f32::max)).collect();
    let row_max: Vec<f32> = (0..side).map(|y| (0..side).map(|x| coverage[y * side + x]).fold(0f32, f32::max)).collect();
    let (width, height) = (column_max.iter().sum::<f32>(), row_max.iter().sum::<f32>());
    let area = coverage.iter().sum::<f32>();
    if area < 1.0 {
        return reading;
    }
    // Vertical skewness of the mass: an upward triangle's mass gathers at its base (about -0.57); circle,
    // square and star are close to symmetric.
    let rows: Vec<f32> = (0..side).map(|y| (0..side).map(|x| coverage[y * side + x]).sum()).collect();
    let mean_y = rows.iter().enumerate().map(|(y, m)| y as f32 * m).sum::<f32>() / area;
    let moment = |k: i32| rows.iter().enumerate().map(|(y, m)| (y as f32 - mean_y).powi(k) * m).sum::<f32>() / area;
    reading.fill = area / (width * height).max(1e-6);
    reading.skew = moment(3) / moment(2).max(1e-6).powf(1.5);
    reading.shape = Some(if reading.fill > 0.89 {
        Shape::Square
    } else if reading.fill > 0.64 {
        Shape::Circle
    } else if reading.skew < -0.3 {
        Shape::Triangle
    } else {
        Shape::Star
    });
    reading
}
