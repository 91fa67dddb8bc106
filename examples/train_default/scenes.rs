//! The procedural training data of the default model: one shape on a plain background, its caption, and a
//! rasterizer. Also the caption vocabulary, which the model card, the picture grid and the content test share
//! (they include this file with `#[path]`), so that what the model was taught and what is checked cannot drift.
//!
//! Everything is drawn from a seeded [`NoiseSource`], so a seed names the same scenes on every platform.

use imago::diffusion::noise::NoiseSource;

/// Shape colours: caption word and sRGB value. Chosen far apart in RGB so a colour is named unambiguously.
pub const SHAPE_COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 70]),
    ("blue", [40, 90, 230]),
    ("yellow", [245, 205, 40]),
    ("orange", [245, 135, 30]),
    ("purple", [150, 60, 200]),
];

/// Background colours: neutral, so no background can be mistaken for a shape colour.
pub const BACKGROUNDS: [(&str, [u8; 3]); 3] =
    [("white", [245, 245, 245]), ("black", [15, 15, 15]), ("gray", [128, 128, 128])];

/// The shapes the model draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

/// Size class; the radius is drawn within the class's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Radius range as a fraction of the image side (32 px: small 4.5–5.5 px, large 8.5–10 px).
    fn radius_range(self) -> (f32, f32) {
        match self {
            Size::Small => (4.5 / 32.0, 5.5 / 32.0),
            Size::Large => (8.5 / 32.0, 10.0 / 32.0),
        }
    }
}

/// Where the shape sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Center,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 5] =
        [Position::Center, Position::TopLeft, Position::TopRight, Position::BottomLeft, Position::BottomRight];

    pub fn phrase(self) -> &'static str {
        match self {
            Position::Center => "in the center",
            Position::TopLeft => "at the top left",
            Position::TopRight => "at the top right",
            Position::BottomLeft => "at the bottom left",
            Position::BottomRight => "at the bottom right",
        }
    }

    /// Direction from the centre: -1, 0 or 1 per axis (y grows downwards).
    fn direction(self) -> (f32, f32) {
        match self {
            Position::Center => (0.0, 0.0),
            Position::TopLeft => (-1.0, -1.0),
            Position::TopRight => (1.0, -1.0),
            Position::BottomLeft => (-1.0, 1.0),
            Position::BottomRight => (1.0, 1.0),
        }
    }
}

/// One training picture, in units of the image side (0..1), so it renders at any resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: Shape,
    /// Index into [`SHAPE_COLOURS`].
    pub colour: usize,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
    pub size: Size,
    pub position: Position,
    pub radius: f32,
    pub centre: (f32, f32),
}

/// Which optional words a caption spells out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptionParts {
    pub size: bool,
    pub position: bool,
}

/// Half the width of a shape's bounding box in radii (the star reaches furthest).
const EXTENT: f32 = 1.15;

fn pick<T: Copy>(rng: &mut NoiseSource, items: &[T]) -> T {
    let i = ((rng.next_uniform() * items.len() as f32) as usize).min(items.len() - 1);
    items[i]
}

fn between(rng: &mut NoiseSource, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.next_uniform()
}

impl Scene {
    /// A random scene: every colour, shape and background equally likely; three in four shapes large and half of
    /// them in the center, since a large centred shape is what a caption without size and position words asks for
    /// and the only size at which 32×32 pixels show a shape's outline clearly.
    pub fn sample(rng: &mut NoiseSource) -> Scene {
        let shape = pick(rng, &Shape::ALL);
        let colour = pick(rng, &[0, 1, 2, 3, 4, 5]);
        let background = pick(rng, &[0, 1, 2]);
        let size = pick(rng, &[Size::Small, Size::Large, Size::Large, Size::Large]);
        let position = if rng.next_uniform() < 0.5 { Position::Center } else { pick(rng, &Position::ALL[1..]) };
        let (lo, hi) = size.radius_range();
        let radius = between(rng, lo, hi);
        // Corners push the shape as far out as fits with a one-pixel (1/32) margin; the centre jitters slightly.
        let reach = 0.5 - EXTENT * radius - 1.0 / 32.0;
        let (dx, dy) = position.direction();
        let jitter = 1.5 / 32.0;
        let mut axis = |d: f32| {
            if d == 0.0 {
                0.5 + between(rng, -jitter, jitter)
            } else {
                0.5 + d * (reach - between(rng, 0.0, jitter)).max(0.0)
            }
        };
        let centre = (axis(dx), axis(dy));
        Scene { shape, colour, background, size, position, radius, centre }
    }

    /// "a [small|large] <colour> <shape> [<position>] on a <background> background".
    pub fn caption(&self, parts: CaptionParts) -> String {
        let mut words = vec!["a"];
        if parts.size {
            words.push(self.size.word());
        }
        words.push(SHAPE_COLOURS[self.colour].0);
        words.push(self.shape.word());
        if parts.position {
            words.push(self.position.phrase());
        }
        words.extend(["on", "a", BACKGROUNDS[self.background].0, "background"]);
        words.join(" ")
    }

    /// Whether the point (x, y), in units of the side, is inside the shape.
    fn contains(&self, x: f32, y: f32) -> bool {
        let (cx, cy) = self.centre;
        let r = self.radius;
        let (dx, dy) = (x - cx, y - cy);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            Shape::Triangle => {
                // Equilateral, pointing up, its bounding box centred on the centre.
                let side = 2.0 * r;
                let height = side * 3f32.sqrt() / 2.0;
                let top = (0.0, -height / 2.0);
                let left = (-side / 2.0, height / 2.0);
                let right = (side / 2.0, height / 2.0);
                inside_polygon(&[top, right, left], dx, dy)
            }
            Shape::Star => {
                let outer = EXTENT * r;
                let inner = 0.45 * outer;
                // The top point reaches `outer` above the star's centre, the lower points only cos 36° below:
                // shift down so the bounding box is centred.
                let shift = outer * (1.0 - (36f32).to_radians().cos()) / 2.0;
                let points: Vec<(f32, f32)> = (0..10)
                    .map(|k| {
                        let angle = (-90.0 + 36.0 * k as f32).to_radians();
                        let radius = if k % 2 == 0 { outer } else { inner };
                        (radius * angle.cos(), radius * angle.sin() + shift)
                    })
                    .collect();
                inside_polygon(&points, dx, dy)
            }
        }
    }

    /// How much of each pixel of a `side`×`side` image the shape covers (0..1, row-major), from 4×4 samples
    /// per pixel.
    pub fn coverage(&self, side: usize) -> Vec<f32> {
        const SUB: usize = 4;
        let step = 1.0 / (side * SUB) as f32;
        let mut out = Vec::with_capacity(side * side);
        for py in 0..side {
            for px in 0..side {
                let mut hits = 0;
                for sy in 0..SUB {
                    for sx in 0..SUB {
                        let x = (px * SUB + sx) as f32 * step + step / 2.0;
                        let y = (py * SUB + sy) as f32 * step + step / 2.0;
                        hits += self.contains(x, y) as usize;
                    }
                }
                out.push(hits as f32 / (SUB * SUB) as f32);
            }
        }
        out
    }

    /// The scene as `side`×`side` RGB, channel-major (3, side, side), values in [-1, 1], edges antialiased.
    pub fn render(&self, side: usize) -> Vec<f32> {
        let fg = SHAPE_COLOURS[self.colour].1.map(|c| c as f32 / 127.5 - 1.0);
        let bg = BACKGROUNDS[self.background].1.map(|c| c as f32 / 127.5 - 1.0);
        let coverage = self.coverage(side);
        let mut out = vec![0f32; 3 * side * side];
        for (i, a) in coverage.iter().enumerate() {
            for c in 0..3 {
                out[c * side * side + i] = bg[c] + a * (fg[c] - bg[c]);
            }
        }
        out
    }
}

/// Even-odd rule, so it holds for the concave star as well as convex shapes.
fn inside_polygon(points: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let (xi, yi) = points[i];
        let (xj, yj) = points[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(shape: Shape) -> Scene {
        Scene {
            shape,
            colour: 0,
            background: 0,
            size: Size::Large,
            position: Position::Center,
            radius: 0.3,
            centre: (0.5, 0.5),
        }
    }

    /// Fraction of the image the shape covers.
    fn coverage(s: &Scene) -> f32 {
        let img = s.render(64);
        let fg = SHAPE_COLOURS[0].1[1] as f32 / 127.5 - 1.0;
        let bg = BACKGROUNDS[0].1[1] as f32 / 127.5 - 1.0;
        img[64 * 64..2 * 64 * 64].iter().map(|v| (v - bg) / (fg - bg)).sum::<f32>() / (64.0 * 64.0)
    }

    #[test]
    fn rendered_areas_match_the_geometry() {
        let r: f32 = 0.3;
        let expect = [
            (Shape::Circle, std::f32::consts::PI * r * r),
            (Shape::Square, (1.7 * r).powi(2)),
            (Shape::Triangle, 3f32.sqrt() * r * r),
        ];
        for (shape, area) in expect {
            let got = coverage(&scene(shape));
            assert!((got - area).abs() < 0.01, "{shape:?}: {got} vs {area}");
        }
        // Five kites between the outer and inner radius.
        let (outer, inner) = (EXTENT * r, 0.45 * EXTENT * r);
        let star_area = 5.0 * outer * inner * 36f32.to_radians().sin();
        let star = coverage(&scene(Shape::Star));
        assert!((star - star_area).abs() < 0.01, "star: {star} vs {star_area}");
    }

    #[test]
    fn captions_spell_the_optional_parts_only_when_asked() {
        let s = scene(Shape::Star);
        assert_eq!(s.caption(CaptionParts { size: false, position: false }), "a red star on a white background");
        assert_eq!(
            s.caption(CaptionParts { size: true, position: true }),
            "a large red star in the center on a white background"
        );
    }

    #[test]
    fn sampled_scenes_stay_inside_the_image_and_follow_their_position() {
        let mut rng = NoiseSource::new(3);
        for _ in 0..500 {
            let s = Scene::sample(&mut rng);
            let e = EXTENT * s.radius;
            assert!(s.centre.0 - e >= 0.0 && s.centre.0 + e <= 1.0, "{s:?}");
            assert!(s.centre.1 - e >= 0.0 && s.centre.1 + e <= 1.0, "{s:?}");
            let (dx, dy) = s.position.direction();
            assert!(dx * (s.centre.0 - 0.5) >= 0.0 && dy * (s.centre.1 - 0.5) >= 0.0, "{s:?}");
        }
    }
}
