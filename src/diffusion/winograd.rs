//! 3×3 stride-1 convolutions on the CPU by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016).
//!
//! A direct 3×3 convolution spends 9 multiply-adds per output pixel and (in, out) channel pair. Winograd's
//! algorithm transforms each 6×6 input tile and the 3×3 kernel into a 6×6 domain where the convolution of a 4×4
//! output tile is 36 element-wise products, then transforms back: 36 / 16 = 2.25 multiply-adds per pixel, 4× fewer.
//! Summed over the input channels, each of the 36 element-wise products is one matrix product of the transformed
//! kernel (out × in) with the transformed input (in × tiles), which is where the time goes; the transforms are
//! additions over the data, linear in its size. The input and output transforms compute a row of neighbouring tiles
//! at once, one tile per lane, so that each of their additions is one vector operation.
//!
//! The kernel is transformed on every call rather than kept: transformed, it is 4× the size of the kernel (36 values
//! for 9), gigabytes for a full-size UNet. Transforming it costs about 10 µs per thousand weights, little next to
//! the products except where the tiles are few: at 512 channels and 32×32 pixels (SD's VAE) it measured 20 ms on
//! one core against 14 ms for the products, most of it in first writes to the 38 MB it fills.
//!
//! F(4×4, 3×3) adds rounding error of a few millionths of the output's scale in f32 (measured 4e-6 to 7e-6 with 64
//! input channels; the transforms' constants are small integers and fractions of 6 and 24). The tests bound it
//! against candle's direct convolution.

use std::ops::{Add, Mul, Sub};

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::host::{vectorized, with_f32_slice};

/// Output tile side.
const TILE: usize = 4;
/// Input tile side: an output tile plus the kernel's reach.
const SPAN: usize = TILE + 2;
/// Element-wise products per tile, one matrix product each.
const POINTS: usize = SPAN * SPAN;

/// Tiles the input transform handles at once, one per lane: the transforms are the same additions for every tile,
/// so with a tile per lane each addition is a vector operation. From 16 tiles across, 16 lanes write whole cache
/// lines of each of the 36 outputs per group and measured faster (16 channels at 64×64: 92 → 77 µs); narrower
/// images would leave half of them idle (32 channels at 32×32: 46 µs with 8 lanes, 72 with 16).
const INPUT_LANES: usize = 8;
const WIDE_INPUT_LANES: usize = 16;
/// Tiles the output transform handles at once; its results are interleaved into image rows, where 8 measured
/// faster than 16 (80 against 107 µs for 16 channels at 64×64).
const OUTPUT_LANES: usize = 8;

/// One value of each of `N` tiles. Its operations are indexed loops: optimised builds make each a vector
/// operation either way, while unoptimised ones (the test builds) run them far faster than iterator chains (the
/// load test took 103 s with those, 59 s with these).
#[derive(Debug, Clone, Copy)]
struct Lanes<const N: usize>([f32; N]);

impl<const N: usize> Add for Lanes<N> {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, other: Self) -> Self {
        for l in 0..N {
            self.0[l] += other.0[l];
        }
        self
    }
}

impl<const N: usize> Sub for Lanes<N> {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, other: Self) -> Self {
        for l in 0..N {
            self.0[l] -= other.0[l];
        }
        self
    }
}

impl<const N: usize> Mul<Lanes<N>> for f32 {
    type Output = Lanes<N>;
    #[inline(always)]
    fn mul(self, mut lanes: Lanes<N>) -> Lanes<N> {
        for l in 0..N {
            lanes.0[l] *= self;
        }
        lanes
    }
}

impl<const N: usize> Lanes<N> {
    const ZERO: Self = Lanes([0.0; N]);

    /// `values` into the first lanes, zero in the others: a whole group is one vector load.
    #[inline(always)]
    fn load(values: &[f32]) -> Self {
        match <[f32; N]>::try_from(values) {
            Ok(all) => Lanes(all),
            Err(_) => {
                let mut lanes = Self::ZERO;
                lanes.0[..values.len()].copy_from_slice(values);
                lanes
            }
        }
    }

    /// The first `out.len()` lanes into `out`: a whole group is one vector store, not a call to copy a slice.
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        match <&mut [f32; N]>::try_from(&mut *out) {
            Ok(all) => *all = self.0,
            Err(_) => out.copy_from_slice(&self.0[..out.len()]),
        }
    }
}

/// What the transforms of a line compute on: one value (f32), or one per lane ([`Lanes`]), with the same
/// operations in the same order, so a tile gets the same bits either way.
trait Line: Copy + Add<Output = Self> + Sub<Output = Self> {}
impl Line for f32 {}
impl<const N: usize> Line for Lanes<N> {}

/// Bᵀ·d: the input transform of one line of 6 values.
#[inline(always)]
fn input_line<T: Line>(d: [T; SPAN]) -> [T; SPAN]
where
    f32: Mul<T, Output = T>,
{
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
fn output_line<T: Line>(m: [T; SPAN]) -> [T; TILE]
where
    f32: Mul<T, Output = T>,
{
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
    /// A 3×3 stride-1 convolution's geometry for an input of `height` × `width` zero-padded by `pad`, which the
    /// caller has checked is at least the kernel's size.
    fn new(height: usize, width: usize, pad: usize) -> Self {
        let (out_h, out_w) = (height + 2 * pad - 2, width + 2 * pad - 2);
        Geometry { height, width, pad, out_h, out_w, tiles_y: out_h.div_ceil(TILE), tiles_x: out_w.div_ceil(TILE) }
    }

    fn tiles(&self) -> usize {
        self.tiles_y * self.tiles_x
    }
}

/// One image's input (in, h, w) transformed into (in, 36, tiles): for each channel and 4×4 output tile, Bᵀ·d·B of
/// the 6×6 input patch it reads (zero outside the image).
fn transform_input(image: &[f32], in_channels: usize, geometry: Geometry) -> Vec<f32> {
    let (height, width) = (geometry.height, geometry.width);
    let mut transformed = vec![0f32; in_channels * POINTS * geometry.tiles()];
    let lanes = if geometry.tiles_x >= WIDE_INPUT_LANES { WIDE_INPUT_LANES } else { INPUT_LANES };
    transformed.par_chunks_mut(POINTS * geometry.tiles()).enumerate().for_each_init(
        || Phases::new(geometry, lanes),
        |phases, (c, block)| {
            let plane = &image[c * height * width..(c + 1) * height * width];
            if lanes == WIDE_INPUT_LANES {
                vectorized!(input_channel::<WIDE_INPUT_LANES>(plane, block, phases, geometry));
            } else {
                vectorized!(input_channel::<INPUT_LANES>(plane, block, phases, geometry));
            }
        },
    );
    transformed
}

/// The 6 padded input rows a row of tiles reads, each split into its 4 column phases (phase q holds the padded
/// row's columns 4·t + q), so that column c of tile t is phase c mod 4 at t + c / 4 and the 6×6 patches of
/// neighbouring tiles, one per lane, are 36 contiguous loads. Kept for one row of tiles at a time, so that they
/// stay in the core's nearest cache; a thread reuses them from channel to channel.
struct Phases {
    /// `values[(r · TILE + q) · len + t]` for the window's rows r = 0..6.
    values: Vec<f32>,
    /// One padded row, before it is split: only the image's columns are ever written, so the padding stays zero.
    row: Vec<f32>,
    /// Long enough for the last group of lanes to read one tile past its own.
    len: usize,
}

impl Phases {
    fn new(geometry: Geometry, lanes: usize) -> Self {
        let len = geometry.tiles_x.next_multiple_of(lanes) + 1;
        Phases { values: vec![0f32; SPAN * TILE * len], row: vec![0f32; TILE * len], len }
    }

    /// Moves the window to the rows of tile row `ty`: the 2 rows it shares with the row above are moved up, the
    /// others split from `plane` (zero outside the image).
    #[inline(always)]
    fn slide_to(&mut self, ty: usize, plane: &[f32], geometry: Geometry) {
        let Geometry { height, width, pad, .. } = geometry;
        let row_size = TILE * self.len;
        let shared = if ty == 0 {
            0
        } else {
            self.values.copy_within(TILE * row_size.., 0);
            SPAN - TILE
        };
        for r in shared..SPAN {
            let phases = &mut self.values[r * row_size..(r + 1) * row_size];
            let y = (ty * TILE + r).wrapping_sub(pad);
            if y >= height {
                phases.fill(0.0);
                continue;
            }
            let columns = width.min(self.row.len() - pad);
            self.row[pad..pad + columns].copy_from_slice(&plane[y * width..][..columns]);
            let (p0, rest) = phases.split_at_mut(self.len);
            let (p1, rest) = rest.split_at_mut(self.len);
            let (p2, p3) = rest.split_at_mut(self.len);
            let phases = p0.iter_mut().zip(p1.iter_mut()).zip(p2.iter_mut()).zip(p3.iter_mut());
            for (quad, (((a, b), c), d)) in self.row.chunks_exact(TILE).zip(phases) {
                (*a, *b, *c, *d) = (quad[0], quad[1], quad[2], quad[3]);
            }
        }
    }

    /// Row `r`, column `c` of the patches of the tiles from `first_tile`, one tile per lane.
    #[inline(always)]
    fn patch<const N: usize>(&self, first_tile: usize, r: usize, c: usize) -> Lanes<N> {
        let start = (r * TILE + c % TILE) * self.len + first_tile + c / TILE;
        Lanes(self.values[start..start + N].try_into().expect("a group of lanes within its phase"))
    }
}

/// One channel, a row of tiles at a time and one tile per lane: Bᵀ down each of the 6×6 patch's columns, then B
/// across each of the 6 rows that gives.
#[inline(always)]
fn input_channel<const N: usize>(plane: &[f32], block: &mut [f32], phases: &mut Phases, geometry: Geometry) {
    let Geometry { tiles_y, tiles_x, .. } = geometry;
    let tiles = geometry.tiles();
    for ty in 0..tiles_y {
        phases.slide_to(ty, plane, geometry);
        for first_tile in (0..tiles_x).step_by(N) {
            let patch = |r: usize, c: usize| phases.patch(first_tile, r, c);
            // down[c][i]: row i of Bᵀ·d, column c. (Loops and array literals rather than `array::from_fn`,
            // which is not inlined for arrays this large.)
            let mut down = [[Lanes::<N>::ZERO; SPAN]; SPAN];
            for (c, column) in down.iter_mut().enumerate() {
                *column = input_line([patch(0, c), patch(1, c), patch(2, c), patch(3, c), patch(4, c), patch(5, c)]);
            }
            let count = N.min(tiles_x - first_tile);
            let at = ty * tiles_x + first_tile;
            for i in 0..SPAN {
                let across = input_line([down[0][i], down[1][i], down[2][i], down[3][i], down[4][i], down[5][i]]);
                for (j, value) in across.into_iter().enumerate() {
                    value.store(&mut block[(i * SPAN + j) * tiles + at..][..count]);
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

/// One output channel, a row of tiles at a time, [`OUTPUT_LANES`] tiles at once, one tile per lane: Aᵀ across each
/// tile's 6 columns, then A down the 6 rows, then the 4×4 results interleaved into their rows of the image.
#[inline(always)]
fn output_channel(products: &[f32], out_channels: usize, k: usize, offset: f32, plane: &mut [f32], geometry: Geometry) {
    let Geometry { out_h, out_w, tiles_y, tiles_x, .. } = geometry;
    let tiles = geometry.tiles();
    for ty in 0..tiles_y {
        for first_tile in (0..tiles_x).step_by(OUTPUT_LANES) {
            let count = OUTPUT_LANES.min(tiles_x - first_tile);
            let at = ty * tiles_x + first_tile;
            let point =
                |p: usize| Lanes::<OUTPUT_LANES>::load(&products[(p * out_channels + k) * tiles + at..][..count]);
            let mut across = [[Lanes::<OUTPUT_LANES>::ZERO; TILE]; SPAN];
            for (i, line) in across.iter_mut().enumerate() {
                let p = i * SPAN;
                *line = output_line([point(p), point(p + 1), point(p + 2), point(p + 3), point(p + 4), point(p + 5)]);
            }
            // result[i][j]: row i, column j of every lane's tile
            let mut result = [[Lanes::<OUTPUT_LANES>::ZERO; TILE]; TILE];
            for j in 0..TILE {
                let down =
                    output_line([across[0][j], across[1][j], across[2][j], across[3][j], across[4][j], across[5][j]]);
                for (i, value) in down.into_iter().enumerate() {
                    result[i][j] = value;
                }
            }
            let x0 = TILE * first_tile;
            let width = (TILE * OUTPUT_LANES).min(out_w - x0);
            for (i, rows) in result.iter().enumerate().take(out_h - ty * TILE) {
                let mut line = [0f32; TILE * OUTPUT_LANES];
                for (x, value) in line.iter_mut().enumerate() {
                    *value = rows[x % TILE].0[x / TILE] + offset;
                }
                plane[(ty * TILE + i) * out_w + x0..][..width].copy_from_slice(&line[..width]);
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
    let geometry = Geometry::new(height, width, pad);
    let (out_h, out_w, tiles) = (geometry.out_h, geometry.out_w, geometry.tiles());
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
        // Sizes not a multiple of the tile, a single tile, padding 0 and 1, one and several images, and rows of
        // tiles that fill some of a group of lanes, one group and a part, or several groups of the wide lanes.
        for (batch, cin, cout, h, w, pad) in [
            (1, 3, 5, 8, 8, 1),
            (2, 7, 4, 9, 13, 1),
            (1, 4, 6, 11, 6, 0),
            (3, 2, 3, 3, 3, 0),
            (1, 5, 2, 1, 1, 1),
            (1, 3, 2, 6, 41, 1),
            (2, 2, 3, 5, 70, 0),
            (1, 2, 2, 9, 130, 1),
        ] {
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

    /// Row widths whose tiles fill part of a group of lanes, exactly one, one and a part, one wide group, and more.
    const WIDTHS: [usize; 6] = [7, 30, 42, 64, 66, 150];

    fn values(n: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap().to_vec1().unwrap()
    }

    /// The input transform one tile at a time, its 6×6 patch gathered plainly, with the same operations in the
    /// same order as the module (down each column, then across each row).
    fn input_tile_by_tile(image: &[f32], in_channels: usize, geometry: Geometry) -> Vec<f32> {
        let Geometry { height, width, pad, tiles_y, tiles_x, .. } = geometry;
        let tiles = geometry.tiles();
        let mut out = vec![0f32; in_channels * POINTS * tiles];
        for c in 0..in_channels {
            for (ty, tx) in (0..tiles_y).flat_map(|ty| (0..tiles_x).map(move |tx| (ty, tx))) {
                let value = |r: usize, col: usize| {
                    let (y, x) = ((ty * TILE + r).wrapping_sub(pad), (tx * TILE + col).wrapping_sub(pad));
                    if y < height && x < width {
                        image[(c * height + y) * width + x]
                    } else {
                        0.0
                    }
                };
                let columns: [[f32; SPAN]; SPAN] =
                    std::array::from_fn(|col| input_line(std::array::from_fn(|r| value(r, col))));
                for i in 0..SPAN {
                    for (j, v) in input_line(columns.map(|column| column[i])).into_iter().enumerate() {
                        out[(c * POINTS + i * SPAN + j) * tiles + ty * tiles_x + tx] = v;
                    }
                }
            }
        }
        out
    }

    /// The output transform one tile at a time (across each row, then down each column), plus the bias.
    fn output_tile_by_tile(products: &[f32], out_channels: usize, bias: &[f32], geometry: Geometry) -> Vec<f32> {
        let Geometry { out_h, out_w, tiles_y, tiles_x, .. } = geometry;
        let tiles = geometry.tiles();
        let mut out = vec![0f32; out_channels * out_h * out_w];
        for k in 0..out_channels {
            for (ty, tx) in (0..tiles_y).flat_map(|ty| (0..tiles_x).map(move |tx| (ty, tx))) {
                let m = |p: usize| products[(p * out_channels + k) * tiles + ty * tiles_x + tx];
                let across: [[f32; TILE]; SPAN] =
                    std::array::from_fn(|i| output_line(std::array::from_fn(|j| m(i * SPAN + j))));
                for j in 0..TILE {
                    for (i, v) in output_line(across.map(|line| line[j])).into_iter().enumerate() {
                        let (y, x) = (ty * TILE + i, tx * TILE + j);
                        if y < out_h && x < out_w {
                            out[(k * out_h + y) * out_w + x] = v + bias[k];
                        }
                    }
                }
            }
        }
        out
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn input_transform_gives_each_tile_its_own_transform_bit_for_bit() {
        for (width, pad) in WIDTHS.into_iter().flat_map(|w| [(w, 0), (w, 1)]) {
            let geometry = Geometry::new(10, width, pad);
            let channels = 3;
            let image = values(channels * 10 * width);
            let got = transform_input(&image, channels, geometry);
            assert_eq!(bits(&got), bits(&input_tile_by_tile(&image, channels, geometry)), "width {width}, pad {pad}");
        }
    }

    #[test]
    fn output_transform_gives_each_tile_its_own_transform_bit_for_bit() {
        for (width, pad) in WIDTHS.into_iter().flat_map(|w| [(w, 0), (w, 1)]) {
            let geometry = Geometry::new(9, width, pad);
            let channels = 3;
            let products = values(POINTS * channels * geometry.tiles());
            let bias = [0.5, -1.25, 3.0];
            let got = transform_output(&products, channels, Some(&bias), geometry);
            let expected = output_tile_by_tile(&products, channels, &bias, geometry);
            assert_eq!(bits(&got), bits(&expected), "width {width}, pad {pad}");
        }
    }
}
