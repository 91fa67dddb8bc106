//! A small line-plot writer for the training loss curves: panels with axes, tick labels and a title, drawn with
//! the `image` crate and a built-in 3×5 pixel font, so no plotting dependency is needed.

use std::path::Path;

use image::{Rgb, RgbImage};

/// One panel: a title, a series of (x, y) points, and whether y is shown on a log scale.
pub struct Panel<'a> {
    pub title: &'a str,
    pub points: &'a [(f64, f64)],
    pub log_y: bool,
}

const PANEL_WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 300;
const MARGIN_LEFT: u32 = 70;
const MARGIN_RIGHT: u32 = 20;
const MARGIN_TOP: u32 = 30;
const MARGIN_BOTTOM: u32 = 35;
const SCALE: u32 = 2;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const LINE: Rgb<u8> = Rgb([30, 90, 200]);

/// Draws the panels stacked vertically and writes a PNG.
pub fn write_plot(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let height = PANEL_HEIGHT * panels.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(PANEL_WIDTH, height, WHITE);
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut img, PANEL_HEIGHT * i as u32, panel);
    }
    img.save(path)?;
    Ok(())
}

fn draw_panel(img: &mut RgbImage, top: u32, panel: &Panel) {
    let (x0, x1) = (MARGIN_LEFT, PANEL_WIDTH - MARGIN_RIGHT);
    let (y0, y1) = (top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM);
    draw_text(img, x0, top + 8, panel.title);
    let transform = |y: f64| if panel.log_y { y.max(1e-12).log10() } else { y };
    let finite: Vec<(f64, f64)> =
        panel.points.iter().map(|&(x, y)| (x, transform(y))).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if finite.is_empty() {
        return;
    }
    let (mut xmin, mut xmax) = bounds(finite.iter().map(|p| p.0));
    let (mut ymin, mut ymax) = bounds(finite.iter().map(|p| p.1));
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    if ymax <= ymin {
        (ymin, ymax) = (ymin - 0.5, ymax + 0.5);
    }
    let pad = 0.05 * (ymax - ymin);
    (ymin, ymax) = (ymin - pad, ymax + pad);
    if !panel.log_y {
        xmin = xmin.min(0.0);
    }
    let to_px = |x: f64, y: f64| -> (f64, f64) {
        let px = x0 as f64 + (x - xmin) / (xmax - xmin) * (x1 - x0) as f64;
        let py = y1 as f64 - (y - ymin) / (ymax - ymin) * (y1 - y0) as f64;
        (px, py)
    };

    // 1. grid and tick labels
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let y = ymin + f * (ymax - ymin);
        let (_, py) = to_px(xmin, y);
        hline(img, x0, x1, py as u32, GRID);
        let label = if panel.log_y { format_number(10f64.powf(y)) } else { format_number(y) };
        let width = text_width(&label);
        draw_text(img, x0.saturating_sub(width + 6), (py as u32).saturating_sub(5), &label);
        let x = xmin + f * (xmax - xmin);
        let (px, _) = to_px(x, ymin);
        vline(img, px as u32, y0, y1, GRID);
        let label = format_number(x);
        draw_text(img, (px as u32).saturating_sub(text_width(&label) / 2), y1 + 8, &label);
    }
    // 2. axes
    hline(img, x0, x1, y1, INK);
    vline(img, x0, y0, y1, INK);
    // 3. the series
    for pair in finite.windows(2) {
        let (a, b) = (to_px(pair[0].0, pair[0].1), to_px(pair[1].0, pair[1].1));
        draw_line(img, a, b, LINE);
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Short labels: 3 significant digits, exponent notation for very small or large values.
pub fn format_number(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, colour);
    }
}

fn hline(img: &mut RgbImage, x0: u32, x1: u32, y: u32, colour: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x as i64, y as i64, colour);
    }
}

fn vline(img: &mut RgbImage, x: u32, y0: u32, y1: u32, colour: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x as i64, y as i64, colour);
    }
}

fn draw_line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), colour: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
        put(img, x.round() as i64, y.round() as i64, colour);
        put(img, x.round() as i64, y.round() as i64 + 1, colour);
    }
}

/// 3×5 glyphs, one row per 3-bit group (top row first), for the characters labels and titles use.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '=' => [0, 7, 0, 7, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        _ => [0; 5],
    }
}

/// Width in pixels of `text` drawn by [`draw_text`].
pub fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 4 * SCALE
}

/// Writes `text` in the 3×5 font, twice enlarged, with its top-left corner at (x, y).
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        let left = x + i as u32 * 4 * SCALE;
        for (row, bits) in rows.iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            let px = left + col * SCALE + dx;
                            put(img, px as i64, (y + row as u32 * SCALE + dy) as i64, INK);
                        }
                    }
                }
            }
        }
    }
}
