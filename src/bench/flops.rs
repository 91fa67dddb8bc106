//! Floating-point work of one UNet evaluation, counted analytically from its config, and the peak rates of known
//! accelerators: together they turn a measured step time into achieved TFLOP/s and a fraction of the device peak.
//!
//! Counted are the matrix products, 2 FLOPs per multiply-accumulate, as PyTorch's `FlopCounterMode` counts them:
//! convolutions, linear layers (biases excluded) and attention's two batched products (scores and weighted
//! values). Norms, activations, softmax and additions are left out: they are memory-bound and small. The counts
//! match `FlopCounterMode` on diffusers' `UNet2DConditionModel` exactly (see the tests).

use std::path::Path;

use candle_core::DType;

use crate::diffusion::config::{BlockKind, UNetConfig};
use crate::diffusion::Result;

/// The input of one UNet evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UNetInput {
    /// Latent height and width (image side / 8).
    pub latent_height: usize,
    pub latent_width: usize,
    /// Batch rows of the call: images × 2 under classifier-free guidance.
    pub rows: usize,
    /// Text tokens attended to (77 for every CLIP encoder).
    pub context_tokens: usize,
}

/// FLOPs of a convolution producing `out_h × out_w` pixels.
fn conv(cin: usize, cout: usize, kernel: usize, (out_h, out_w): (usize, usize)) -> u64 {
    2 * (cin * cout * kernel * kernel * out_h * out_w) as u64
}

/// FLOPs of a linear layer applied to `tokens` vectors.
fn linear(inputs: usize, outputs: usize, tokens: usize) -> u64 {
    2 * (inputs * outputs * tokens) as u64
}

/// Output side of a 3×3, stride-2 convolution with `padding`.
fn downsampled(side: usize, padding: usize) -> usize {
    (side + 2 * padding).saturating_sub(3) / 2 + 1
}

/// The per-row counts of the UNet's parts, sharing the widths every block uses.
struct Counter {
    temb: usize,
    context_dim: usize,
    tokens: usize,
}

impl Counter {
    fn resnet(&self, cin: usize, cout: usize, size: (usize, usize)) -> u64 {
        let shortcut = if cin != cout { conv(cin, cout, 1, size) } else { 0 };
        conv(cin, cout, 3, size) + linear(self.temb, cout, 1) + conv(cout, cout, 3, size) + shortcut
    }

    /// `Transformer2DModel` over `h·w` tokens of width `c`: projections in and out, then per layer self-attention,
    /// cross-attention to the text and the GEGLU feed-forward (c → 8c, 4c → c).
    fn transformer(&self, c: usize, layers: usize, (h, w): (usize, usize)) -> u64 {
        let n = h * w;
        let t = self.tokens;
        let self_attention = 4 * linear(c, c, n) + 2 * linear(n, n, c);
        let cross_attention = 2 * linear(c, c, n) + 2 * linear(self.context_dim, c, t) + 2 * linear(n, t, c);
        let feed_forward = linear(c, 8 * c, n) + linear(4 * c, c, n);
        2 * linear(c, c, n) + layers as u64 * (self_attention + cross_attention + feed_forward)
    }
}

/// FLOPs of one evaluation of the UNet `config` on `input`, counted as described in the module docs.
pub fn unet_flops(config: &UNetConfig, input: UNetInput) -> Result<u64> {
    let plan = config.plan(Path::new("unet/config.json"))?;
    let channels = &config.block_out_channels;
    let last = channels.len() - 1;
    let counter =
        Counter { temb: 4 * channels[0], context_dim: config.cross_attention_dim, tokens: input.context_tokens };
    let layers =
        |level: usize, kind: BlockKind| if kind == BlockKind::CrossAttn { plan.transformer_layers[level] } else { 0 };

    // The spatial size of every level on the way down; the up path comes back through the same sizes.
    let mut sizes = vec![(input.latent_height, input.latent_width)];
    for _ in 0..last {
        let (h, w) = sizes[sizes.len() - 1];
        sizes.push((downsampled(h, config.downsample_padding), downsampled(w, config.downsample_padding)));
    }

    let mut flops = linear(channels[0], counter.temb, 1) + linear(counter.temb, counter.temb, 1);
    if let (true, Some(input_dim)) = (config.has_text_time_embedding(), config.projection_class_embeddings_input_dim) {
        flops += linear(input_dim, counter.temb, 1) + linear(counter.temb, counter.temb, 1);
    }
    flops += conv(config.in_channels, channels[0], 3, sizes[0]);

    for (level, &kind) in plan.down.iter().enumerate() {
        let out = channels[level];
        for layer in 0..config.layers_per_block {
            let cin = if layer > 0 { out } else { channels[level.saturating_sub(1)] };
            flops += counter.resnet(cin, out, sizes[level]);
            if kind == BlockKind::CrossAttn {
                flops += counter.transformer(out, layers(level, kind), sizes[level]);
            }
        }
        if level < last {
            flops += conv(out, out, 3, sizes[level + 1]);
        }
    }

    let c = channels[last];
    flops += 2 * counter.resnet(c, c, sizes[last]) + counter.transformer(c, plan.transformer_layers[last], sizes[last]);

    let mut prev_out = c;
    for (i, &kind) in plan.up.iter().enumerate() {
        let level = last - i;
        let out = channels[level];
        let layers_here = config.layers_per_block + 1;
        for layer in 0..layers_here {
            let skip = if layer + 1 == layers_here { channels[level.saturating_sub(1)] } else { out };
            let cin = if layer == 0 { prev_out } else { out };
            flops += counter.resnet(cin + skip, out, sizes[level]);
            if kind == BlockKind::CrossAttn {
                flops += counter.transformer(out, layers(level, kind), sizes[level]);
            }
        }
        if level > 0 {
            flops += conv(out, out, 3, sizes[level - 1]);
        }
        prev_out = out;
    }

    flops += conv(channels[0], config.out_channels, 3, sizes[0]);
    Ok(flops * input.rows as u64)
}

/// Dense peak TFLOP/s of a known accelerator for `dtype` (tensor cores for f16/bf16, CUDA cores for f32), from the
/// vendor's data sheet; `None` when the device is not in the table (the CPU among them).
pub fn device_peak_tflops(device_name: &str, dtype: DType) -> Option<f64> {
    let name = device_name.to_ascii_uppercase();
    // (name fragment, f16/bf16 dense, f32)
    const PEAKS: [(&str, f64, f64); 3] = [("H200", 989.0, 67.0), ("H100", 989.0, 67.0), ("A100", 312.0, 19.5)];
    let (_, half, single) = PEAKS.iter().find(|(fragment, _, _)| name.contains(fragment))?;
    match dtype {
        DType::F16 | DType::BF16 => Some(*half),
        DType::F32 => Some(*single),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::full_size::unet_config;
    use crate::diffusion::tiny::TinyFamily;

    fn input(h: usize, w: usize, rows: usize) -> UNetInput {
        UNetInput { latent_height: h, latent_width: w, rows, context_tokens: 77 }
    }

    // The published configs (diffusion::full_size). Reference values: torch.utils.flop_counter.FlopCounterMode around one forward of diffusers 0.42.1's
    // UNet2DConditionModel built from the same config (on the meta device), batch 1, 77 text tokens.
    #[test]
    fn sd15_counts_equal_pytorchs_flop_counter() {
        let sd15 = unet_config(TinyFamily::Sd15);
        assert_eq!(unet_flops(&sd15, input(64, 64, 1)).unwrap(), 803_273_441_280);
        assert_eq!(unet_flops(&sd15, input(16, 16, 1)).unwrap(), 45_846_958_080);
        // odd latent sides: the down path rounds up, the up path returns to the skip sizes
        assert_eq!(unet_flops(&sd15, input(15, 13, 1)).unwrap(), 40_538_598_400);
    }

    #[test]
    fn sdxl_counts_equal_pytorchs_flop_counter() {
        assert_eq!(unet_flops(&unet_config(TinyFamily::Sdxl), input(128, 128, 1)).unwrap(), 6_761_236_398_080);
    }

    #[test]
    fn sd21_counts_equal_pytorchs_flop_counter() {
        assert_eq!(unet_flops(&unet_config(TinyFamily::Sd21), input(96, 96, 1)).unwrap(), 2_149_105_745_920);
    }

    #[test]
    fn work_grows_linearly_with_rows() {
        let sd15 = unet_config(TinyFamily::Sd15);
        let one = unet_flops(&sd15, input(64, 64, 1)).unwrap();
        assert_eq!(unet_flops(&sd15, input(64, 64, 2)).unwrap(), 2 * one);
    }

    #[test]
    fn peaks_are_known_for_hopper_and_unknown_for_the_cpu() {
        assert_eq!(device_peak_tflops("NVIDIA H200", DType::BF16), Some(989.0));
        assert_eq!(device_peak_tflops("NVIDIA H100 80GB HBM3", DType::F16), Some(989.0));
        assert_eq!(device_peak_tflops("NVIDIA H100 80GB HBM3", DType::F32), Some(67.0));
        assert_eq!(device_peak_tflops("cpu", DType::F32), None);
    }
}
