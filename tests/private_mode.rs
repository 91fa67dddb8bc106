//! Private Mode, proven on the real worker process against a real nats-server.
//!
//! A private inpainting job carries random canaries: prompt and negative prompt text, the input image's file bytes
//! (and their base64), its decoded pixels, the mask file, and — once it exists — the output image. It runs twice:
//! in the clear (images inline, result on `reply`) and sealed to the fleet key. The test reads the worker's memory
//! through `/proc/<pid>/mem`:
//! - while the job runs (the worker frozen with SIGSTOP at its first step), the canaries the job must hold are
//!   found: the scan works, so the test can fail;
//! - after the result is out, no canary is left anywhere in the worker's writable memory.
//!
//! The same run checks that the job created no file and wrote nothing to storage, that the trace-level log holds no
//! canary, that the process is hardened, and that a non-private job keeps its normal features (PNG metadata).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::nats::NatsServer;
use common::tiny_model_dir;
use common::workers::{client, job, WAIT};
use futures::StreamExt;
use imago::diffusion::tiny::TinyFamily;
use imago::job::{ImageRef, JobKind, JobMessage, JobResult, JobStatus, ProgressEvent};
use imago::private::seal::{generate_key_files, JobContent, PublicKey, SecretKey};
use imago::private::{SecretBytes, SecretString};
use imago::queue::Queue;
use rand::{Rng, SeedableRng};

/// A worker whose stderr is kept in memory (a log file would itself be a disk write of the job's time).
struct Worker {
    child: Child,
    log: Arc<Mutex<String>>,
    tmp: tempfile::TempDir,
}

impl Worker {
    fn start(server: &NatsServer, fleet_secret_key: &Path) -> Self {
        let models = tiny_model_dir(TinyFamily::SdTurbo).parent().unwrap().to_path_buf();
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_imago"))
            .args(["worker", "--nats", &server.url(), "--models"])
            .arg(&models)
            .args(["--name", "private", "--ack-wait", "30", "--fleet-key"])
            .arg(fleet_secret_key)
            .env("RUST_LOG", "trace")
            .env("TMPDIR", tmp.path())
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start worker");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Self { child, log, tmp }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, signal: &str) {
        assert!(Command::new("kill").args([signal, &self.pid().to_string()]).status().unwrap().success());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Byte strings searched for in the worker's memory, by name.
type Canaries = BTreeMap<&'static str, Vec<u8>>;

/// Occurrences of each canary in the process's writable, non-file memory (heap, stacks, anonymous mappings: where
/// a program keeps data), with the regions they were found in.
fn scan_memory(pid: u32, canaries: &Canaries) -> BTreeMap<&'static str, Vec<String>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem"))
        .expect("reading the worker's memory needs ptrace rights over it (run the tests as root or as its owner)");
    let mut hits: BTreeMap<&'static str, Vec<String>> = canaries.keys().map(|k| (*k, Vec::new())).collect();
    let longest = canaries.values().map(Vec::len).max().unwrap_or(0);
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let path = fields.nth(3).unwrap_or("");
        let data_region =
            path.is_empty() || path.starts_with("[heap") || path.starts_with("[stack") || path.starts_with("[anon");
        if !perms.starts_with("rw") || !data_region {
            continue;
        }
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
        // Chunks overlap by the longest canary so none is missed at a boundary.
        const CHUNK: u64 = 8 << 20;
        let mut start = lo;
        let mut buffer = vec![0u8; CHUNK as usize + longest];
        while start < hi {
            let len = ((hi - start).min(CHUNK + longest as u64)) as usize;
            if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buffer[..len]).is_err() {
                break; // a region that vanished or cannot be read (guard pages)
            }
            for (name, canary) in canaries {
                if memchr::memmem::find(&buffer[..len], canary).is_some() {
                    hits.get_mut(name).unwrap().push(format!("{line} @ chunk {start:#x}"));
                }
            }
            start += CHUNK;
        }
    }
    hits
}

/// Files the process has open on real filesystems (not sockets, pipes, devices, or /proc and /sys, which libraries
/// read for CPU features and which hold nothing written).
fn open_files(pid: u32) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with('/') && !["/dev/", "/proc/", "/sys/"].iter().any(|pseudo| p.starts_with(pseudo)))
        .collect();
    files.sort();
    files
}

/// Bytes the process caused to be sent to storage, from /proc/<pid>/io.
fn storage_bytes_written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).unwrap().trim().parse().unwrap()
}

/// A PNG of random pixels (incompressible, so its file bytes carry the pixel bytes too) and its raw RGB.
fn noise_png(rng: &mut impl Rng, side: u32) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..side * side * 3).map(|_| rng.gen()).collect();
    let image = image::RgbImage::from_raw(side, side, pixels.clone()).unwrap();
    let mut file = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut file), image::ImageFormat::Png).unwrap();
    (file, pixels)
}

fn middle(bytes: &[u8], len: usize) -> Vec<u8> {
    bytes[bytes.len() / 2..bytes.len() / 2 + len].to_vec()
}

fn image_bytes(result: &JobResult) -> Vec<u8> {
    match &result.images[0] {
        ImageRef::Inline(b64) => base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
        ImageRef::Object(key) => panic!("expected an inline image, got object {key}"),
    }
}

fn has_png_text(png: &[u8]) -> bool {
    png.windows(4).any(|w| w == b"tEXt" || w == b"iTXt")
}

/// One private job's canaries and the job carrying them; `sealed` puts the content in a sealed box.
struct CanaryJob {
    job: JobMessage,
    canaries: Canaries,
    /// Opens a sealed result (None: the images arrive in the clear on `reply`).
    result_key: Option<SecretKey>,
}

async fn canary_job(queue: &Queue, id: &str, fleet_key: Option<&PublicKey>) -> CanaryJob {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let word = |rng: &mut rand::rngs::StdRng| format!("zq{:016x}", rng.gen::<u64>());
    let (prompt_word, negative_word) = (word(&mut rng), word(&mut rng));
    let (image_file, pixels) = noise_png(&mut rng, 64);
    let (mask_file, _) = noise_png(&mut rng, 64);
    let image_b64 = base64::engine::general_purpose::STANDARD.encode(&image_file);
    let mut canaries = Canaries::new();
    canaries.insert("prompt", prompt_word.clone().into_bytes());
    canaries.insert("negative prompt", negative_word.clone().into_bytes());
    canaries.insert("image file", middle(&image_file, 32));
    // Row 20 of the decoded picture, 16 pixels: the decoder's output buffer.
    canaries.insert("decoded pixels", pixels[(20 * 64 + 8) * 3..(20 * 64 + 24) * 3].to_vec());
    canaries.insert("mask file", middle(&mask_file, 32));
    let (prompt, negative_prompt) = (format!("a red circle {prompt_word}"), format!("blurry {negative_word}"));

    let mut job = job(id, "sd-turbo", 150);
    job.kind = JobKind::Edit;
    job.private = true;
    job.strength = Some(1.0);
    let result_key = match fleet_key {
        None => {
            canaries.insert("image base64", middle(image_b64.as_bytes(), 32));
            job.prompt = prompt;
            job.negative_prompt = negative_prompt;
            job.image = Some(ImageRef::Inline(image_b64));
            job.mask = Some(ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(&mask_file)));
            // An unsealed private job's images travel only to its reply subject; they are never stored.
            job.reply = Some(format!("_INBOX.private-{:016x}", rng.gen::<u64>()));
            None
        }
        Some(fleet_key) => {
            job.prompt = String::new();
            let content = JobContent {
                prompt: SecretString::from(prompt),
                negative_prompt: SecretString::from(negative_prompt),
                image: Some(SecretBytes::copy_from(&image_file)),
                mask: Some(SecretBytes::copy_from(&mask_file)),
            };
            Some(queue.seal_job(&mut job, &content, fleet_key).await.unwrap())
        }
    };
    CanaryJob { job, canaries, result_key }
}

/// Runs a canary job on the worker: checks that its content is in the worker's memory while it runs (the
/// positive control) and nowhere once its result is out; no file opened or created, nothing written to storage.
async fn run_and_scan(queue: &Arc<Queue>, worker: &Worker, mut case: CanaryJob) {
    let pid = worker.pid();
    let files_before = open_files(pid);
    let written_before = storage_bytes_written(pid);
    // Freeze the worker at the first denoising step and look: the job's content must be there.
    let mut progress = queue.client.subscribe(queue.config.names.progress(&case.job.id)).await.unwrap();
    let submit = {
        let (queue, job) = (queue.clone(), case.job.clone());
        tokio::spawn(async move { queue.submit(&job, WAIT, |_| {}).await })
    };
    let mut during = None;
    while let Some(message) = tokio::time::timeout(WAIT, progress.next()).await.unwrap() {
        let event: ProgressEvent = serde_json::from_slice(&message.payload).unwrap();
        if event.state == "step" {
            worker.signal("-STOP");
            during = Some((scan_memory(pid, &case.canaries), open_files(pid)));
            worker.signal("-CONT");
            break;
        }
    }
    let id = &case.job.id;
    let (hits_during, files_during) = during.expect("the private job reported a step");
    for name in ["prompt", "negative prompt", "image file", "decoded pixels", "mask file"] {
        assert!(!hits_during[name].is_empty(), "{id}: positive control: its running {name} was not found in memory");
    }

    let result = submit.await.unwrap().unwrap();
    assert_eq!(result.status, JobStatus::Ok, "{id}: {:?}", result.error);
    let output = match &case.result_key {
        None => image_bytes(&result),
        Some(key) => {
            assert!(result.sealed, "{id}: the result of a sealed job is sealed");
            queue.open_result(&result, key).await.unwrap().remove(0).expose().to_vec()
        }
    };
    assert!(!has_png_text(&output), "{id}: a private result carries no metadata");
    image::load_from_memory(&output).expect("the private result is a valid image");
    let output_b64 = base64::engine::general_purpose::STANDARD.encode(&output);
    case.canaries.insert("output file", middle(&output, 32));
    case.canaries.insert("output base64", middle(output_b64.as_bytes(), 32));

    // The worker erases as it returns; give the acknowledgement a moment, then every canary must be gone.
    let started = Instant::now();
    let residue = loop {
        let hits = scan_memory(pid, &case.canaries);
        if hits.values().all(Vec::is_empty) || started.elapsed() > Duration::from_secs(5) {
            break hits;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let left: Vec<String> = residue
        .iter()
        .filter(|(_, regions)| !regions.is_empty())
        .map(|(name, regions)| format!("{name}: {}", regions.join("; ")))
        .collect();
    assert!(left.is_empty(), "{id}: private content left in the worker's memory:\n{}", left.join("\n"));

    assert_eq!(files_during, files_before, "{id}: files opened during the private job");
    assert_eq!(open_files(pid), files_before, "{id}: files left open");
    assert_eq!(storage_bytes_written(pid), written_before, "{id}: the worker wrote to storage during the job");
    let log = worker.log();
    for (name, canary) in &case.canaries {
        assert!(!log.contains(String::from_utf8_lossy(canary).as_ref()), "{id}: {name} appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_jobs_leave_nothing_behind() {
    let server = NatsServer::start();
    let queue = Arc::new(client(&server).await);
    let keys = tempfile::tempdir().unwrap();
    let fleet = generate_key_files(keys.path()).unwrap();
    let fleet_key = PublicKey::read_file(&fleet.public).unwrap();
    let worker = Worker::start(&server, &fleet.secret);
    let pid = worker.pid();

    // A non-private job first: it loads the model and keeps its normal features.
    let public = queue.submit(&job("public-1", "sd-turbo", 2), WAIT, |_| {}).await.unwrap();
    assert_eq!(public.status, JobStatus::Ok, "{:?}", public.error);
    assert!(has_png_text(&image_bytes(&public)), "a non-private result carries its parameters as PNG text");

    run_and_scan(&queue, &worker, canary_job(&queue, "private-clear", None).await).await;
    run_and_scan(&queue, &worker, canary_job(&queue, "private-sealed", Some(&fleet_key)).await).await;

    assert_eq!(std::fs::read_dir(worker.tmp.path()).unwrap().count(), 0, "files created in the worker's TMPDIR");

    // Logs at trace level (each job's canaries were searched in them above), and the process is hardened.
    let log = worker.log();
    assert!(log.contains("TRACE") && log.contains("private-sealed"), "the worker logs at trace level:\n{log}");
    assert!(log.contains("not dumpable: yes, core files off: yes"), "hardening report missing:\n{log}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
}
