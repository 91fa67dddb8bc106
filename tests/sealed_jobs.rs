//! Private Mode on the queue, through the real worker and a real nats-server. Sealed jobs: the client seals a
//! generate and an edit job to the fleet key, the worker opens them and seals each output to the client's one-time
//! key, and the client opens valid PNGs; no message on any subject, no stream, no stored object and no file of the
//! server holds a sealed prompt, input or output in plaintext (while a clear job's content in the same run is
//! found, so each search can fail); a job sealed to a key the worker lacks, or replayed under another id, is refused
//! with its code. Unsealed private jobs: images only on `reply`, a content-free record in the results stream.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use common::nats::NatsServer;
use common::workers::{client, job, publish, WorkerProcess, WAIT};
use futures::StreamExt;
use imago::job::{ErrorCode, ImageRef, JobKind, JobMessage, JobResult, JobStatus};
use imago::private::seal::{generate_key_files, JobContent, PublicKey, SecretKey};
use imago::private::{SecretBytes, SecretString};
use imago::queue::{Queue, QueueConfig};

const SEALED_PROMPT: &str = "sealed canary 7f3a9c2e";
const SEALED_EDIT_PROMPT: &str = "sealed canary 19be42d0";
const SEALED_NEGATIVE: &str = "sealed negative canary 5b11";
const CLEAR_PROMPT: &str = "clear canary 5d2e81aa";
const CLEAR_USER: &str = "clear-user-canary-0c4f";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// 32 bytes from the middle of an image file: compressed pixel data, found nowhere else.
fn fingerprint(file: &[u8]) -> Vec<u8> {
    let middle = file.len() / 2;
    file[middle..middle + 32].to_vec()
}

fn photo() -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos/astronaut.png")).unwrap()
}

fn right_half_mask(side: u32) -> Vec<u8> {
    let mut mask = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(side, side, |x, _| {
        image::Luma([if x >= side / 2 { 255 } else { 0 }])
    }))
    .write_to(&mut std::io::Cursor::new(&mut mask), image::ImageFormat::Png)
    .unwrap();
    mask
}

/// Every stored message of a stream, as bytes to search: subject, headers and payload.
async fn stored_messages(stream: &Stream) -> Vec<Vec<u8>> {
    let state = stream.clone().info().await.unwrap().state.clone();
    let mut messages = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let headers = format!("{:?}", m.headers);
            messages.push([m.subject.as_bytes(), headers.as_bytes(), &m.payload].concat());
        }
    }
    messages
}

/// Every file under `dir`, concatenated.
fn files_under(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(files_under(&path));
        } else if let Ok(contents) = std::fs::read(&path) {
            bytes.extend(contents);
        }
    }
    bytes
}

fn sealed_content(prompt: &str, image: Option<&[u8]>, mask: Option<&[u8]>) -> JobContent {
    JobContent {
        prompt: SecretString::from(prompt.to_string()),
        negative_prompt: SecretString::from(SEALED_NEGATIVE.to_string()),
        image: image.map(SecretBytes::copy_from),
        mask: mask.map(SecretBytes::copy_from),
    }
}

async fn next_result(results: &mut async_nats::Subscriber) -> JobResult {
    let message = tokio::time::timeout(WAIT, results.next()).await.expect("a result in time").unwrap();
    serde_json::from_slice(&message.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_jobs_leave_only_ciphertext_behind_and_open_for_their_client() {
    let server = NatsServer::start();
    // A small inline limit sends the sealed edit's ciphertext (photo and mask) through the object store.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let queue = Queue::setup(nats, QueueConfig { inline_limit: 16 * 1024, ..QueueConfig::default() }).await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let fleet = generate_key_files(keys.path()).unwrap();
    let fleet_key = PublicKey::read_file(&fleet.public).unwrap();
    let mut wiretap = queue.client.subscribe(">").await.unwrap();
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    queue.client.flush().await.unwrap();

    // 1. the jobs, queued before any worker runs, so the jobs stream can be read as it stores them
    let (photo, mask) = (photo(), right_half_mask(128));
    let mut generate = JobMessage { batch: 2, ..job("sealed-gen", "sd-turbo", 1) };
    let generate_key = queue.seal_job(&mut generate, &sealed_content(SEALED_PROMPT, None, None), &fleet_key).await;
    let generate_key = generate_key.unwrap();
    let mut edit =
        JobMessage { kind: JobKind::Edit, width: Some(64), height: Some(64), ..job("sealed-edit", "sd15", 2) };
    let content = sealed_content(SEALED_EDIT_PROMPT, Some(&photo), Some(&mask));
    let edit_key = queue.seal_job(&mut edit, &content, &fleet_key).await.unwrap();
    let Some(ImageRef::Object(ciphertext_key)) = edit.sealed.as_ref().map(|s| s.ciphertext.clone()) else {
        panic!("the edit's ciphertext should be in the object store: {:?}", edit.sealed)
    };
    let mut unknown_key = job("sealed-unknown-key", "sd-turbo", 1);
    let stranger = SecretKey::generate();
    queue.seal_job(&mut unknown_key, &sealed_content("x", None, None), stranger.public_key()).await.unwrap();
    let replayed = JobMessage { id: "sealed-replayed".into(), ..generate.clone() };
    let clear = JobMessage { user: Some(CLEAR_USER.into()), ..job("clear", "sd-turbo", 1) };
    let clear = JobMessage { prompt: CLEAR_PROMPT.into(), ..clear };
    for j in [&generate, &edit, &unknown_key, &replayed, &clear] {
        publish(&queue, j).await;
    }
    let queued = stored_messages(&queue.jobs).await;
    assert_eq!(queued.len(), 5);
    let sealed_secrets: Vec<Vec<u8>> = [SEALED_PROMPT, SEALED_EDIT_PROMPT, SEALED_NEGATIVE]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .chain([fingerprint(&photo), fingerprint(&mask)])
        .collect();
    for (i, message) in queued.iter().take(4).enumerate() {
        assert!(!sealed_secrets.iter().any(|s| contains(message, s)), "queued job {i} holds sealed content");
    }
    assert!(contains(&queued[4], CLEAR_PROMPT.as_bytes()), "the search finds a clear job's prompt");

    // 2. the worker answers each
    let _worker = WorkerProcess::start(&server, "sealer", &["--fleet-key", fleet.secret.to_str().unwrap()]);
    let mut answered = std::collections::HashMap::new();
    while answered.len() < 5 {
        let result = next_result(&mut results).await;
        answered.insert(result.id.clone(), result);
    }
    let code = |id: &str| answered[id].error.as_ref().map(|e| e.code);
    assert_eq!(code("sealed-unknown-key"), Some(ErrorCode::SealUnknownKey), "{:?}", answered["sealed-unknown-key"]);
    assert_eq!(code("sealed-replayed"), Some(ErrorCode::SealInvalid), "{:?}", answered["sealed-replayed"]);
    assert_eq!(answered["clear"].status, JobStatus::Ok, "{:?}", answered["clear"]);

    // 3. the client opens valid PNGs (the edit keeps the unmasked half of the sealed photo); nobody else can
    let mut outputs = Vec::new();
    let mut edited = None;
    for (id, key, count, side) in [("sealed-gen", &generate_key, 2, 64), ("sealed-edit", &edit_key, 1, 64)] {
        let result = &answered[id];
        assert_eq!(result.status, JobStatus::Ok, "{result:?}");
        assert!(result.sealed, "{result:?}");
        let opened = queue.open_result(result, key).await.unwrap();
        assert_eq!(opened.len(), count);
        for png in &opened {
            assert_eq!(image::guess_format(png.expose()).unwrap(), image::ImageFormat::Png);
            let decoded = image::load_from_memory(png.expose()).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (side, side));
            outputs.push(fingerprint(png.expose()));
            edited = Some(decoded.to_rgb8());
        }
        assert!(queue.open_result(result, &stranger).await.is_err(), "{id} opened with another key");
    }
    let edited = edited.unwrap();
    let original = imago::diffusion::input::fit_image(&image::load_from_memory(&photo).unwrap().to_rgb8(), 64, 64);
    assert!((0..64).all(|y| (0..32).all(|x| edited.get_pixel(x, y) == original.get_pixel(x, y))));

    // 4. no plaintext anywhere: on the wire, in the streams, in the object store, in the server's files
    let mut wire = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), wiretap.next()).await {
        wire.push([message.subject.as_bytes(), &message.payload].concat());
    }
    let object_stream = queue.js.get_stream(format!("OBJ_{}", queue.config.names.bucket())).await.unwrap();
    let stored = [stored_messages(&queue.results).await, stored_messages(&object_stream).await].concat();
    assert!(stored.iter().any(|m| contains(m, ciphertext_key.as_bytes())), "the object store was searched");
    let everything_sealed: Vec<&Vec<u8>> = sealed_secrets.iter().chain(&outputs).collect();
    for (place, messages) in [("the wire", &wire), ("a stream or the object store", &stored)] {
        for secret in &everything_sealed {
            assert!(!messages.iter().any(|m| contains(m, secret)), "sealed content found in {place}");
        }
    }
    assert!(wire.iter().any(|m| contains(m, CLEAR_PROMPT.as_bytes())), "the wire search finds a clear prompt");
    let on_disk = files_under(&server.dir.path().join("store"));
    assert!(contains(&on_disk, CLEAR_USER.as_bytes()), "the file search finds what the server stored");
    for secret in &everything_sealed {
        assert!(!contains(&on_disk, secret), "sealed content found in the server's files");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsealed_private_jobs_images_go_only_to_its_reply_subject() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    // An inline limit of 1 byte would send any other job's images to the object store.
    let _worker = WorkerProcess::start(&server, "private", &["--inline-limit", "1"]);
    let private =
        JobMessage { private: true, reply: Some(queue.client.new_inbox()), ..job("private-plain", "sd-turbo", 1) };
    let result = queue.submit(&private, WAIT, |_| {}).await.unwrap();
    assert_eq!(result.status, JobStatus::Ok, "{result:?}");
    assert!(!result.sealed);
    let [ImageRef::Inline(_)] = result.images.as_slice() else { panic!("one inline image: {result:?}") };
    let png = queue.image_bytes(&result.images[0]).await.unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 64);
    let stored: JobResult = serde_json::from_slice(&queue.existing_result("private-plain").await.unwrap()).unwrap();
    assert_eq!((stored.status, stored.images.len(), stored.seeds.len()), (JobStatus::Ok, 0, 0));
    let mut objects = queue.images.list().await.unwrap();
    let mut names = Vec::new();
    while let Some(object) = objects.next().await {
        names.push(object.unwrap().name);
    }
    assert!(names.is_empty(), "a private job's output reached the object store: {names:?}");
    // Without a reply subject an unsealed private job is refused before any work.
    let no_reply = JobMessage { private: true, ..job("private-no-reply", "sd-turbo", 1) };
    let mut results = queue.client.subscribe(queue.config.names.results("private-no-reply")).await.unwrap();
    publish(&queue, &no_reply).await;
    let refused = next_result(&mut results).await;
    assert_eq!(refused.error.map(|e| e.code), Some(ErrorCode::InvalidParameter));
}

#[test]
fn keygen_writes_a_key_pair_the_worker_shows_only_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let imago = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_imago")).args(args).output().unwrap();
    let out = dir.path().join("keys");
    let made = imago(&["keygen", "--out", out.to_str().unwrap()]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let printed = String::from_utf8(made.stdout).unwrap();
    let (secret, public) = printed.trim().split_once('\n').unwrap();
    let key = SecretKey::read_file(Path::new(secret)).unwrap();
    assert_eq!(&PublicKey::read_file(Path::new(public)).unwrap(), key.public_key());
    let secret_text = std::fs::read_to_string(secret).unwrap();
    let encoded_secret = secret_text.split_whitespace().nth(1).unwrap();
    let config = imago(&["worker", "--fleet-key", secret, "--fleet-key", "keys/old.key", "--print-config"]);
    assert!(config.status.success(), "{}", String::from_utf8_lossy(&config.stderr));
    let shown = String::from_utf8(config.stdout).unwrap();
    assert!(shown.contains(secret) && shown.contains("keys/old.key"), "{shown}");
    assert!(!shown.contains(encoded_secret), "{shown}");
    let again = imago(&["keygen", "--out", out.to_str().unwrap()]);
    assert!(again.status.success(), "a second key goes next to the first");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
}
