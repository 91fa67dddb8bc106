//! Diffusion: Stable-Diffusion-family models loaded from diffusers folders, schedulers, the CLIP tokenizer and the
//! text-to-image pipeline. Knows nothing about queues or jobs.

mod error;
pub mod noise;
pub mod schedulers;

pub use compute_pool::on_compute_pool;
pub use error::{Error, Result};
mod activation;
pub mod clip;
mod compute_pool;
pub mod config;
mod conv;
mod few_columns;
mod host;
mod layers;
pub mod model;
mod norm;
pub mod pipeline;
pub mod tokenizer;
pub mod unet;
pub mod vae;
mod weights;
mod winograd;

pub mod batch;
pub mod default_model;
pub mod edit;
pub(crate) mod full_size;
pub mod hub;
pub mod image_io;
pub mod input;
pub mod tiny;
