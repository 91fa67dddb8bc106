//! 2-D convolution: matrix products of our own for inference and training, candle's kernels (cuDNN on CUDA) for
//! the rest.
//!
//! candle 0.11's CPU `conv2d` rearranges the whole kernel and the input on every call, then builds im2col tiles
//! element by element before its matrix products: at a UNet's deep layers (1280 channels at 8×8 pixels, a 59 MB
//! kernel for a 64-pixel output) the rearranging costs several times the arithmetic, and at a VAE's large layers the
//! tile building costs more than half of it. For stride-1 inference on the CPU this module instead keeps the kernel
//! laid out once, taps outermost — (out channels, k·k, in channels) — and computes
//!
//! - 1×1 convolutions as one product of the kernel with the input's pixels;
//! - small outputs (no more pixels than out channels) as one product with the input's k·k shifted copies stacked,
//!   the whole batch in one few-column product ([`super::few_columns`]) at up to 8 pixels per image;
//! - larger outputs (from 16×16) of f32 layers with 3×3 kernels and at least 8 in channels by Winograd's F(4×4, 3×3)
//!   ([`super::winograd`]): 4× fewer multiply-adds than the direct convolution, the VAE decoder's main cost;
//! - larger outputs of other layers with at least 64 in and out channels as k·k products, one per kernel tap, each
//!   reading the zero-padded input at the tap's offset in place (the rows computed are padded-width long; the extra
//!   columns are dropped), summed;
//! - other small layers (up to [`MAX_STACKED_VALUES`] stacked values) again as one stacked product;
//! - anything else (strides, larger layers with few channels) with candle's kernel.
//!
//! While training (a tracked input or kernel), stride-1 layers unfold the whole batch into one product
//! ([`Method::Folded`]) built from tensor operations, so that autograd differentiates matrix products. candle's own
//! backward pass for a convolution is a direct transposed convolution for the input's gradient and one small product
//! per input channel for the kernel's; the folded form made the default model's training steps 1.4× (UNet) and
//! 1.75× (VAE) faster on one core.
//!
//! Each image of a batch gets the bits it would get alone: products of the shapes it would get alone, or few-column
//! products, whose sums do not depend on the other columns. Results differ from candle's by the order
//! of f32 additions and, on the Winograd path, by the transforms' rounding (up to about 1e-5 of the output's scale).
//!
//! On CUDA the cost to beat is not arithmetic but the host's time per call. candle asks cuDNN's heuristics for an
//! algorithm on every convolution (PyTorch asks once per shape and caches the answer), and with cuDNN 9 each query
//! costs up to milliseconds of CPU time: an SD 1.5 UNet step at 512² took 330–370 ms on an H200, no more at batch 4
//! than at 1, against 29 ms in diffusers. So stride-1 layers of up to
//! [`MAX_PIXELS_FOR_CUDA_PRODUCTS`] output pixels (all of SD 1.5's UNet at 512²) are one cuBLAS product per image
//! with the input's k·k shifted copies stacked (im2col), and the rest — a VAE's large layers and strided layers —
//! go to cuDNN with a fixed algorithm ([`CUDNN_ALGORITHM`]), asking nothing. Measured on the H200 (f16), each half
//! on its own: the fixed algorithm for every layer gave a UNet step of 112 ms and a VAE decode of 67 ms; candle's
//! im2col and cuBLAS for every layer (a build without cuDNN) gave 61 ms and 194 ms. This split takes the better of
//! each; it has not itself run on a GPU yet (`scripts/device-bench.sh` measures it).

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{DType, Module, Tensor};

use super::{few_columns, winograd};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A `Conv2d` with the same weights and names as `candle_nn::Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// candle's convolution, for GPUs and for strided or dilated convolutions. On the CPU its kernel is a
    /// view of `taps_first`, so the weights are held once.
    inner: candle_nn::Conv2d,
    /// CPU inference only: the kernel as (out channels, k·k, in channels), contiguous.
    taps_first: Option<Tensor>,
    kernel_size: usize,
}

/// A convolution with bias, read from `weight` and `bias` under `vb` (as `candle_nn::conv2d`).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel_size, config, vb)?;
    Conv2d::from_candle(inner, kernel_size)
}

/// Fewest in and out channels for the per-tap products: below, the k·k products and sums are too small to pay for
/// themselves (a miniature's 16-channel VAE runs faster in candle's kernel).
const MIN_CHANNELS_FOR_TAP_PRODUCTS: usize = 64;

/// Most values in the stacked copies (k·k · in channels · pixels) for which a layer with more pixels than out
/// channels, and not taken by Winograd, is still one stacked product: a miniature UNet's 8×8 layers run faster so
/// than in candle's kernel (UNet step 6.5 → 6.3 ms at 64×64). Larger stacks cost more to copy than they save.
const MAX_STACKED_VALUES: usize = 1 << 18;

/// Fewest in channels and output pixels for Winograd. Its cost is mostly the transforms, linear in the data, so it
/// pays off far earlier than the per-tap products (a miniature's 16-channel VAE included), but not on the few
/// tiles of a small latent, where the stacked product or candle's kernel stays faster.
const MIN_CHANNELS_FOR_WINOGRAD: usize = 8;
const MIN_PIXELS_FOR_WINOGRAD: usize = 256;

/// Most output pixels for which a CUDA convolution is a product of our own (64×64: SD 1.x and 2.x latents at
/// 512²). Above, the stacked copies grow with the pixels while cuDNN's per-call cost does not.
const MAX_PIXELS_FOR_CUDA_PRODUCTS: usize = 64 * 64;

/// cuDNN's algorithm for f16 and f32 convolutions, given to candle so that no heuristic query runs per call.
/// Implicit precomputed GEMM covers the kernel sizes, strides and paddings these models use, in both types; on the
/// H200 it ran the VAE decode (512², f16) in 67 ms against 73 ms with the heuristics' choices and 160 ms with plain
/// implicit GEMM. Other types (bf16) keep the heuristics rather than risk an unsupported pairing.
const CUDNN_ALGORITHM: CudnnFwdAlgo = CudnnFwdAlgo::ImplicitPrecompGemm;

/// Which of this module's computations a call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Candle,
    Pointwise,
    StackedTaps,
    Winograd,
    TapProducts,
    /// CUDA: the kernel as stored, (out, in·k·k), times the unfolded input, one product per image.
    Unfolded,
    /// Training: the kernel as stored times the unfolded input of the whole batch, one product.
    Folded,
}

impl Conv2d {
    fn from_candle(inner: candle_nn::Conv2d, kernel_size: usize) -> candle_core::Result<Self> {
        let weight = inner.weight();
        if weight.device().is_cuda() && !weight.track_op() && matches!(weight.dtype(), DType::F16 | DType::F32) {
            let config = Conv2dConfig { cudnn_fwd_algo: Some(CUDNN_ALGORITHM), ..*inner.config() };
            let inner = candle_nn::Conv2d::new(weight.clone(), inner.bias().cloned(), config);
            return Ok(Self { inner, taps_first: None, kernel_size });
        }
        if !weight.device().is_cpu() || weight.track_op() {
            return Ok(Self { inner, taps_first: None, kernel_size });
        }
        let (out_channels, in_channels, k, _) = weight.dims4()?;
        let taps_first = weight.permute((0, 2, 3, 1))?.contiguous()?.reshape((out_channels, k * k, in_channels))?;
        let viewed = taps_first.reshape((out_channels, k, k, in_channels))?.permute((0, 3, 1, 2))?;
        let inner = candle_nn::Conv2d::new(viewed, inner.bias().cloned(), *inner.config());
        Ok(Self { inner, taps_first: Some(taps_first), kernel_size })
    }

    fn method(&self, xs: &Tensor) -> candle_core::Result<Method> {
        let config = self.inner.config();
        let plain = config.groups == 1 && config.dilation == 1 && config.stride == 1;
        let (_, in_channels, height, width) = xs.dims4()?;
        let (k, pad) = (self.kernel_size, config.padding);
        if !plain || height + 2 * pad < k || width + 2 * pad < k {
            return Ok(Method::Candle);
        }
        if xs.track_op() || self.inner.weight().track_op() {
            return Ok(Method::Folded);
        }
        let (out_h, out_w) = self.output_size(height, width);
        let pixels = out_h * out_w;
        if xs.device().is_cuda() {
            return Ok(if pixels <= MAX_PIXELS_FOR_CUDA_PRODUCTS { Method::Unfolded } else { Method::Candle });
        }
        let Some(taps_first) = &self.taps_first else { return Ok(Method::Candle) };
        if !xs.device().is_cpu() {
            return Ok(Method::Candle);
        }
        let out_channels = taps_first.dim(0)?;
        Ok(if k == 1 && pad == 0 {
            Method::Pointwise
        } else if pixels <= out_channels {
            Method::StackedTaps
        } else if k == 3
            && in_channels >= MIN_CHANNELS_FOR_WINOGRAD
            && pixels >= MIN_PIXELS_FOR_WINOGRAD
            && winograd::supports(xs, taps_first)
        {
            // Its cost is mostly the input's transform, so a few out channels (a VAE's RGB output) still pay off.
            Method::Winograd
        } else if k * k * in_channels * pixels <= MAX_STACKED_VALUES {
            Method::StackedTaps
        } else if in_channels.min(out_channels) >= MIN_CHANNELS_FOR_TAP_PRODUCTS {
            Method::TapProducts
        } else {
            Method::Candle
        })
    }

    /// `kernel` (out, n) times each image of `input` (batch, n, pixels) → (batch, out, pixels): one product per
    /// image, or at a few pixels per image one few-column product for the whole batch (each image still gets the
    /// bits it gets alone).
    fn product(kernel: &Tensor, input: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, n, pixels) = input.dims3()?;
        if few_columns::applies(kernel, input, pixels) {
            let columns = input.transpose(1, 2)?.reshape((batch * pixels, n))?;
            let out = few_columns::rows_times(kernel, &columns)?;
            return out.reshape((batch, pixels, ()))?.transpose(1, 2)?.contiguous();
        }
        kernel.broadcast_left(batch)?.matmul(input)
    }

    fn forward_cpu(&self, xs: &Tensor, taps_first: &Tensor, method: Method) -> candle_core::Result<Tensor> {
        let (batch, in_channels, height, width) = xs.dims4()?;
        let (out_channels, taps, _) = taps_first.dims3()?;
        let (k, pad) = (self.kernel_size, self.inner.config().padding);
        let (out_h, out_w) = self.output_size(height, width);
        let out = match method {
            Method::Pointwise => {
                let pixels = xs.reshape((batch, in_channels, out_h * out_w))?;
                Self::product(&taps_first.reshape((out_channels, in_channels))?, &pixels)?.reshape((
                    batch,
                    out_channels,
                    out_h,
                    out_w,
                ))?
            }
            Method::StackedTaps => {
                let shifted = tap_windows(xs, k, pad, out_h, out_w)?;
                // (batch, k·k, in channels, out_h, out_w): the kernel's (tap, in channel) order
                let stacked = Tensor::stack(&shifted, 1)?.reshape((batch, taps * in_channels, out_h * out_w))?;
                Self::product(&taps_first.reshape((out_channels, taps * in_channels))?, &stacked)?.reshape((
                    batch,
                    out_channels,
                    out_h,
                    out_w,
                ))?
            }
            Method::TapProducts => {
                // Rows of the padded width: output (y, x) sits at y·padded_w + x and tap (dy, dx) reads the padded
                // input at that index + dy·padded_w + dx. One extra zero row keeps the last row's reads in bounds.
                let padded_w = width + 2 * pad;
                let padded = xs.pad_with_zeros(2, pad, pad + 1)?.pad_with_zeros(3, pad, pad)?;
                let flat = padded.reshape((batch, in_channels, ()))?;
                let mut sum: Option<Tensor> = None;
                for t in 0..taps {
                    let input = flat.narrow(2, (t / k) * padded_w + t % k, out_h * padded_w)?;
                    let part = Self::product(&taps_first.narrow(1, t, 1)?.squeeze(1)?, &input)?;
                    sum = Some(match sum {
                        Some(sum) => (sum + part)?,
                        None => part,
                    });
                }
                let sum = sum.ok_or_else(|| candle_core::Error::Msg("convolution kernel without taps".into()))?;
                sum.reshape((batch, out_channels, out_h, padded_w))?.narrow(3, 0, out_w)?.contiguous()?
            }
            Method::Winograd => return winograd::conv3x3(xs, taps_first, self.inner.bias(), pad),
            Method::Candle | Method::Unfolded | Method::Folded => return self.inner.forward(xs),
        };
        self.add_bias(out)
    }

    /// [`Method::Unfolded`]: im2col as tensor operations and one product per image, on any device. The stacked
    /// copies follow the stored kernel's (in channel, tap) order, so the kernel is used as loaded.
    fn forward_unfolded(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, in_channels, height, width) = xs.dims4()?;
        let weight = self.inner.weight();
        let out_channels = weight.dim(0)?;
        let (k, pad) = (self.kernel_size, self.inner.config().padding);
        let (out_h, out_w) = self.output_size(height, width);
        let columns = if k == 1 && pad == 0 {
            xs.reshape((batch, in_channels, height * width))?
        } else {
            Tensor::stack(&tap_windows(xs, k, pad, out_h, out_w)?, 2)?.reshape((
                batch,
                in_channels * k * k,
                out_h * out_w,
            ))?
        };
        let kernel = weight.reshape((out_channels, in_channels * k * k))?;
        self.add_bias(Self::product(&kernel, &columns)?.reshape((batch, out_channels, out_h, out_w))?)
    }

    /// [`Method::Folded`]: im2col with the batch folded into the columns, (in·k·k, batch·pixels), so that the
    /// forward pass is one product and autograd's gradients are two more. candle's own backward pass runs a direct
    /// transposed convolution and one small product per input channel, and a per-image product would need a sum
    /// over the broadcast kernel's batch axis, which candle's reductions do slowly.
    fn forward_folded(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, in_channels, height, width) = xs.dims4()?;
        let weight = self.inner.weight();
        let out_channels = weight.dim(0)?;
        let (k, pad) = (self.kernel_size, self.inner.config().padding);
        let (out_h, out_w) = self.output_size(height, width);
        let channels_first = xs.transpose(0, 1)?;
        let columns = if k == 1 && pad == 0 {
            channels_first.contiguous()?.reshape((in_channels, batch * height * width))?
        } else {
            Tensor::stack(&tap_windows(&channels_first, k, pad, out_h, out_w)?, 1)?
                .reshape((in_channels * k * k, batch * out_h * out_w))?
        };
        let mut out = weight.reshape((out_channels, in_channels * k * k))?.matmul(&columns)?;
        if let Some(bias) = self.inner.bias() {
            // Added here, where its gradient is a sum along contiguous rows.
            out = out.broadcast_add(&bias.reshape((out_channels, 1))?)?;
        }
        out.reshape((out_channels, batch, out_h, out_w))?.transpose(0, 1)?.contiguous()
    }

    /// The output's (height, width) for an input of `height` × `width`, at stride 1 (the only stride our own paths
    /// take); callers have checked that the padded input is at least the kernel's size.
    fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (k, pad) = (self.kernel_size, self.inner.config().padding);
        (height + 2 * pad + 1 - k, width + 2 * pad + 1 - k)
    }

    fn add_bias(&self, out: Tensor) -> candle_core::Result<Tensor> {
        match self.inner.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(out),
        }
    }
}

/// The input's last two axes zero-padded by `pad`, seen through each of the k·k kernel taps (row-major) as an
/// (out_h, out_w) window: the shifted copies that im2col stacks.
fn tap_windows(xs: &Tensor, k: usize, pad: usize, out_h: usize, out_w: usize) -> candle_core::Result<Vec<Tensor>> {
    let padded = xs.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    (0..k * k).map(|t| padded.narrow(2, t / k, out_h)?.narrow(3, t % k, out_w)).collect()
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match (&self.taps_first, self.method(xs)?) {
            (_, Method::Candle) => self.inner.forward(xs),
            (_, Method::Unfolded) => self.forward_unfolded(xs),
            (_, Method::Folded) => self.forward_folded(xs),
            (Some(taps_first), method) => self.forward_cpu(xs, taps_first, method),
            (None, _) => self.inner.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// A layer with random, untracked weights (a VarMap's variables are tracked, which keeps candle's kernel).
    fn layer(cin: usize, cout: usize, k: usize, config: Conv2dConfig) -> Conv2d {
        let weight = Tensor::randn(0f32, 0.3, (cout, cin, k, k), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.3, cout, &Device::Cpu).unwrap();
        Conv2d::from_candle(candle_nn::Conv2d::new(weight, Some(bias), config), k).unwrap()
    }

    fn padded(padding: usize) -> Conv2dConfig {
        Conv2dConfig { padding, ..Default::default() }
    }

    /// candle's own kernel on the kernel as loaded (not a rearranged view of it).
    fn candles_convolution(conv: &Conv2d, xs: &Tensor) -> Tensor {
        let original = conv.inner.weight().contiguous().unwrap();
        candle_nn::Conv2d::new(original, conv.inner.bias().cloned(), *conv.inner.config()).forward(xs).unwrap()
    }

    /// Largest difference relative to the output's scale: Winograd's transforms round more than a direct sum does.
    fn relative_error(got: &Tensor, expected: &Tensor) -> f32 {
        assert_eq!(got.dims(), expected.dims());
        let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        max_diff(got, expected) / scale
    }

    #[test]
    fn every_method_equals_candles_convolution_with_the_original_kernel() {
        let cases = [
            (1, padded(0), 6, 5, 8, Method::Pointwise),
            (1, padded(0), 6, 2, 8, Method::Pointwise),
            (3, padded(1), 6, 4, 64, Method::StackedTaps),
            (3, padded(0), 6, 4, 64, Method::StackedTaps),
            (3, padded(1), 64, 17, 64, Method::Winograd),
            (3, padded(0), 64, 19, 64, Method::Winograd),
            (3, padded(1), 64, 17, 72, Method::Winograd),
            (3, padded(1), 64, 17, 3, Method::Winograd),
            (3, padded(1), 8, 18, 16, Method::Winograd),
            (3, padded(1), 6, 17, 64, Method::StackedTaps),
            (3, padded(1), 32, 9, 32, Method::StackedTaps),
            (5, padded(2), 64, 9, 64, Method::StackedTaps),
            (5, padded(2), 64, 17, 64, Method::TapProducts),
            (3, padded(1), 6, 9, 16, Method::StackedTaps),
            (3, padded(1), 6, 72, 16, Method::Candle),
        ];
        for (k, config, cin, size, cout, method) in cases {
            let conv = layer(cin, cout, k, config);
            let xs = Tensor::randn(0f32, 1.0, (2, cin, size, size), &Device::Cpu).unwrap();
            assert_eq!(conv.method(&xs).unwrap(), method, "k {k} size {size}");
            let error = relative_error(&conv.forward(&xs).unwrap(), &candles_convolution(&conv, &xs));
            // Winograd's transforms round more: up to 1.1e-5 of the output's scale over random draws.
            let tolerance = if method == Method::Winograd { 3e-5 } else { 1e-5 };
            assert!(error < tolerance, "{method:?} k {k}: relative error {error}");
        }
    }

    #[test]
    fn a_few_pixel_convolution_gives_each_image_exactly_what_it_gives_alone() {
        // 2×2 and 1×1 outputs: the few-column product for the whole batch.
        for (k, pad, size) in [(3, 1, 2), (3, 0, 3), (1, 0, 2)] {
            let conv = layer(16, 24, k, padded(pad));
            let xs = Tensor::randn(0f32, 1.0, (5, 16, size, size), &Device::Cpu).unwrap();
            let batched = conv.forward(&xs).unwrap();
            for i in 0..5 {
                let alone = conv.forward(&xs.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&batched.narrow(0, i, 1).unwrap(), &alone), 0.0, "k {k} size {size} image {i}");
            }
        }
    }

    /// The CUDA path's arithmetic, checked on the CPU (the computation is device-independent tensor operations).
    #[test]
    fn the_unfolded_product_equals_candles_convolution() {
        for (k, pad, cin, size, cout) in [(1, 0, 6, 5, 8), (3, 1, 6, 7, 16), (3, 0, 5, 6, 4), (3, 1, 32, 8, 24)] {
            let conv = layer(cin, cout, k, padded(pad));
            let xs = Tensor::randn(0f32, 1.0, (2, cin, size, size), &Device::Cpu).unwrap();
            let error = relative_error(&conv.forward_unfolded(&xs).unwrap(), &candles_convolution(&conv, &xs));
            assert!(error < 1e-5, "k {k} pad {pad} size {size}: relative error {error}");
        }
    }

    #[test]
    fn each_image_of_a_batch_gets_what_it_gets_alone() {
        for (cin, size, cout) in [(6, 4, 64), (64, 17, 64), (16, 18, 16), (6, 5, 8)] {
            let conv = layer(cin, cout, 3, padded(1));
            let xs = Tensor::randn(0f32, 1.0, (3, cin, size, size), &Device::Cpu).unwrap();
            let batched = conv.forward(&xs).unwrap();
            for i in 0..3 {
                let alone = conv.forward(&xs.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&batched.narrow(0, i, 1).unwrap(), &alone), 0.0, "image {i}, size {size}");
            }
        }
    }

    #[test]
    fn strides_and_small_layers_keep_candles_kernel_and_training_folds() {
        let strided = layer(6, 64, 3, Conv2dConfig { padding: 1, stride: 2, ..Default::default() });
        let xs = Tensor::randn(0f32, 1.0, (1, 6, 8, 8), &Device::Cpu).unwrap();
        assert_eq!(strided.method(&xs).unwrap(), Method::Candle);
        assert!(max_diff(&strided.forward(&xs).unwrap(), &candles_convolution(&strided, &xs)) < 1e-5);

        let varmap = candle_nn::VarMap::new();
        let training = conv2d(6, 64, 3, padded(1), vb_for(&varmap).pp("plain")).unwrap();
        assert!(training.taps_first.is_none());
        assert_eq!(training.method(&xs).unwrap(), Method::Folded);
        let strided_config = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
        let strided_training = conv2d(6, 64, 3, strided_config, vb_for(&varmap).pp("strided")).unwrap();
        assert_eq!(strided_training.method(&xs).unwrap(), Method::Candle);
    }

    fn vb_for(varmap: &candle_nn::VarMap) -> VarBuilder<'static> {
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
    }

    /// The training path's output and its gradients for the input, the kernel and the bias, against candle's
    /// convolution and candle's own backward pass for it.
    #[test]
    fn the_folded_product_and_its_gradients_equal_candles() {
        for (k, pad, cin, size, cout) in [(3, 1, 6, 8, 16), (3, 0, 5, 7, 4), (1, 0, 8, 5, 12), (3, 1, 16, 4, 32)] {
            let varmap = candle_nn::VarMap::new();
            let ours = conv2d(cin, cout, k, padded(pad), vb_for(&varmap).pp("conv")).unwrap();
            let weight = ours.inner.weight().clone();
            let bias = ours.inner.bias().unwrap().clone();
            // The bias starts at zero: give it values so that its gradient's path matters.
            let vars = varmap.all_vars();
            for var in &vars {
                var.set(&Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap()).unwrap();
            }
            let candles = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), padded(pad));
            let input = candle_core::Var::randn(0f32, 1.0, (3, cin, size, size), &Device::Cpu).unwrap();
            assert_eq!(ours.method(input.as_tensor()).unwrap(), Method::Folded);

            let ours_out = ours.forward(input.as_tensor()).unwrap();
            let candles_out = candles.forward(input.as_tensor()).unwrap();
            assert!(relative_error(&ours_out, &candles_out) < 1e-5, "k {k} size {size}: forward");

            // A loss that weighs every output differently, so that a transposed or misplaced gradient shows.
            let probe = Tensor::randn(0f32, 1.0, ours_out.shape(), &Device::Cpu).unwrap();
            let ours_grads = (ours_out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let candles_grads = (candles_out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, tensor) in [("input", input.as_tensor()), ("weight", &weight), ("bias", &bias)] {
                let (got, expected) = (ours_grads.get(tensor).unwrap(), candles_grads.get(tensor).unwrap());
                assert!(relative_error(got, expected) < 1e-5, "k {k} size {size}: gradient of the {name}");
            }
        }
    }
}
