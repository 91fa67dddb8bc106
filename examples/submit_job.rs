//! Submitting a job through the library API, as a dispatcher written in Rust would: connect, make sure the streams
//! exist, publish a generate job, follow its progress, save the image.
//!
//!     cargo run --example submit_job -- nats://127.0.0.1:4222 "a red circle on a white background" out.png
//!
//! Needs a running `imago worker` on the same server.

use std::time::Duration;

use imago::job::{JobMessage, JobStatus};
use imago::queue::{connect, ConnectConfig, Queue, QueueConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let prompt = args.next().unwrap_or_else(|| "a red circle on a white background".into());
    let output = args.next().unwrap_or_else(|| "out.png".into());

    let client = connect(&ConnectConfig { url, name: Some("submit-example".into()), ..Default::default() }).await?;
    let queue = Queue::setup(client, QueueConfig::default()).await?;
    let job = JobMessage { seed: Some(42), ..JobMessage::generate(format!("example-{}", std::process::id()), prompt) };
    let result = queue
        .submit(&job, Duration::from_secs(300), |event| {
            if let (Some(step), Some(total)) = (event.step, event.total) {
                eprintln!("{}: step {step}/{total}", event.id);
            }
        })
        .await?;
    if result.status != JobStatus::Ok {
        anyhow::bail!("job failed: {:?}", result.error);
    }
    std::fs::write(&output, queue.image_bytes(&result.images[0]).await?)?;
    println!("{output} (seed {:?}, {} ms)", result.seeds, result.timings.map(|t| t.total_ms).unwrap_or(0));
    Ok(())
}
