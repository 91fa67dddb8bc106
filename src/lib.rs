//! imago: a Stable-Diffusion-family image-generation worker on candle.
//!
//! Rooms, with one-way dependencies:
//! - [`diffusion`]: models loaded from diffusers folders, schedulers, tokenizer and the text-to-image pipeline.
//!   It knows nothing about queues or jobs and is testable on its own.
//! - [`job`]: the wire protocol (versioned JSON job and result messages) and validation; the shared vocabulary.
//! - [`engine`]: runs validated jobs on loaded models: model cache, inputs, cancellation, deadlines. No NATS.
//! - [`queue`]: the NATS JetStream transport: streams, the pull loop, results, progress, cancel, dead letters.
//!
//! - [`private`]: Private Mode: secret buffers, the zero-on-free allocator, wiping, sealing, process hardening.
//!   It uses none of the other rooms and all of them use it.
//! - [`telemetry`]: Prometheus metrics and health endpoints, aggregate only.
//! - [`bench`]: measuring the generation path for `imago bench` (speed, latency, memory); it drives `engine` and
//!   `diffusion` and nothing depends on it.
//!
//! Dependencies point one way: `queue` → `engine` → `diffusion`, with `job` and `private` used by all three.

pub mod bench;
pub mod diffusion;
pub mod engine;
pub mod job;
pub mod private;
pub mod queue;
pub mod telemetry;
