//! Every class of malformed job, image and mask, sent through a real worker on a real nats-server: each gets an
//! error result with its code, and none is retried (the work queue ends empty). The table printed with
//! `--nocapture` is the one in the documentation (docs/reliability.md, the README).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::nats::NatsServer;
use common::workers::{client, WorkerProcess, WAIT};
use futures::StreamExt;
use imago::job::{ErrorCode, JobKind, JobMessage, JobResult, JobStatus};
use imago::private::seal::{generate_key_files, JobContent, PublicKey, SecretKey};
use imago::private::{SecretBytes, SecretString};
use serde_json::{json, Value};

/// What a case sends as the job message.
enum Body {
    Raw(&'static [u8]),
    Json(Value),
}

struct Case {
    id: &'static str,
    class: &'static str,
    body: Body,
    code: ErrorCode,
}

fn hostile(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile").join(name)).unwrap()
}

fn fuzz_finding(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/image_decode").join(name)).unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::new_rgb8(width, height)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn inline(bytes: &[u8]) -> Value {
    json!({ "inline": base64::engine::general_purpose::STANDARD.encode(bytes) })
}

/// A generate job with `changes` applied.
fn generate(id: &str, changes: Value) -> Value {
    let mut job = json!({"v": 1, "id": id, "kind": "generate", "model": "sd-turbo", "prompt": "a red circle"});
    for (key, value) in changes.as_object().unwrap() {
        job[key] = value.clone();
    }
    job
}

/// An edit job of a valid 64×64 picture with `changes` applied.
fn edit(id: &str, changes: Value) -> Value {
    let mut job = generate(id, json!({"kind": "edit", "image": inline(&png(64, 64))}));
    for (key, value) in changes.as_object().unwrap() {
        job[key] = value.clone();
    }
    job
}

/// The fields of a sealed job `id` of `kind` (private, no clear prompt, `sealed`): `prompt` and `image` sealed to
/// `fleet_key`.
fn sealed(id: &str, kind: JobKind, fleet_key: &PublicKey, prompt: &str, image: Option<&[u8]>) -> Value {
    let content = JobContent {
        prompt: SecretString::from(prompt.to_string()),
        image: image.map(SecretBytes::copy_from),
        ..JobContent::default()
    };
    let mut job = JobMessage { kind, ..JobMessage::generate(id, "") };
    job.seal(&content, fleet_key).unwrap();
    json!({"kind": kind, "private": true, "prompt": "", "sealed": job.sealed})
}

/// `job` with one change.
fn tweaked(mut job: Value, tweak: impl FnOnce(&mut Value)) -> Value {
    tweak(&mut job);
    job
}

fn cases(object_keys: &HashMap<&str, String>, fleet_key: &PublicKey) -> Vec<Case> {
    use ErrorCode::*;
    let case = |id, class, body, code| Case { id, class, body, code };
    let s = |id: &str, prompt: &str| sealed(id, JobKind::Generate, fleet_key, prompt, None);
    let j = |id: &'static str, class, changes, code| case(id, class, Body::Json(generate(id, changes)), code);
    let e = |id: &'static str, class, changes, code| case(id, class, Body::Json(edit(id, changes)), code);
    let object = |name: &str| json!({ "object": object_keys[name] });
    vec![
        // the message
        case("raw-garbage", "not JSON", Body::Raw(b"\x00\xffnot json"), InvalidJson),
        case("raw-truncated", "truncated JSON", Body::Raw(br#"{"v": 1, "id": "raw-truncated", "kind""#), InvalidJson),
        case("raw-array", "JSON that is not an object", Body::Raw(b"[1, 2, 3]"), InvalidJson),
        case(
            "no-prompt",
            "a required field missing (`prompt`)",
            Body::Json(json!({"v": 1, "id": "no-prompt", "kind": "generate"})),
            InvalidJson,
        ),
        j("wrong-type", "a field of the wrong type (`steps: \"ten\"`)", json!({"steps": "ten"}), InvalidJson),
        j("negative-seed", "a number out of its type's range (`seed: -1`)", json!({"seed": -1}), InvalidJson),
        j("bad-kind", "an unknown `kind`", json!({"kind": "paint"}), InvalidJson),
        j("bad-format", "an unknown `output_format`", json!({"output_format": "gif"}), InvalidJson),
        e(
            "bad-ref",
            "an image reference that is neither `inline` nor `object`",
            json!({"image": {"url": "http://x"}}),
            InvalidJson,
        ),
        j("v2", "protocol version other than 1", json!({"v": 2}), UnsupportedVersion),
        j("bad-id", "`id` with characters outside `[A-Za-z0-9_-]`", json!({"id": "has space"}), InvalidId),
        j("long-id", "`id` over 128 characters", json!({"id": "x".repeat(129)}), InvalidId),
        j("empty-id", "empty `id`", json!({"id": ""}), InvalidId),
        // parameters
        j("model-path", "`model` that is a path (`../etc`)", json!({"model": "../etc"}), UnknownModel),
        j("model-unknown", "`model` this fleet does not serve", json!({"model": "nope"}), UnknownModel),
        j("long-prompt", "`prompt` over 2000 characters", json!({"prompt": "x".repeat(2001)}), InvalidPrompt),
        j(
            "long-negative",
            "`negative_prompt` over 2000 characters",
            json!({"negative_prompt": "x".repeat(2001)}),
            InvalidPrompt,
        ),
        j("width-only", "`width` without `height`", json!({"width": 64}), InvalidSize),
        j("odd-size", "a side not a multiple of 8", json!({"width": 60, "height": 64}), InvalidSize),
        j("zero-size", "a side of 0", json!({"width": 0, "height": 64}), InvalidSize),
        j("huge-size", "a side over 2048", json!({"width": 4096, "height": 64}), InvalidSize),
        j("zero-steps", "`steps` 0", json!({"steps": 0}), InvalidSteps),
        j("many-steps", "`steps` over 150", json!({"steps": 151}), InvalidSteps),
        j("zero-batch", "`batch` 0", json!({"batch": 0}), InvalidBatch),
        j("big-batch", "`batch` over 8", json!({"batch": 9}), InvalidBatch),
        j("neg-guidance", "`guidance` below 0", json!({"guidance": -1.0}), InvalidParameter),
        j("big-guidance", "`guidance` over 30", json!({"guidance": 31.0}), InvalidParameter),
        j("bad-scheduler", "an unknown `scheduler`", json!({"scheduler": "plms"}), UnknownScheduler),
        j("bad-reply", "`reply` that is not a plain subject (`a.*`)", json!({"reply": "a.*"}), InvalidParameter),
        j("empty-user", "empty `user`", json!({"user": ""}), InvalidParameter),
        j("gen-image", "a generate job with an `image`", json!({"image": inline(&png(8, 8))}), InvalidParameter),
        j("gen-strength", "a generate job with a `strength`", json!({"strength": 0.5}), InvalidParameter),
        j("late", "`deadline_ms` already past", json!({"deadline_ms": 1}), DeadlineExceeded),
        // edit parameters
        case(
            "no-image",
            "an edit without `image`",
            Body::Json(generate("no-image", json!({"kind": "edit"}))),
            ImageRequired,
        ),
        e("big-strength", "`strength` outside 0..=1", json!({"strength": 1.5}), InvalidParameter),
        e("big-blur", "`mask_blur` outside 0..=64", json!({"mask_blur": 65.0}), InvalidParameter),
        e("empty-key", "an empty object key", json!({"image": {"object": ""}}), InvalidParameter),
        // the image
        e(
            "not-base64",
            "inline image that is not base64",
            json!({"image": {"inline": "not base64!"}}),
            ImageUndecodable,
        ),
        e(
            "missing-object",
            "object-store image never uploaded (retried, then dead-lettered)",
            json!({"image": {"object": "inputs/none/image"}}),
            MaxDeliveriesExceeded,
        ),
        e("big-object", "object-store image over 20 MiB", json!({"image": object("big")}), ImageTooLarge),
        e("empty-image", "empty file", json!({"image": inline(b"")}), ImageUnsupportedFormat),
        e(
            "gif",
            "GIF (not PNG, JPEG or WebP)",
            json!({"image": inline(&hostile("not-an-image.gif"))}),
            ImageUnsupportedFormat,
        ),
        e("random-bytes", "random bytes", json!({"image": inline(&hostile("garbage.bin"))}), ImageUnsupportedFormat),
        e("trunc-png", "truncated PNG", json!({"image": inline(&hostile("truncated.png"))}), ImageUndecodable),
        e("trunc-jpeg", "truncated JPEG", json!({"image": inline(&hostile("truncated.jpg"))}), ImageUndecodable),
        e("bad-crc", "PNG with a bad checksum", json!({"image": inline(&hostile("bad-crc.png"))}), ImageUndecodable),
        e(
            "zero-width",
            "PNG declaring 0 width",
            json!({"image": inline(&hostile("zero-width.png"))}),
            ImageUndecodable,
        ),
        e(
            "huge-dims",
            "header declaring 10 gigapixels",
            json!({"image": inline(&hostile("huge-dimensions.png"))}),
            ImageTooLarge,
        ),
        e(
            "zip-bomb",
            "zip-bomb PNG (97 KB declaring 100 megapixels)",
            json!({"image": inline(&hostile("zip-bomb.png"))}),
            ImageTooLarge,
        ),
        e(
            "webp-frame",
            "WebP whose frame is larger than its canvas (found by fuzzing)",
            json!({"image": inline(&fuzz_finding("regression-webp-frame-larger-than-canvas.webp"))}),
            ImageTooLarge,
        ),
        // the mask
        e(
            "mask-gif",
            "mask that is a GIF",
            json!({"mask": inline(&hostile("not-an-image.gif"))}),
            ImageUnsupportedFormat,
        ),
        e("mask-trunc", "truncated PNG mask", json!({"mask": inline(&hostile("truncated.png"))}), ImageUndecodable),
        e("mask-bomb", "zip-bomb mask", json!({"mask": inline(&hostile("zip-bomb.png"))}), ImageTooLarge),
        e("mask-size", "mask of another size than the image", json!({"mask": inline(&png(64, 32))}), MaskSizeMismatch),
        e(
            "mask-missing",
            "object-store mask never uploaded (retried, then dead-lettered)",
            json!({"mask": {"object": "inputs/none/mask"}}),
            MaxDeliveriesExceeded,
        ),
        // private and sealed jobs
        j("private-no-reply", "`private: true`, unsealed, without `reply`", json!({"private": true}), InvalidParameter),
        j(
            "sealed-public",
            "`sealed` without `private: true`",
            tweaked(s("sealed-public", "x"), |j| j["private"] = json!(false)),
            InvalidParameter,
        ),
        j(
            "sealed-clear",
            "`sealed` with a clear `prompt` too",
            tweaked(s("sealed-clear", "x"), |j| j["prompt"] = json!("clear words")),
            InvalidParameter,
        ),
        j(
            "sealed-key-id",
            "`sealed.key_id` not 16 hex digits",
            tweaked(s("sealed-key-id", "x"), |j| j["sealed"]["key_id"] = json!("fleet-2024")),
            SealInvalid,
        ),
        j(
            "sealed-encap",
            "`sealed.encapsulated_key` not base64 of 32 bytes",
            tweaked(s("sealed-encap", "x"), |j| j["sealed"]["encapsulated_key"] = json!("AAAA")),
            SealInvalid,
        ),
        j(
            "sealed-reply-key",
            "`sealed.reply_key` not base64 of a 32-byte key",
            tweaked(s("sealed-reply-key", "x"), |j| j["sealed"]["reply_key"] = json!("not a key")),
            SealInvalid,
        ),
        j(
            "sealed-not-base64",
            "sealed ciphertext that is not base64",
            tweaked(s("sealed-not-base64", "x"), |j| j["sealed"]["ciphertext"] = json!({"inline": "not base64!"})),
            SealInvalid,
        ),
        j(
            "sealed-unknown-key",
            "sealed to a key the worker does not hold",
            sealed("sealed-unknown-key", JobKind::Generate, SecretKey::generate().public_key(), "x", None),
            SealUnknownKey,
        ),
        j(
            "sealed-tampered",
            "sealed ciphertext with a byte changed",
            tweaked(s("sealed-tampered", "x"), |j| {
                let b64 = j["sealed"]["ciphertext"]["inline"].as_str().unwrap().to_string();
                let mut bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
                bytes[0] ^= 1;
                j["sealed"]["ciphertext"]["inline"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            }),
            SealInvalid,
        ),
        j("sealed-replayed", "sealed content replayed under another job id", s("sealed-original-id", "x"), SealInvalid),
        j(
            "sealed-no-image",
            "a sealed edit whose content holds no image",
            sealed("sealed-no-image", JobKind::Edit, fleet_key, "x", None),
            ImageRequired,
        ),
        j(
            "sealed-gen-image",
            "a sealed generate job whose content holds an image",
            sealed("sealed-gen-image", JobKind::Generate, fleet_key, "x", Some(&png(8, 8))),
            InvalidParameter,
        ),
        j(
            "sealed-long-prompt",
            "a sealed `prompt` over 2000 characters",
            s("sealed-long-prompt", &"x".repeat(2001)),
            InvalidPrompt,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_bad_input_gets_its_error_code_and_is_not_retried() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let keys = tempfile::tempdir().unwrap();
    let fleet = generate_key_files(keys.path()).unwrap();
    let fleet_key = PublicKey::read_file(&fleet.public).unwrap();
    let _worker = WorkerProcess::start(&server, "w", &["--fleet-key", fleet.secret.to_str().unwrap()]);
    let big = vec![0u8; 20 * 1024 * 1024 + 1];
    let big_key = match queue.upload_input("big-object", "image", &big, None).await.unwrap() {
        imago::job::ImageRef::Object(key) => key,
        other => panic!("{other:?}"),
    };
    let cases = cases(&HashMap::from([("big", big_key)]), &fleet_key);
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    for case in &cases {
        let payload = match &case.body {
            Body::Raw(bytes) => bytes.to_vec(),
            Body::Json(value) => value.to_string().into_bytes(),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", case.id);
        let subject = queue.config.names.jobs("generate");
        queue.js.publish_with_headers(subject, headers, payload.into()).await.unwrap().await.unwrap();
    }
    let mut codes: HashMap<String, (JobStatus, Option<ErrorCode>)> = HashMap::new();
    // Ids that are themselves invalid come back under the Nats-Msg-Id they were published with.
    while codes.len() < cases.len() {
        let message = tokio::time::timeout(WAIT, results.next()).await.expect("every case answered").unwrap();
        let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
        codes.insert(result.id.clone(), (result.status, result.error.map(|e| e.code)));
    }
    println!("| bad input | error code |\n|---|---|");
    for case in &cases {
        println!("| {} | `{}` |", case.class, case.code.as_str());
    }
    for case in &cases {
        let got = codes.get(case.id).unwrap_or_else(|| panic!("{}: no result among {:?}", case.id, codes.keys()));
        assert_eq!(*got, (JobStatus::Error, Some(case.code)), "{} ({})", case.id, case.class);
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than ack_wait: a retried job would come back
    let info = queue.jobs.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 0, "refused jobs are terminated, not left for redelivery");
}
