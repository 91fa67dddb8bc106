//! Draws a picture grid of the default model: one row per caption, one column per seed, with the caption written
//! beside each row. The README's grid is this command's output:
//!
//! ```text
//! cargo run --release --example default_grid -- --out docs/default-grid.png
//! ```

#[path = "train_default/plot.rs"]
#[allow(dead_code)]
mod plot;
#[path = "train_default/scenes.rs"]
#[allow(dead_code)]
mod scenes;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use image::{imageops, Rgb, RgbImage};
use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::image_io::tensor_to_images;
use imago::diffusion::model::{DiffusionModel, LoadOptions};
use imago::diffusion::pipeline::GenerateRequest;
use scenes::{CaptionParts, Position, Scene, Shape, Size, BACKGROUNDS, SHAPE_COLOURS};

/// Picture grid of the default model.
#[derive(Debug, Parser)]
struct Args {
    /// Model folder (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, default_value = "docs/default-grid.png")]
    out: PathBuf,
    /// Columns: seeds 0, 1, … per caption.
    #[arg(long, default_value_t = 8)]
    seeds: usize,
    /// Each 32×32 picture is enlarged this many times (nearest neighbour).
    #[arg(long, default_value_t = 2)]
    zoom: u32,
}

/// Every shape on every background, colours taking turns; then captions naming size and position.
fn captions() -> Vec<String> {
    let scene = |shape, colour, background, size, position| Scene {
        shape,
        colour,
        background,
        size,
        position,
        radius: 0.0,
        centre: (0.5, 0.5),
    };
    let mut out = Vec::new();
    let mut colour = 0;
    for shape in Shape::ALL {
        for background in 0..BACKGROUNDS.len() {
            let s = scene(shape, colour % SHAPE_COLOURS.len(), background, Size::Large, Position::Center);
            out.push(s.caption(CaptionParts { size: false, position: false }));
            colour += 1;
        }
    }
    let named = [
        scene(Shape::Circle, 0, 0, Size::Small, Position::TopLeft),
        scene(Shape::Star, 3, 1, Size::Large, Position::Center),
        scene(Shape::Square, 2, 2, Size::Small, Position::BottomRight),
        scene(Shape::Triangle, 4, 1, Size::Small, Position::TopRight),
    ];
    out.extend(named.iter().map(|s| s.caption(CaptionParts { size: true, position: true })));
    out
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = match args.model {
        Some(dir) => dir,
        None => default_model_dir().context("models/default not found: pass --model")?,
    };
    let model =
        DiffusionModel::load(&dir, &LoadOptions::cpu()).with_context(|| format!("loading {}", dir.display()))?;
    let captions = captions();
    let cell = 32 * args.zoom;
    let gap = 4;
    let label_width = captions.iter().map(|c| plot::text_width(c)).max().unwrap_or(0) + 12;
    let width = label_width + args.seeds as u32 * (cell + gap);
    let height = captions.len() as u32 * (cell + gap) + gap;
    let mut grid = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (row, caption) in captions.iter().enumerate() {
        let request = GenerateRequest { prompt: caption.clone(), seed: 0, batch: args.seeds, ..Default::default() };
        let params = model.params(request)?;
        let images = tensor_to_images(&model.generate(&params, &mut |_| true)?.images)?;
        let top = gap + row as u32 * (cell + gap);
        plot::draw_text(&mut grid, 6, top + cell / 2 - 5, caption);
        for (column, image) in images.iter().enumerate() {
            let big = imageops::resize(image, cell, cell, imageops::FilterType::Nearest);
            imageops::replace(&mut grid, &big, (label_width + column as u32 * (cell + gap)) as i64, top as i64);
        }
        eprintln!("{caption}");
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    grid.save(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {} ({} captions × {} seeds)", args.out.display(), captions.len(), args.seeds);
    Ok(())
}
