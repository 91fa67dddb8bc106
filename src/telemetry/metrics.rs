//! Prometheus metrics of a worker: aggregate counters and histograms only. Labels are drawn from closed sets
//! (job kind, status, error code, and model names this worker actually serves) — never a prompt, a user id or
//! anything else a request can choose freely.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A fixed-bucket histogram of seconds.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Ordering::Relaxed));
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// One finished job, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct JobRecord<'a> {
    pub kind: &'a str,
    /// The model, for jobs that ran; `None` (label `n/a`) for jobs refused before, whose model name was the
    /// requester's free choice.
    pub model: Option<&'a str>,
    /// `ok`, `error` or `cancelled`.
    pub status: &'a str,
    pub error_code: Option<&'a str>,
    pub private: bool,
    pub images: u64,
    pub duration: Duration,
}

/// The worker's metrics registry.
pub struct Metrics {
    started: Instant,
    jobs: Mutex<BTreeMap<(String, String, String, bool), u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    images: AtomicU64,
    in_flight: AtomicU64,
    queue_wait: Histogram,
    job_duration: Histogram,
    step_duration: Histogram,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            jobs: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            images: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
            job_duration: Histogram::new(LATENCY_BOUNDS),
            step_duration: Histogram::new(LATENCY_BOUNDS),
            ready: AtomicBool::new(false),
        }
    }

    /// Ready = connected, topology in place, pulling (false again while draining).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn observe_queue_wait(&self, wait: Duration) {
        self.queue_wait.observe(wait);
    }

    pub fn set_in_flight(&self, jobs: usize) {
        self.in_flight.store(jobs as u64, Ordering::Relaxed);
    }

    pub fn step(&self, duration: Duration) {
        self.step_duration.observe(duration);
    }

    pub fn job_finished(&self, record: JobRecord) {
        let key = (
            record.kind.to_string(),
            record.model.unwrap_or("n/a").to_string(),
            record.status.to_string(),
            record.private,
        );
        *self.jobs.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
        if let Some(code) = record.error_code {
            *self.errors.lock().unwrap_or_else(|e| e.into_inner()).entry(code.to_string()).or_default() += 1;
        }
        self.images.fetch_add(record.images, Ordering::Relaxed);
        self.job_duration.observe(record.duration);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP imago_jobs_total Jobs finished, by kind, model, status and private mode.\n# TYPE imago_jobs_total counter");
        for ((kind, model, status, private), n) in self.jobs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "imago_jobs_total{{kind=\"{kind}\",model=\"{}\",status=\"{status}\",private=\"{private}\"}} {n}",
                escape(model)
            );
        }
        let _ = writeln!(
            out,
            "# HELP imago_job_errors_total Failed jobs by error code.\n# TYPE imago_job_errors_total counter"
        );
        for (code, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "imago_job_errors_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP imago_images_total Images generated.\n# TYPE imago_images_total counter\nimago_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        let uptime = self.started.elapsed().as_secs_f64();
        let per_second = self.images.load(Ordering::Relaxed) as f64 / uptime.max(1e-9);
        let _ = writeln!(out, "# HELP imago_images_per_second Images per second since start.\n# TYPE imago_images_per_second gauge\nimago_images_per_second {per_second}");
        let _ = writeln!(
            out,
            "# HELP imago_jobs_in_flight Jobs running now.\n# TYPE imago_jobs_in_flight gauge\nimago_jobs_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        self.queue_wait.render(&mut out, "imago_queue_wait_seconds", "Time from publication to the start of work.");
        self.job_duration.render(&mut out, "imago_job_duration_seconds", "Time from the start of work to the result.");
        self.step_duration.render(&mut out, "imago_step_duration_seconds", "Time per denoising step.");
        if let Some(rss) = resident_memory_bytes() {
            let _ = writeln!(out, "# HELP imago_host_memory_bytes Resident memory of the worker process.\n# TYPE imago_host_memory_bytes gauge\nimago_host_memory_bytes {rss}");
        }
        let _ = writeln!(out, "# HELP imago_uptime_seconds Seconds since the worker started.\n# TYPE imago_uptime_seconds gauge\nimago_uptime_seconds {uptime}");
        let _ = writeln!(
            out,
            "# HELP imago_ready Whether the worker is pulling jobs.\n# TYPE imago_ready gauge\nimago_ready {}",
            self.is_ready() as u8
        );
        out
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// VmRSS of this process, from /proc (Linux).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_in_prometheus_format() {
        let m = Metrics::new();
        m.observe_queue_wait(Duration::from_millis(30));
        m.job_finished(JobRecord {
            kind: "generate",
            model: Some("sd15"),
            status: "ok",
            error_code: None,
            private: false,
            images: 2,
            duration: Duration::from_millis(700),
        });
        m.job_finished(JobRecord {
            kind: "edit",
            model: None,
            status: "error",
            error_code: Some("unknown_model"),
            private: false,
            images: 0,
            duration: Duration::ZERO,
        });
        let text = m.render();
        assert!(
            text.contains("imago_jobs_total{kind=\"generate\",model=\"sd15\",status=\"ok\",private=\"false\"} 1"),
            "{text}"
        );
        assert!(text.contains("imago_jobs_total{kind=\"edit\",model=\"n/a\",status=\"error\",private=\"false\"} 1"));
        assert!(text.contains("imago_job_errors_total{code=\"unknown_model\"} 1"));
        assert!(text.contains("imago_images_total 2"));
        assert!(text.contains("imago_queue_wait_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("imago_queue_wait_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("imago_jobs_in_flight 0"));
    }
}
