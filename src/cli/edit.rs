//! `imago edit`: image-to-image and inpainting on this machine.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use imago::diffusion::edit::{default_edit_size, EditInputs, EditParams};
use imago::diffusion::input::{check_mask_size, decode_image, decode_mask, fit_image, InputLimits};

use super::generate::{finish, load_model, progress_bar, request, GenerationArgs};

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The picture to edit (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// Inpainting mask of the same size: white = repaint, black = keep.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// How much to change: 0 keeps the input, 1 replaces it (default 0.6; 1.0 with a mask).
    #[arg(long)]
    pub strength: Option<f64>,
    /// Blur the mask edge by this many pixels (Gaussian sigma) when compositing.
    #[arg(long, default_value_t = 0.0)]
    pub mask_blur: f32,
    #[command(flatten)]
    pub common: GenerationArgs,
}

pub fn run(args: EditArgs) -> anyhow::Result<()> {
    let limits = InputLimits::default();
    let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let image = decode_image(&read(&args.image)?, &limits).with_context(|| args.image.display().to_string())?;
    let mask = match &args.mask {
        Some(path) => {
            let mask = decode_mask(&read(path)?, &limits).with_context(|| path.display().to_string())?;
            check_mask_size(&image, &mask)?;
            Some(mask)
        }
        None => None,
    };

    let (model, spec) = load_model(&args.common)?;
    let (native, _) = model.default_size();
    let size = default_edit_size(image.dimensions(), native, model.vae_scale_factor());
    let generate = model.params(request(&args.common, Some(size)))?;
    let (w, h) = (generate.width as u32, generate.height as u32);
    let image = fit_image(&image, w, h);
    let mask = mask.map(|m| fit_image(&m, w, h));
    let strength = args.strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.6 });
    let params = EditParams { generate, strength, mask_blur: args.mask_blur };
    let inputs = EditInputs { image: &image, mask: mask.as_ref() };

    let bar = progress_bar(params.generate.steps);
    let generated = model.edit(&params, &inputs, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();
    let extra =
        [("strength", strength.to_string()), ("mode", if mask.is_some() { "inpaint" } else { "img2img" }.to_string())];
    finish(&args.common, &spec, &params.generate, &generated, &extra)
}
