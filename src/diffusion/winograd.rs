//! 3×3 stride-1 convolutions on the CPU by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016).
//!
//! A direct 3×3 convolution spends 9 multiply-adds per output pixel and (in, out) channel pair. Winograd's
//! algorithm transforms each 6×6 input tile and the 3×3 kernel into a 6×6 domain where the convolution of a 4×4
//! output tile is 36 element-wise products, then transforms back: 36 / 16 = 2.25 multiply-adds per pixel, 4× fewer.
//! Summed over the input channels, each of the 36 element-wise products is one matrix product of the transformed
//! kernel (out × in) with the transformed input (in × tiles), which is where the time goes; the transforms are
//! additions over the data, linear in its size.
//!
//! The kernel is transformed on every call rather than kept: transformed, it is 4× the size of the kernel (36 values
//! for 9), gigabytes for a full-size UNet, while transforming it costs a few microseconds per thousand weights.
//!
//! F(4×4, 3×3) adds rounding error of a few millionths of the output's scale in f32 (measured 4e-6 to 7e-6 with 64
//! input channels; the transforms' constants are small integers and fractions of 6 and 24). The tests bound it
//! against candle's direct convolution.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::host::{vectorized, with_f32_slice};

/// Output tile side.
const TILE: usize = 4;
/// Input tile side: an output tile plus the kernel's reach.
const SPAN: usize = TILE + 2;
/// Element-wise products per tile, one matrix product each.
const POINTS: usize = SPAN * SPAN;

/// Bᵀ·d: the input transform of one line of 6 values.
#[inline(always)]
fn input_line(d: [f32; SPAN]) -> [f32; SPAN] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * d[1] - 4.0 * d[2] + d[3] + d[4],
        4.0 * d[1] - 4.0 * d[2] - d[3] + d[4],
        -2.0 * d[1] - d[2] + 2.0 * d[3] + d[4],
        2.0 * d[1] - d[2] - 2.0 * d[3] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// G·g: the kernel transform of one line of 3 weights.
#[inline(always)]
fn kernel_line(g: [f32; 3]) -> [f32; SPAN] {
    [
        g[0] / 4.0,
        -(g[0] + g[1] + g[2]) / 6.0,
        -(g[0] - g[1] + g[2]) / 6.0,
        g[0] / 24.0 + g[1] / 12.0 + g[2] / 6.0,
        g[0] / 24.0 - g[1] / 12.0 + g[2] / 6.0,
        g[2],
    ]
}

/// Aᵀ·m: the output transform of one line of 6 products.
#[inline(always)]
fn output_line(m: [f32; SPAN]) -> [f32; TILE] {
    [
        m[0] + m[1] + m[2] + m[3] + m[4],
        m[1] - m[2] + 2.0 * m[3] - 2.0 * m[4],
        m[1] + m[2] + 4.0 * m[3] + 4.0 * m[4],
        m[1] - m[2] + 8.0 * m[3] - 8.0 * m[4] + m[5],
    ]
}

/// Whether a convolution with this input and kernel can take this module's path.
pub fn supports(xs: &Tensor, kernel_taps_first: &Tensor) -> bool {
    xs.dtype() == DType::F32
        && kernel_taps_first.dtype() == DType::F32
        && matches!(kernel_taps_first.dims3(), Ok((_, 9, _)))
}

/// The kernel (out, 9 taps, in) transformed into (out, 36, in): for each (out, in) pair, G·g·Gᵀ.
fn transform_kernel(taps_first: &Tensor) -> Result<Tensor> {
    let (out_channels, _, in_channels) = taps_first.dims3()?;
    let transformed = with_f32_slice(taps_first, |weights| {
        let mut transformed = vec![0f32; out_channels * POINTS * in_channels];
        transformed.par_chunks_mut(POINTS * in_channels).enumerate().for_each(|(k, block)| {
            let kernel = &weights[k * 9 * in_channels..(k + 1) * 9 * in_channels];
            vectorized!(kernel_block(kernel, block, in_channels));
        });
        Ok(transformed)
    })?;
    Tensor::from_vec(transformed, (out_channels, POINTS, in_channels), &Device::Cpu)
}

/// One output channel's kernel: 9 lines over the input channels (tap-major) into 36.
#[inline(always)]
fn kernel_block(kernel: &[f32], block: &mut [f32], in_channels: usize) {
    let tap = |index: usize| &kernel[index * in_channels..(index + 1) * in_channels];
    // G·g: for each kernel column, its 3 rows into 6, over all input channels at once.
    let mut half = vec![0f32; SPAN * 3 * in_channels];
    for col in 0..3 {
        let (r0, r1, r2) = (tap(col), tap(3 + col), tap(6 + col));
        for c in 0..in_channels {
            let line = kernel_line([r0[c], r1[c], r2[c]]);
            for (row, value) in line.into_iter().enumerate() {
                half[(row * 3 + col) * in_channels + c] = value;
            }
        }
    }
    // (G·g)·Gᵀ: each of the 6 rows' 3 columns into 6.
    for row in 0..SPAN {
        let column = |col: usize| &half[(row * 3 + col) * in_channels..(row * 3 + col + 1) * in_channels];
        let (c0, c1, c2) = (column(0), column(1), column(2));
        let out = &mut block[row * SPAN * in_channels..(row + 1) * SPAN * in_channels];
        for c in 0..in_channels {
            let line = kernel_line([c0[c], c1[c], c2[c]]);
            for (col, value) in line.into_iter().enumerate() {
                out[col * in_channels + c] = value;
            }
        }
    }
}

/// The geometry of one convolution call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    pad: usize,
    out_h: usize,
    out_w: usize,
    tiles_y: usize,
    tiles_x: usize,
}

impl Geometry {
    fn tiles(&self) -> usize {
        self.tiles_y * self.tiles_x
    }
}

/// One image's input (in, h, w) transformed into (in, 36, tiles): for each channel and 4×4 output tile, Bᵀ·d·B of
/// the 6×6 input patch it reads (zero outside the image).
fn transform_input(image: &[f32], in_channels: usize, geometry: Geometry) -> Vec<f32> {
    let (height, width) = (geometry.height, geometry.width);
    let mut transformed = vec![0f32; in_channels * POINTS * geometry.tiles()];
    transformed.par_chunks_mut(POINTS * geometry.tiles()).enumerate().for_each(|(c, block)| {
        let plane = &image[c * height * width..(c + 1) * height * width];
        vectorized!(input_channel(plane, block, geometry));
    });
    transformed
}

/// One channel, a row of tiles at a time: Bᵀ down the 6 input rows for every column at once, then B across each
/// tile's 6 columns for every tile of the row at once, read as 4 interleaved phases (column 4·tile + phase).
#[inline(always)]
fn input_channel(plane: &[f32], block: &mut [f32], geometry: Geometry) {
    let Geometry { height, width, pad, tiles_y, tiles_x, .. } = geometry;
    let tiles = geometry.tiles();
    // Columns -pad .. 4·tiles_x + 4 - pad of the padded image: the last tile reads 2 past its 4, rounded up to 4.
    let span_w = TILE * (tiles_x + 1);
    let mut rows = vec![0f32; SPAN * span_w];
    let mut down = vec![0f32; SPAN * span_w];
    let mut phases = vec![0f32; TILE * (tiles_x + 1)];
    for ty in 0..tiles_y {
        for (r, row) in rows.chunks_exact_mut(span_w).enumerate() {
            row.fill(0.0);
            let y = (ty * TILE + r).wrapping_sub(pad);
            if y < height {
                let n = width.min(span_w - pad);
                row[pad..pad + n].copy_from_slice(&plane[y * width..y * width + n]);
            }
        }
        let row = |r: usize| &rows[r * span_w..(r + 1) * span_w];
        let (r0, r1, r2, r3, r4, r5) = (row(0), row(1), row(2), row(3), row(4), row(5));
        for x in 0..span_w {
            let line = input_line([r0[x], r1[x], r2[x], r3[x], r4[x], r5[x]]);
            for (i, value) in line.into_iter().enumerate() {
                down[i * span_w + x] = value;
            }
        }
        for i in 0..SPAN {
            let line = &down[i * span_w..(i + 1) * span_w];
            let (p0, rest) = phases.split_at_mut(tiles_x + 1);
            let (p1, rest) = rest.split_at_mut(tiles_x + 1);
            let (p2, p3) = rest.split_at_mut(tiles_x + 1);
            for (t, quad) in line.chunks_exact(TILE).enumerate() {
                (p0[t], p1[t], p2[t], p3[t]) = (quad[0], quad[1], quad[2], quad[3]);
            }
            let first = ty * tiles_x;
            for tx in 0..tiles_x {
                let across = input_line([p0[tx], p1[tx], p2[tx], p3[tx], p0[tx + 1], p1[tx + 1]]);
                for (j, value) in across.into_iter().enumerate() {
                    block[(i * SPAN + j) * tiles + first + tx] = value;
                }
            }
        }
    }
}

/// The 36 products (36, out, tiles) transformed back into the output image (out, out_h, out_w), plus the bias.
fn transform_output(products: &[f32], out_channels: usize, bias: Option<&[f32]>, geometry: Geometry) -> Vec<f32> {
    let mut output = vec![0f32; out_channels * geometry.out_h * geometry.out_w];
    output.par_chunks_mut(geometry.out_h * geometry.out_w).enumerate().for_each(|(k, plane)| {
        let offset = bias.map_or(0.0, |bias| bias[k]);
        vectorized!(output_channel(products, out_channels, k, offset, plane, geometry));
    });
    output
}

/// One output channel, a row of tiles at a time: Aᵀ across each tile's 6 columns for every tile of the row at
/// once, then A down the 6 rows, then the 4×4 results written into their rows of the image.
#[inline(always)]
fn output_channel(products: &[f32], out_channels: usize, k: usize, offset: f32, plane: &mut [f32], geometry: Geometry) {
    let Geometry { out_h, out_w, tiles_y, tiles_x, .. } = geometry;
    let tiles = geometry.tiles();
    let mut across = vec![0f32; SPAN * TILE * tiles_x];
    let mut result = vec![0f32; TILE * TILE * tiles_x];
    for ty in 0..tiles_y {
        let first = ty * tiles_x;
        let point = |p: usize| &products[(p * out_channels + k) * tiles + first..][..tiles_x];
        for i in 0..SPAN {
            let (m0, m1, m2, m3, m4, m5) = (
                point(i * SPAN),
                point(i * SPAN + 1),
                point(i * SPAN + 2),
                point(i * SPAN + 3),
                point(i * SPAN + 4),
                point(i * SPAN + 5),
            );
            for tx in 0..tiles_x {
                let line = output_line([m0[tx], m1[tx], m2[tx], m3[tx], m4[tx], m5[tx]]);
                for (j, value) in line.into_iter().enumerate() {
                    across[(i * TILE + j) * tiles_x + tx] = value;
                }
            }
        }
        for j in 0..TILE {
            let row = |i: usize| &across[(i * TILE + j) * tiles_x..(i * TILE + j + 1) * tiles_x];
            let (a0, a1, a2, a3, a4, a5) = (row(0), row(1), row(2), row(3), row(4), row(5));
            for tx in 0..tiles_x {
                let line = output_line([a0[tx], a1[tx], a2[tx], a3[tx], a4[tx], a5[tx]]);
                for (i, value) in line.into_iter().enumerate() {
                    result[(i * TILE + j) * tiles_x + tx] = value;
                }
            }
        }
        for i in 0..TILE.min(out_h - ty * TILE) {
            let out = &mut plane[(ty * TILE + i) * out_w..(ty * TILE + i + 1) * out_w];
            for (x, value) in out.iter_mut().enumerate() {
                *value = result[(i * TILE + x % TILE) * tiles_x + x / TILE] + offset;
            }
        }
    }
}

/// The convolution of `xs` (batch, in, h, w) with a 3×3 kernel laid out taps first (out, 9, in), stride 1, zero
/// padding `pad`, plus `bias`. Each image is computed on its own, so a batch gives each image exactly what it
/// gets alone.
pub fn conv3x3(xs: &Tensor, taps_first: &Tensor, bias: Option<&Tensor>, pad: usize) -> Result<Tensor> {
    let (batch, in_channels, height, width) = xs.dims4()?;
    let (out_channels, _, _) = taps_first.dims3()?;
    if height + 2 * pad < 3 || width + 2 * pad < 3 {
        return Err(candle_core::Error::Msg("convolution input smaller than its kernel".into()));
    }
    let (out_h, out_w) = (height + 2 * pad - 2, width + 2 * pad - 2);
    let geometry =
        Geometry { height, width, pad, out_h, out_w, tiles_y: out_h.div_ceil(TILE), tiles_x: out_w.div_ceil(TILE) };
    let tiles = geometry.tiles();
    // (36, out, in): a view of (out, 36, in), whose rows the matrix product reads with a stride.
    let kernel = transform_kernel(&taps_first.contiguous()?)?.transpose(0, 1)?;
    let bias = match bias {
        Some(bias) => Some(bias.to_dtype(DType::F32)?.contiguous()?.to_vec1::<f32>()?),
        None => None,
    };
    let xs = xs.contiguous()?;
    let mut images = Vec::with_capacity(batch);
    for n in 0..batch {
        let transformed = with_f32_slice(&xs, |values| {
            let size = in_channels * height * width;
            Ok(transform_input(&values[n * size..(n + 1) * size], in_channels, geometry))
        })?;
        // (36, in, tiles) as a view of (in, 36, tiles)
        let transformed = Tensor::from_vec(transformed, (in_channels, POINTS, tiles), &Device::Cpu)?.transpose(0, 1)?;
        let products = kernel.matmul(&transformed)?;
        let image = with_f32_slice(&products, |products| {
            Ok(transform_output(products, out_channels, bias.as_deref(), geometry))
        })?;
        images.push(Tensor::from_vec(image, (1, out_channels, out_h, out_w), &Device::Cpu)?);
    }
    Tensor::cat(&images, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn direct(xs: &Tensor, weight: &Tensor, bias: &Tensor, pad: usize) -> Tensor {
        let config = candle_nn::Conv2dConfig { padding: pad, ..Default::default() };
        candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), config).forward(xs).unwrap()
    }

    /// Largest difference relative to the largest output value.
    fn relative_error(got: &Tensor, expected: &Tensor) -> f32 {
        let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (got - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / scale
    }

    #[test]
    fn equals_the_direct_convolution_on_every_tile_edge_case() {
        // Sizes not a multiple of the tile, a single tile, padding 0 and 1, one and several images.
        for (batch, cin, cout, h, w, pad) in
            [(1, 3, 5, 8, 8, 1), (2, 7, 4, 9, 13, 1), (1, 4, 6, 11, 6, 0), (3, 2, 3, 3, 3, 0), (1, 5, 2, 1, 1, 1)]
        {
            let xs = Tensor::randn(0f32, 1.0, (batch, cin, h, w), &Device::Cpu).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (cout, cin, 3, 3), &Device::Cpu).unwrap();
            let bias = Tensor::randn(0f32, 0.3, cout, &Device::Cpu).unwrap();
            let taps_first = weight.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((cout, 9, cin));
            let got = conv3x3(&xs, &taps_first.unwrap(), Some(&bias), pad).unwrap();
            let expected = direct(&xs, &weight, &bias, pad);
            assert_eq!(got.dims(), expected.dims());
            let error = relative_error(&got, &expected);
            assert!(error < 1e-5, "{batch}x{cin}x{h}x{w} → {cout}, pad {pad}: relative error {error}");
        }
    }

    #[test]
    fn kernel_transform_of_a_unit_tap_is_the_outer_product_of_gs_column() {
        // A kernel that is 1 at its centre and 0 elsewhere: G·g·Gᵀ is the outer product of G's middle column.
        let mut weights = vec![0f32; 9];
        weights[4] = 1.0;
        let taps_first = Tensor::from_vec(weights, (1, 9, 1), &Device::Cpu).unwrap();
        let got = transform_kernel(&taps_first).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let column = [0.0, -1.0 / 6.0, 1.0 / 6.0, 1.0 / 12.0, -1.0 / 12.0, 0.0];
        for row in 0..SPAN {
            for col in 0..SPAN {
                let expected = (column[row] * column[col]) as f32;
                assert!((got[row * SPAN + col] - expected).abs() < 1e-7, "({row}, {col})");
            }
        }
    }
}
