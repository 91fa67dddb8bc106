//! `--device` and `--dtype` parsing shared by the subcommands that run models.

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) => cuda(n.parse().with_context(|| format!("bad GPU ordinal in {other:?}"))?),
            None => bail!("unknown device {other:?} (use cpu, cuda or cuda:N)"),
        },
    }
}

fn cuda(ordinal: usize) -> anyhow::Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!("this imago was built without CUDA; rebuild with `--features cuda` on a machine with the NVIDIA driver");
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

/// The default precision: f16 on GPUs, f32 on the CPU (candle's CPU matmul has no fast half path).
pub fn parse_dtype(spec: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match spec {
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") if device.is_cpu() => bail!("bf16 matmul is not supported on the CPU; use f32"),
        Some("bf16") => DType::BF16,
        Some(other) => bail!("unknown dtype {other:?} (use f32, f16 or bf16)"),
    })
}
