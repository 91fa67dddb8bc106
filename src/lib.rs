//! imago: a Stable-Diffusion-family image-generation worker on candle.
//!
//! Rooms, with one-way dependencies:
//! - [`diffusion`]: models loaded from diffusers folders, schedulers, tokenizer and the text-to-image pipeline.
//!   It knows nothing about queues or jobs and is testable on its own.

pub mod diffusion;
