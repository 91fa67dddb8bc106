//! Peak memory of a benchmark: the process's resident set high-water mark, and (with the `cuda` feature) the GPU's
//! used memory, sampled on a background thread because CUDA keeps no peak of its own.

use candle_core::Device;

/// The process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`); `None` where there is no procfs.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix("VmHWM:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// What the GPU sampler saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    /// Most memory in use on the device at any sample (all processes, like `nvidia-smi`), in bytes.
    pub peak_used_bytes: u64,
    pub total_bytes: u64,
}

/// The accelerator's marketing name (`NVIDIA H200`), or `cpu`.
pub fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda.cuda_stream().context().name().unwrap_or_else(|_| "cuda".to_string()),
        Device::Cpu => "cpu".to_string(),
        _ => "unknown".to_string(),
    }
}

/// Samples the device's free memory every few milliseconds until [`GpuMemorySampler::finish`].
pub struct GpuMemorySampler {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Sampler>,
}

impl GpuMemorySampler {
    /// Starts sampling `device`; on the CPU (or without the `cuda` feature) it samples nothing.
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        {
            Self { inner: cuda::Sampler::start(device) }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Self {}
        }
    }

    /// Stops sampling; `None` when nothing was sampled.
    pub fn finish(self) -> Option<GpuMemory> {
        #[cfg(feature = "cuda")]
        {
            self.inner.and_then(cuda::Sampler::finish)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    use candle_core::Device;

    use super::GpuMemory;

    /// A short interval: a UNet call's activations live for milliseconds on a fast GPU.
    const INTERVAL: Duration = Duration::from_millis(2);

    pub struct Sampler {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Option<GpuMemory>>,
    }

    impl Sampler {
        pub fn start(device: &Device) -> Option<Self> {
            let Device::Cuda(cuda) = device else { return None };
            let context: Arc<CudaContext> = cuda.cuda_stream().context().clone();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut seen: Option<GpuMemory> = None;
                loop {
                    if let Ok((free, total)) = context.mem_get_info() {
                        let used = total.saturating_sub(free) as u64;
                        let peak = seen.map_or(used, |s| s.peak_used_bytes.max(used));
                        seen = Some(GpuMemory { peak_used_bytes: peak, total_bytes: total as u64 });
                    }
                    if flag.load(Ordering::Relaxed) {
                        return seen;
                    }
                    std::thread::sleep(INTERVAL);
                }
            });
            Some(Self { stop, thread })
        }

        pub fn finish(self) -> Option<GpuMemory> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().ok().flatten()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_water_mark_is_read_in_bytes() {
        let status = "Name:\timago\nVmPeak:\t  900 kB\nVmHWM:\t    1536 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1536 * 1024));
        assert_eq!(parse_vm_hwm("Name:\timago\n"), None);
    }

    #[test]
    fn this_process_has_a_peak_resident_set() {
        let peak = peak_rss_bytes().unwrap();
        // A test binary with candle linked resides in more than a megabyte and less than the machine.
        assert!(peak > 1 << 20 && peak < 1 << 40, "{peak}");
    }

    #[test]
    fn nothing_is_sampled_on_the_cpu() {
        assert_eq!(GpuMemorySampler::start(&Device::Cpu).finish(), None);
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
