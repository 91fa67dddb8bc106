//! Private Mode's proof on a real GPU: a job's device memory is readable by the next allocation, unless the job ran
//! inside a `PrivateDeviceScope`, which leaves none of it. Needs a CUDA GPU:
//!
//! ```text
//! cargo run --release --features cuda --example gpu_residue [-- --ordinal N]
//! ```
//!
//! Each phase writes its own canary (random f32 values) into a tensor, runs ops producing intermediates from it
//! (copy, affine, transpose, cuBLAS matmul, cuDNN convolution, f16 cast), drops everything, then allocates
//! uninitialized device memory covering the pool and counts canary pairs (two consecutive values) in it:
//!
//! * `positive_control`: no scope. Must find the canary, or the search could not see residue at all.
//! * `in_scope_before_wipe`: inside the scope, searching the job's own pool before any wipe. Must find it.
//! * `in_scope_after_zero_free_memory`: the same search after `zero_free_memory`. Must find nothing.
//! * `after_finish`: after `finish`, searching the restored pool with twice the job's footprint, so that the
//!   driver hands out fresh memory too. Must find nothing. A tensor kept past `finish` is wiped with `wipe_tensor`
//!   and must read back as zeros.
//!
//! Prints a JSON summary on stdout; exits non-zero if a check failed or the controls found nothing.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{CudaDevice, DType, Device, Tensor};
use clap::Parser;
use imago::private::{device_pool_reserved_bytes, wipe_tensor, PrivateDeviceScope};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Side of the square canary tensor (f32): 4 MiB, also the size of each search block.
const CANARY_SIDE: usize = 1024;
const BLOCK_BYTES: u64 = (CANARY_SIDE * CANARY_SIDE * 4) as u64;
/// Searched beyond the pool's size, for the driver's rounding.
const SEARCH_MARGIN_BYTES: u64 = 64 << 20;

/// Residue check of Private Mode on a CUDA GPU.
#[derive(Debug, Parser)]
struct Args {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::new_cuda(args.ordinal).with_context(|| format!("opening CUDA device {}", args.ordinal))?;
    let cuda = device.as_cuda_device()?;
    let mut rng = rand_chacha::ChaCha8Rng::from_entropy();

    let mut canary = Canary::new(&mut rng);
    canary.run_job(&device)?;
    let positive_control = search(cuda, &canary, device_pool_reserved_bytes(cuda)? + SEARCH_MARGIN_BYTES)?;

    let mut canary = Canary::new(&mut rng);
    let scope = PrivateDeviceScope::enter(&device)?;
    canary.run_job(&device)?;
    let kept = canary.tensor(&device)?;
    let in_pool_bytes = device_pool_reserved_bytes(cuda)? + SEARCH_MARGIN_BYTES;
    let before_wipe = search(cuda, &canary, in_pool_bytes)?;
    let zeroed_in_scope = scope.zero_free_memory()?;
    let after_zero_free_memory = search(cuda, &canary, in_pool_bytes)?;
    wipe_tensor(&kept)?;
    let kept_sum = kept.abs()?.sum_all()?.to_scalar::<f32>()?;
    let finish_started = Instant::now();
    let report = scope.finish()?;
    let finish_ms = finish_started.elapsed().as_secs_f64() * 1e3;
    drop(kept);
    let after_finish = search(cuda, &canary, 2 * report.pool_bytes + SEARCH_MARGIN_BYTES)?;

    let mut failures = Vec::new();
    if positive_control.hits == 0 {
        failures.push("the positive control found no canary: this search cannot see residue");
    }
    if before_wipe.hits == 0 {
        failures.push("the in-scope control found no canary in the job's pool");
    }
    if after_zero_free_memory.hits > 0 {
        failures.push("canary left in the job's pool after zero_free_memory");
    }
    if after_finish.hits > 0 {
        failures.push("canary found after finish");
    }
    if kept_sum != 0.0 {
        failures.push("wipe_tensor left a non-zero value in a device tensor");
    }
    if report.bytes_unreached > 0 {
        failures.push("the sweep could not reach part of the job's free memory");
    }
    let summary = json!({
        "device": format!("cuda:{}", args.ordinal),
        "canary_values": CANARY_SIDE * CANARY_SIDE,
        "positive_control": positive_control.to_json(),
        "in_scope_before_wipe": before_wipe.to_json(),
        "in_scope_after_zero_free_memory": after_zero_free_memory.to_json(),
        "zero_free_memory_bytes": zeroed_in_scope,
        "after_finish": after_finish.to_json(),
        "kept_tensor_sum_after_wipe": kept_sum,
        "finish_ms": finish_ms,
        "wipe_report": {
            "pool_bytes": report.pool_bytes,
            "bytes_zeroed": report.bytes_zeroed,
            "workspace_bytes_zeroed": report.workspace_bytes_zeroed,
            "bytes_still_allocated": report.bytes_still_allocated,
            "bytes_unreached": report.bytes_unreached,
        },
        "failures": failures,
        "pass": failures.is_empty(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if !failures.is_empty() {
        bail!("GPU residue check failed: {}", failures.join("; "));
    }
    Ok(())
}

/// A recognisable pattern: random finite f32 values, and the pairs of consecutive values the search looks for
/// (those of the values themselves and of one op's output, so intermediates count too).
struct Canary {
    values: Vec<f32>,
    pairs: HashSet<u64, BuildHasherDefault<PairHasher>>,
}

impl Canary {
    fn new(rng: &mut impl Rng) -> Self {
        // Exponents 100..=150 (about 1e-8 to 1e7): ordinary activations, no infinities or subnormals downstream.
        let values = (0..CANARY_SIDE * CANARY_SIDE)
            .map(|_| {
                let sign_and_mantissa = rng.gen::<u32>() & 0x807f_ffff;
                f32::from_bits(sign_and_mantissa | (rng.gen_range(100u32..=150) << 23))
            })
            .collect();
        Self { values, pairs: HashSet::default() }
    }

    fn tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.values.clone(), (CANARY_SIDE, CANARY_SIDE), device)?)
    }

    /// Runs the stand-in job and learns the pairs to search for; drops every tensor it made.
    fn run_job(&mut self, device: &Device) -> Result<()> {
        let x = self.tensor(device)?;
        let copy = x.copy()?;
        let derived = x.affine(0.5, 0.25)?;
        let transposed = x.t()?.contiguous()?;
        let product = x.matmul(&transposed)?;
        let kernel = Tensor::ones((4, 1, 3, 3), DType::F32, device)?;
        let convolved = x.reshape((1, 1, CANARY_SIDE, CANARY_SIDE))?.conv2d(&kernel, 1, 1, 1, 1)?;
        let half = x.to_dtype(DType::F16)?;
        // Synchronizes while everything is alive; the drops below only enqueue frees.
        let derived_values = derived.flatten_all()?.to_vec1::<f32>()?;
        drop((x, copy, derived, transposed, product, convolved, half));
        self.learn_pairs(&derived_values);
        let values = std::mem::take(&mut self.values);
        self.learn_pairs(&values);
        self.values = values;
        Ok(())
    }

    fn learn_pairs(&mut self, values: &[f32]) {
        let pairs = values.windows(2).filter(|w| w[0] != 0.0 && w[1] != 0.0);
        self.pairs.extend(pairs.map(|w| pair_key(w[0].to_bits(), w[1].to_bits())));
    }

    /// Canary pairs found in `bytes`, read as consecutive native-endian f32 words.
    fn count_in(&self, bytes: &[u8]) -> u64 {
        let words: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]])).collect();
        words.windows(2).filter(|w| w[0] != 0 && self.pairs.contains(&pair_key(w[0], w[1]))).count() as u64
    }
}

fn pair_key(first: u32, second: u32) -> u64 {
    (u64::from(first) << 32) | u64::from(second)
}

/// A fast hash for the pair keys, which are random already (SipHash would dominate the search).
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (value ^ (value >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

/// What one search read and found.
struct Search {
    searched_bytes: u64,
    hits: u64,
}

impl Search {
    fn to_json(&self) -> serde_json::Value {
        json!({ "searched_bytes": self.searched_bytes, "canary_pairs_found": self.hits })
    }
}

/// Allocates at least `bytes` of uninitialized device memory from the current pool and counts canary pairs in it.
fn search(cuda: &CudaDevice, canary: &Canary, bytes: u64) -> Result<Search> {
    let count = bytes.div_ceil(BLOCK_BYTES);
    // Every block is allocated before the first copy back: a copy synchronizes, which lets the driver release the
    // pool's free memory (under the default release threshold) before the search has claimed it.
    let blocks = (0..count)
        // SAFETY: the blocks are only copied to the host; reading uninitialized device memory is the point.
        .map(|_| unsafe { cuda.alloc::<u8>(BLOCK_BYTES as usize) })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut hits = 0;
    for block in &blocks {
        hits += canary.count_in(&cuda.clone_dtoh(block)?);
    }
    Ok(Search { searched_bytes: count * BLOCK_BYTES, hits })
}
