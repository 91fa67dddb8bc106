//! A benchmark's results: summary statistics, the JSON written by `--json`, and the table printed on stdout.

use std::fmt;

use serde::Serialize;

use crate::job::ErrorBody;

/// The parameters a benchmark ran with, after the model's defaults were filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadSummary {
    /// Preset name or model folder.
    pub model: String,
    /// The family the folder's `imago.json` declares, if any.
    pub family: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub batch: usize,
    pub scheduler: String,
    /// Batch rows of each UNet call: the batch, doubled under classifier-free guidance.
    pub unet_rows_per_step: usize,
    pub private: bool,
    /// `cpu`, `cuda:0`, …
    pub device: String,
    /// The accelerator's name (`NVIDIA H200`), or `cpu`.
    pub device_name: String,
    pub dtype: String,
    /// Threads of candle's CPU kernels (`RAYON_NUM_THREADS`, else all cores).
    pub cpu_threads: usize,
}

/// Median and range of one stage over the measured iterations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StageStats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl StageStats {
    /// Statistics of `samples`; all zero when there are none.
    pub fn of(samples: &[f64]) -> Self {
        let min = samples.iter().copied().reduce(f64::min).unwrap_or(0.0);
        let max = samples.iter().copied().reduce(f64::max).unwrap_or(0.0);
        Self { median: percentile(samples, 0.5), min, max }
    }
}

/// Job latency through the engine, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

impl LatencyStats {
    pub fn of(samples: &[f64]) -> Self {
        let mean = if samples.is_empty() { 0.0 } else { samples.iter().sum::<f64>() / samples.len() as f64 };
        Self { p50: percentile(samples, 0.5), p99: percentile(samples, 0.99), mean }
    }
}

/// The `p` quantile (0–1) of `samples`, interpolating linearly between the two nearest ranks (numpy's default, so
/// p = 0.5 is the median); 0 for no samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else { return 0.0 };
    let position = p.clamp(0.0, 1.0) * last as f64;
    let (below, above) = (position.floor() as usize, position.ceil() as usize);
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// Every measured value, one per iteration, for tools that pool several runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Samples {
    pub text_encode_ms: Vec<f64>,
    pub unet_step_ms: Vec<f64>,
    pub vae_decode_ms: Vec<f64>,
    pub job_latency_ms: Vec<f64>,
}

/// What was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Results {
    /// Denoising steps per second ("it/s"): one step is one UNet call on every row plus guidance and scheduler.
    pub steps_per_second: f64,
    /// Images per second through the engine, from the mean job latency.
    pub images_per_second: f64,
    pub text_encode_ms: StageStats,
    /// One denoising step (the stage's time divided by the step count).
    pub unet_step_ms: StageStats,
    pub vae_decode_ms: StageStats,
    /// Job message bytes → parse → validate → engine run → encoded images.
    pub job_latency_ms: LatencyStats,
    pub peak_host_rss_bytes: Option<u64>,
    /// Most GPU memory in use during the run (device-wide), with the `cuda` feature on a GPU.
    pub peak_gpu_memory_bytes: Option<u64>,
    pub gpu_memory_total_bytes: Option<u64>,
    /// Matrix-product FLOPs of one UNet call on all rows (see [`super::flops`]).
    pub unet_gflop_per_step: f64,
    /// UNet FLOPs per step over the median step time.
    pub achieved_tflops: f64,
    /// The device's dense peak for the dtype, where known.
    pub device_peak_tflops: Option<f64>,
    pub percent_of_peak: Option<f64>,
    pub samples: Samples,
}

/// The outcome of `imago bench`, written as JSON by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub imago_version: String,
    pub workload: WorkloadSummary,
    pub iterations: usize,
    pub warmup: usize,
    /// Seconds to write the model folder (presets with random weights; 0 otherwise).
    pub prepare_seconds: f64,
    /// Seconds to load the model onto the device.
    pub load_seconds: f64,
    /// Set when the engine refused or failed the job; nothing was measured then.
    pub failure: Option<ErrorBody>,
    pub results: Option<Results>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        let family = w.family.as_deref().map(|family| format!(" ({family})")).unwrap_or_default();
        writeln!(f, "model        {}{family}", w.model)?;
        writeln!(
            f,
            "workload     {}x{}, {} steps {}, guidance {}, batch {} ({} UNet rows per step){}",
            w.width,
            w.height,
            w.steps,
            w.scheduler,
            w.guidance,
            w.batch,
            w.unet_rows_per_step,
            if w.private { ", private" } else { "" }
        )?;
        writeln!(f, "device       {} ({}), {}, {} CPU threads", w.device, w.device_name, w.dtype, w.cpu_threads)?;
        writeln!(
            f,
            "runs         {} measured after {} warm-up; model written in {:.1} s, loaded in {:.1} s",
            self.iterations, self.warmup, self.prepare_seconds, self.load_seconds
        )?;
        if let Some(failure) = &self.failure {
            writeln!(f, "NOT MEASURED the engine answered {}: {}", failure.code.as_str(), failure.message)?;
            return Ok(());
        }
        let Some(r) = &self.results else { return Ok(()) };
        let stage = |s: &StageStats| format!("{:>10.3} ms  (min {:.3}, max {:.3})", s.median, s.min, s.max);
        writeln!(f)?;
        writeln!(f, "{:<22}{:>10.3} it/s", "denoising", r.steps_per_second)?;
        writeln!(f, "{:<22}{:>10.3} images/s", "through the engine", r.images_per_second)?;
        writeln!(f, "{:<22}{}", "text encode", stage(&r.text_encode_ms))?;
        writeln!(f, "{:<22}{}", "UNet step", stage(&r.unet_step_ms))?;
        writeln!(f, "{:<22}{}", "VAE decode", stage(&r.vae_decode_ms))?;
        let l = &r.job_latency_ms;
        writeln!(f, "{:<22}{:>10.3} ms  (p99 {:.3}, mean {:.3})", "job latency p50", l.p50, l.p99, l.mean)?;
        let rss = r.peak_host_rss_bytes.map_or_else(|| "n/a".to_string(), mib);
        writeln!(f, "{:<22}{rss:>13}", "peak host RSS")?;
        let gpu = match (r.peak_gpu_memory_bytes, r.gpu_memory_total_bytes) {
            (Some(peak), Some(total)) => format!("{} of {}", mib(peak), mib(total)),
            _ => "n/a".to_string(),
        };
        writeln!(f, "{:<22}{gpu:>13}", "peak GPU memory")?;
        let peak = match (r.device_peak_tflops, r.percent_of_peak) {
            (Some(peak), Some(percent)) => format!("{percent:.1} % of {peak} TFLOP/s peak"),
            _ => "n/a % of peak (no peak known for this device)".to_string(),
        };
        writeln!(
            f,
            "{:<22}{:>10.3} TFLOP/s  ({:.1} GFLOP per step; {peak})",
            "UNet compute", r.achieved_tflops, r.unet_gflop_per_step
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ErrorCode;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let samples = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&samples, 0.5), 2.5);
        assert_eq!(percentile(&samples, 0.0), 1.0);
        assert_eq!(percentile(&samples, 1.0), 4.0);
        assert!((percentile(&samples, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn stage_and_latency_statistics_summarise_the_samples() {
        let stats = StageStats::of(&[3.0, 1.0, 2.0]);
        assert_eq!(stats, StageStats { median: 2.0, min: 1.0, max: 3.0 });
        let latency = LatencyStats::of(&[10.0, 20.0, 30.0, 40.0]);
        assert_eq!((latency.p50, latency.mean), (25.0, 25.0));
        assert!((latency.p99 - 39.7).abs() < 1e-9);
    }

    fn workload() -> WorkloadSummary {
        WorkloadSummary {
            model: "tiny-sd15".into(),
            family: Some("tiny-sd15".into()),
            width: 64,
            height: 64,
            steps: 4,
            guidance: 7.5,
            batch: 1,
            scheduler: "dpm++2m".into(),
            unet_rows_per_step: 2,
            private: true,
            device: "cpu".into(),
            device_name: "cpu".into(),
            dtype: "f32".into(),
            cpu_threads: 2,
        }
    }

    #[test]
    fn a_refused_job_is_reported_with_its_code_and_no_numbers() {
        let report = BenchReport {
            imago_version: "0.1.0".into(),
            workload: workload(),
            iterations: 3,
            warmup: 1,
            prepare_seconds: 0.5,
            load_seconds: 0.1,
            failure: Some(ErrorBody { code: ErrorCode::Internal, message: "the device is gone".into() }),
            results: None,
        };
        let table = report.to_string();
        assert!(table.contains("NOT MEASURED the engine answered internal: the device is gone"), "{table}");
        assert!(!table.contains("it/s"), "{table}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["failure"]["code"], "internal");
        assert_eq!(json["results"], serde_json::Value::Null);
        assert_eq!(json["workload"]["private"], true);
    }
}
