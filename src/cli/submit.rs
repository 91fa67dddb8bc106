//! `imago submit`: a client that sends one job, follows its progress, writes its images, and exits non-zero on an
//! error result; `--private` and `--seal` send it in Private Mode. `imago cancel` asks the fleet to cancel a job.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::Args;
use imago::job::{ImageRef, JobKind, JobMessage, JobStatus, OutputFormat, PROTOCOL_VERSION};
use imago::private::seal::{JobContent, PublicKey};
use imago::private::{SecretBytes, SecretString};
use imago::queue::QueueConfig;

use super::connect::ConnectArgs;
use super::generate::{parse_size, progress_bar};

/// Inputs larger than this are uploaded to the object store instead of travelling inline.
const INLINE_INPUT_LIMIT: usize = 256 * 1024;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// What to draw.
    pub prompt: String,
    /// Picture to edit (makes this an edit job).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Inpainting mask (white = repaint).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[arg(long)]
    pub strength: Option<f64>,
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    #[arg(long, default_value = "default")]
    pub model: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Job id (default: generated). Submitting the same id again is deduplicated.
    #[arg(long)]
    pub id: Option<String>,
    /// Pseudonymous user id stored with outputs.
    #[arg(long)]
    pub user: Option<String>,
    /// Give up waiting after this many seconds (the job itself gets this deadline too).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// jpeg instead of png.
    #[arg(long)]
    pub jpeg: bool,
    /// Private Mode: the content lives only in locked, wiped memory on the worker and the output is never stored
    /// in plaintext (without --seal the images come back on a private inbox only).
    #[arg(long)]
    pub private: bool,
    /// Seal the prompt, image and mask to the fleet's public key (implies --private): the queue and the object
    /// store only ever see ciphertext, and the images come back sealed to a one-time key of this client.
    #[arg(long, requires = "fleet_key")]
    pub seal: bool,
    /// The fleet's public key file (written by `imago keygen`), for --seal.
    #[arg(long, env = "IMAGO_FLEET_PUBLIC_KEY")]
    pub fleet_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The job to cancel.
    pub id: String,
}

fn new_job_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("job-{nanos:x}-{:x}", std::process::id())
}

pub fn run(args: SubmitArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(submit(args))
}

pub fn run_cancel(args: CancelArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let queue = args.connect.queue("imago-cancel", QueueConfig::default()).await?;
        queue.cancel(&args.id).await?;
        println!("cancel requested for {}", args.id);
        Ok(())
    })
}

async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let queue = args.connect.queue("imago-submit", QueueConfig::default()).await?;
    let id = args.id.clone().unwrap_or_else(new_job_id);
    let input = |path: &Path, name: &str| {
        let queue = &queue;
        let id = id.clone();
        let name = name.to_string();
        let path = path.to_path_buf();
        let user = args.user.clone();
        async move {
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            anyhow::Ok(if bytes.len() <= INLINE_INPUT_LIMIT {
                ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                queue.upload_input(&id, &name, &bytes, user.as_deref()).await?
            })
        }
    };
    if args.mask.is_some() && args.image.is_none() {
        bail!("--mask needs --image");
    }
    // A sealed job's image and mask travel inside the sealed content, not as clear inputs.
    let (image, mask) = match (&args.image, &args.mask, args.seal) {
        (Some(image), mask, false) => {
            let mask = match mask {
                Some(p) => Some(input(p, "mask").await?),
                None => None,
            };
            (Some(input(image, "image").await?), mask)
        }
        _ => (None, None),
    };
    let private = args.private || args.seal;
    let deadline_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d + Duration::from_secs(args.timeout)).as_millis() as u64)
        .ok();
    let mut job = JobMessage {
        v: PROTOCOL_VERSION,
        id: id.clone(),
        kind: if args.image.is_some() { JobKind::Edit } else { JobKind::Generate },
        model: args.model.clone(),
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        width: args.size.map(|(w, _)| w as u32),
        height: args.size.map(|(_, h)| h as u32),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler.clone(),
        batch: args.batch,
        strength: args.strength,
        mask_blur: 0.0,
        image,
        mask,
        private,
        training_opt_in: false,
        user: args.user.clone(),
        // An unsealed private job's images are sent only to its reply subject, never stored.
        reply: (private && !args.seal).then(|| queue.client.new_inbox()),
        deadline_ms,
        output_format: if args.jpeg { OutputFormat::Jpeg } else { OutputFormat::Png },
        sealed: None,
    };
    let reply_key = match (&args.fleet_key, args.seal) {
        (Some(key_file), true) => {
            let fleet_key = PublicKey::read_file(key_file)?;
            let content = sealed_content(&args)?;
            Some(queue.seal_job(&mut job, &content, &fleet_key).await?)
        }
        _ => None,
    };
    eprintln!("submitted {id}");
    let bar = progress_bar(1);
    let result = queue
        .submit(&job, Duration::from_secs(args.timeout), |event| {
            if let (Some(step), Some(total)) = (event.step, event.total) {
                bar.set_length(total as u64);
                bar.set_position(step as u64);
            }
        })
        .await?;
    bar.finish_and_clear();
    match result.status {
        JobStatus::Ok => {}
        status => {
            let (code, message) =
                result.error.map(|e| (e.code.as_str(), e.message)).unwrap_or(("unknown", String::new()));
            bail!("job {id} ended {status:?}: {code}: {message}");
        }
    }
    let count = result.images.len();
    let write = |i: usize, bytes: &[u8]| {
        let path = super::generate::output_path(&args.output, i, count);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        anyhow::Ok(())
    };
    match &reply_key {
        Some(reply_key) => {
            for (i, image) in queue.open_result(&result, reply_key).await?.iter().enumerate() {
                write(i, image.expose())?;
            }
        }
        None => {
            for (i, image) in result.images.iter().enumerate() {
                write(i, &queue.image_bytes(image).await?)?;
            }
        }
    }
    if let Some(t) = &result.timings {
        eprintln!(
            "{id}: seeds {:?}, queue {} ms, total {} ms on {}",
            result.seeds,
            t.queue_ms.unwrap_or(0),
            t.total_ms,
            result.worker.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// The content of a sealed job: the prompts and the input files, read into secret buffers.
fn sealed_content(args: &SubmitArgs) -> anyhow::Result<JobContent> {
    let read = |path: &Option<PathBuf>| -> anyhow::Result<Option<SecretBytes>> {
        path.as_ref()
            .map(|p| std::fs::read(p).map(SecretBytes::from_vec).with_context(|| format!("reading {}", p.display())))
            .transpose()
    };
    Ok(JobContent {
        prompt: SecretString::from(args.prompt.clone()),
        negative_prompt: SecretString::from(args.negative.clone()),
        image: read(&args.image)?,
        mask: read(&args.mask)?,
    })
}
