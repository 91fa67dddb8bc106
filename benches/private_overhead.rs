//! The cost of Private Mode on the tiny pipeline, through the engine, interleaved in one process:
//! - `plain`: the system allocator, a normal job (what imago would cost without Private Mode at all);
//! - `zero-on-free`: the `imago` binary's allocator (every freed block zeroed), a normal job;
//! - `private`: that allocator and a private job (secret buffers, tensor and matmul-scratch wipes).
//!
//! Rounds alternate the three so drift on a noisy machine hits all of them alike; medians are reported. Every round
//! has a new prompt, so no variant is helped by the embedding cache (which private jobs never use).
//!
//!     cargo bench --bench private_overhead [-- ROUNDS [MODEL]]     MODEL: `default` or `tiny-sd15` (default)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use imago::diffusion::default_model::default_model_dir;
use imago::diffusion::hub::HubOptions;
use imago::diffusion::input::InputLimits;
use imago::diffusion::model::LoadOptions;
use imago::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};
use imago::engine::{Engine, EngineConfig, JobControl, JobInputs, ModelDirectory};
use imago::job::{validate, JobLimits, JobMessage, JobSpec};
use imago::private::ZeroOnFree;

/// The binary's allocator with a switch, so one process can measure with and without it. Blocks allocated in one
/// mode and freed in the other are fine: zeroing is only ever extra work.
struct Switchable {
    zero_on_free: AtomicBool,
    zeroing: ZeroOnFree,
}

unsafe impl GlobalAlloc for Switchable {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.zero_on_free.load(Ordering::Relaxed) {
            self.zeroing.dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.zero_on_free.load(Ordering::Relaxed) {
            self.zeroing.realloc(ptr, layout, new_size)
        } else {
            System.realloc(ptr, layout, new_size)
        }
    }
}

#[global_allocator]
static ALLOCATOR: Switchable = Switchable { zero_on_free: AtomicBool::new(false), zeroing: ZeroOnFree(System) };

#[derive(Clone, Copy)]
enum Variant {
    Plain,
    ZeroOnFree,
    Private,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Plain, Variant::ZeroOnFree, Variant::Private];

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::ZeroOnFree => "zero-on-free",
            Variant::Private => "private",
        }
    }
}

fn spec(model: &str, private: bool, round: usize) -> JobSpec {
    let message = JobMessage {
        model: model.into(),
        seed: Some(round as u64),
        private,
        reply: Some("_INBOX.bench".into()),
        // A new prompt every round: ordinary jobs would otherwise reuse cached embeddings, which private jobs never
        // do, and the comparison would measure the cache instead of Private Mode's mechanisms.
        ..JobMessage::generate(format!("bench-{round}"), format!("a red circle on a white background, take {round}"))
    };
    validate(message, &JobLimits::default()).expect("a valid job")
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let model = args.get(1).map(String::as_str).unwrap_or("tiny-sd15");
    let scratch = tempfile::tempdir().expect("temp dir");
    let (models_dir, job_model) = if model == "default" {
        (None, "default")
    } else {
        let dir = scratch.path().join("tiny-sd15");
        write_tiny_model(&dir, TinyOptions { family: TinyFamily::Sd15, seed: 0, fp16_variant: false })
            .expect("tiny model");
        (Some(scratch.path().to_path_buf()), "tiny-sd15")
    };
    let engine = Engine::new(EngineConfig {
        models: ModelDirectory { models_dir, default_model: default_model_dir(), hub: HubOptions::from_env() },
        load: LoadOptions::cpu(),
        input_limits: InputLimits::default(),
    });
    let run = |variant: Variant, round: usize| {
        ALLOCATOR.zero_on_free.store(!matches!(variant, Variant::Plain), Ordering::SeqCst);
        let spec = spec(job_model, matches!(variant, Variant::Private), round);
        let started = Instant::now();
        let output = engine.run(&spec, &JobInputs::default(), &JobControl::default(), &mut |_| {});
        let elapsed = started.elapsed();
        output.expect("the job runs");
        elapsed
    };
    for variant in Variant::ALL {
        run(variant, 0); // warm-up: model load, first-touch allocations
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); Variant::ALL.len()];
    for round in 1..=rounds {
        for (i, variant) in Variant::ALL.into_iter().enumerate() {
            times[i].push(run(variant, round));
        }
    }
    let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
    println!("model {job_model}, {rounds} interleaved rounds, median job time through the engine:");
    for (variant, median) in Variant::ALL.iter().zip(&medians) {
        let ratio = median.as_secs_f64() / medians[0].as_secs_f64();
        println!(
            "  {:13} {:8.2} ms  {:+.1}% vs plain",
            variant.name(),
            median.as_secs_f64() * 1e3,
            (ratio - 1.0) * 100.0
        );
    }
    let private_vs_normal = medians[2].as_secs_f64() / medians[1].as_secs_f64();
    println!("  private vs a normal job of the same binary: {:+.1}%", (private_vs_normal - 1.0) * 100.0);
}
