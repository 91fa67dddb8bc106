//! The worker against a real nats-server (started by the test): many jobs through several worker processes, a
//! worker killed mid-job, poison jobs, cancellation, drain, large results, duplicates, invalid jobs.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::nats::NatsServer;
use common::workers::{client, job, publish, WorkerProcess, WAIT};
use futures::StreamExt;
use imago::job::{ErrorCode, ImageRef, JobKind, JobResult, JobStatus};
use imago::queue::Queue;

async fn decode_images(queue: &Queue, result: &JobResult) -> Vec<image::DynamicImage> {
    let mut images = Vec::new();
    for r in &result.images {
        let bytes = queue.image_bytes(r).await.unwrap();
        images.push(image::load_from_memory(&bytes).expect("result image decodes"));
    }
    images
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_through_three_workers_are_each_answered_exactly_once() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _workers: Vec<WorkerProcess> = (0..3).map(|i| WorkerProcess::start(&server, &format!("w{i}"), &[])).collect();
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("bulk-{i}")).collect();
    for id in &ids {
        publish(&queue, &job(id, "sd-turbo", 1)).await;
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    let collect = async {
        while seen.len() < ids.len() {
            let message = results.next().await.unwrap();
            let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
            assert_eq!(result.status, JobStatus::Ok, "{result:?}");
            *seen.entry(result.id.clone()).or_default() += 1;
            *by_worker.entry(result.worker.clone().unwrap()).or_default() += 1;
            let images = decode_images(&queue, &result).await;
            assert_eq!((images[0].width(), images[0].height()), (64, 64));
        }
    };
    tokio::time::timeout(WAIT, collect).await.expect("all results in time");
    // Nothing arrives twice, even after the stragglers had time to appear.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(10), results.next()).await {
        let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
        *seen.entry(result.id).or_default() += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "duplicated results: {:?}",
        seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(seen.len(), 200);
    assert_eq!(by_worker.len(), 3, "every worker should take part: {by_worker:?}");
    let info = queue.jobs.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 0, "acked jobs leave the work queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_killed_is_finished_by_another() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let mut first = WorkerProcess::start(&server, "doomed", &[]);
    let mut progress = queue.client.subscribe(queue.config.names.progress("slow-1")).await.unwrap();
    let mut results = queue.client.subscribe(queue.config.names.results("slow-1")).await.unwrap();
    publish(&queue, &job("slow-1", "sd15", 150)).await;
    // Kill the worker once it is demonstrably in the middle of the job.
    loop {
        let event = tokio::time::timeout(WAIT, progress.next()).await.unwrap().unwrap();
        let event: imago::job::ProgressEvent = serde_json::from_slice(&event.payload).unwrap();
        if event.step.is_some_and(|s| s >= 2) {
            break;
        }
    }
    first.signal("-KILL");
    first.wait(Duration::from_secs(10));
    let _second = WorkerProcess::start(&server, "rescuer", &[]);
    let message = tokio::time::timeout(WAIT, results.next()).await.expect("result after redelivery").unwrap();
    let result: JobResult = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(result.status, JobStatus::Ok, "{result:?}");
    assert_eq!(result.worker.as_deref(), Some("rescuer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_lettered_and_its_requester_told() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let mut dead = queue.client.subscribe(queue.config.names.dead("*")).await.unwrap();
    let mut poison = job("poison-1", "sd-turbo", 1);
    poison.kind = JobKind::Edit;
    poison.image = Some(ImageRef::Object("inputs/never-uploaded/image".into()));
    let result = queue.submit(&poison, WAIT, |_| {}).await.unwrap();
    assert_eq!(result.status, JobStatus::Error);
    let error = result.error.unwrap();
    assert_eq!(error.code, ErrorCode::MaxDeliveriesExceeded, "{}", error.message);
    assert!(
        error.message.contains("3 deliveries") && error.message.contains("inputs/never-uploaded/image"),
        "{}",
        error.message
    );
    let letter = tokio::time::timeout(Duration::from_secs(5), dead.next()).await.unwrap().unwrap();
    let headers = letter.headers.unwrap();
    assert_eq!(headers.get("Imago-Job-Id").unwrap().as_str(), "poison-1");
    assert_eq!(headers.get("Imago-Error-Code").unwrap().as_str(), "object_not_found");
    assert_eq!(letter.subject.as_str(), "imago.dead.edit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_jobs_can_be_cancelled() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    // Queued: cancelled before any worker exists.
    queue.cancel("early").await.unwrap();
    let mut early_results = queue.client.subscribe(queue.config.names.results("early")).await.unwrap();
    publish(&queue, &job("early", "sd-turbo", 1)).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let message = tokio::time::timeout(WAIT, early_results.next()).await.unwrap().unwrap();
    let early: JobResult = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(early.status, JobStatus::Cancelled);
    assert!(early.error.unwrap().message.contains("before it started"));
    // Running: cancelled after its second step.
    let mut cancelled_once = false;
    let running = queue
        .submit(&job("running", "sd15", 150), WAIT, |event| {
            if event.step.is_some_and(|s| s >= 2) && !cancelled_once {
                cancelled_once = true;
                let queue_client = queue.client.clone();
                let subject = queue.config.names.cancel("running");
                tokio::spawn(async move { queue_client.publish(subject, "cancel".into()).await.unwrap() });
            }
        })
        .await
        .unwrap();
    assert_eq!(running.status, JobStatus::Cancelled, "{running:?}");
    assert!(running.error.unwrap().message.contains("while running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_losing_jobs() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    let mut progress = queue.client.subscribe(queue.config.names.progress("drain-0")).await.unwrap();
    let mut worker = WorkerProcess::start(&server, "draining", &["--drain-timeout", "60"]);
    publish(&queue, &job("drain-0", "sd15", 40)).await;
    tokio::time::timeout(WAIT, progress.next()).await.unwrap().unwrap();
    for i in 1..4 {
        publish(&queue, &job(&format!("drain-{i}"), "sd-turbo", 1)).await;
    }
    worker.signal("-TERM");
    assert_eq!(worker.wait(WAIT), 0, "drain must exit 0; log:\n{}", worker.log());
    // The running job finished before exit; the queued ones wait for the next worker.
    let first: JobResult = serde_json::from_slice(&results.next().await.unwrap().payload).unwrap();
    assert_eq!((first.id.as_str(), first.status), ("drain-0", JobStatus::Ok));
    let _next = WorkerProcess::start(&server, "next", &[]);
    let mut ids = Vec::new();
    for _ in 1..4 {
        let r: JobResult =
            serde_json::from_slice(&tokio::time::timeout(WAIT, results.next()).await.unwrap().unwrap().payload)
                .unwrap();
        assert_eq!(r.worker.as_deref(), Some("next"));
        ids.push(r.id);
    }
    ids.sort();
    assert_eq!(ids, ["drain-1", "drain-2", "drain-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_hands_the_running_job_back() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let mut progress = queue.client.subscribe(queue.config.names.progress("handback")).await.unwrap();
    let mut results = queue.client.subscribe(queue.config.names.results("handback")).await.unwrap();
    let mut worker = WorkerProcess::start(&server, "impatient", &["--drain-timeout", "0"]);
    publish(&queue, &job("handback", "sd15", 150)).await;
    tokio::time::timeout(WAIT, progress.next()).await.unwrap().unwrap();
    worker.signal("-TERM");
    assert_eq!(worker.wait(WAIT), 0, "{}", worker.log());
    assert!(worker.log().contains("handing back"), "{}", worker.log());
    let _next = WorkerProcess::start(&server, "patient", &[]);
    let r: JobResult =
        serde_json::from_slice(&tokio::time::timeout(WAIT, results.next()).await.unwrap().unwrap().payload).unwrap();
    assert_eq!((r.status, r.worker.as_deref()), (JobStatus::Ok, Some("patient")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_go_through_the_object_store() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &["--inline-limit", "100"]);
    let mut big = job("big", "sd-turbo", 1);
    big.batch = 2;
    let result = queue.submit(&big, WAIT, |_| {}).await.unwrap();
    assert_eq!(result.status, JobStatus::Ok);
    assert!(
        matches!(&result.images[..], [ImageRef::Object(a), ImageRef::Object(b)] if a == "results/big/0.png" && b == "results/big/1.png")
    );
    assert_eq!(decode_images(&queue, &result).await.len(), 2);
    let info = queue.images.info("results/big/0.png").await.unwrap();
    assert_eq!(info.metadata.get("user").map(String::as_str), Some("user-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_submit_is_computed_once() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let mut started = queue.client.subscribe(queue.config.names.progress("twice")).await.unwrap();
    let first = queue.submit(&job("twice", "sd-turbo", 1), WAIT, |_| {}).await.unwrap();
    let second = queue.submit(&job("twice", "sd-turbo", 1), WAIT, |_| {}).await.unwrap();
    assert_eq!(first.status, JobStatus::Ok);
    assert_eq!(serde_json::to_value(&first).unwrap(), serde_json::to_value(&second).unwrap());
    let mut starts = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), started.next()).await {
        starts +=
            (serde_json::from_slice::<imago::job::ProgressEvent>(&m.payload).unwrap().state == "started") as usize;
    }
    assert_eq!(starts, 1, "the job ran more than once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_get_an_error_result_and_are_not_retried() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let mut results = queue.client.subscribe(queue.config.names.results("*")).await.unwrap();
    let bad: &[(&str, serde_json::Value, ErrorCode)] = &[
        (
            "bad-size",
            serde_json::json!({"v": 1, "id": "bad-size", "kind": "generate", "prompt": "x", "width": 60, "height": 64}),
            ErrorCode::InvalidSize,
        ),
        (
            "bad-model",
            serde_json::json!({"v": 1, "id": "bad-model", "kind": "generate", "prompt": "x", "model": "nope"}),
            ErrorCode::UnknownModel,
        ),
        (
            "bad-version",
            serde_json::json!({"v": 9, "id": "bad-version", "kind": "generate", "prompt": "x"}),
            ErrorCode::UnsupportedVersion,
        ),
        ("bad-json", serde_json::json!({"v": 1, "id": "bad-json", "kind": "paint"}), ErrorCode::InvalidJson),
        (
            "late",
            serde_json::json!({"v": 1, "id": "late", "kind": "generate", "prompt": "x", "model": "sd-turbo", "deadline_ms": 1}),
            ErrorCode::DeadlineExceeded,
        ),
        (
            "bad-image",
            serde_json::json!({"v": 1, "id": "bad-image", "kind": "edit", "prompt": "x", "model": "sd-turbo",
            "image": {"inline": base64::engine::general_purpose::STANDARD.encode(b"GIF89a")}}),
            ErrorCode::ImageUnsupportedFormat,
        ),
    ];
    for (id, body, _) in bad {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", *id);
        queue
            .js
            .publish_with_headers(queue.config.names.jobs("generate"), headers, body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut codes = HashMap::new();
    while codes.len() < bad.len() {
        let r: JobResult =
            serde_json::from_slice(&tokio::time::timeout(WAIT, results.next()).await.unwrap().unwrap().payload)
                .unwrap();
        codes.insert(r.id.clone(), r.error.unwrap().code);
    }
    for (id, _, code) in bad {
        assert_eq!(codes[*id], *code, "{id}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than ack_wait: a retried job would come back
    let info = queue.jobs.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 0, "refused jobs must be terminated, not left for redelivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_jobs_take_their_inputs_inline_or_from_the_object_store() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let photo =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos/astronaut.png")).unwrap();
    let mut mask = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(128, 128, |x, _| {
        image::Luma([if x >= 64 { 255 } else { 0 }])
    }))
    .write_to(&mut std::io::Cursor::new(&mut mask), image::ImageFormat::Png)
    .unwrap();
    let mut edit = job("edit-1", "sd15", 2);
    edit.kind = JobKind::Edit;
    edit.image = Some(queue.upload_input("edit-1", "image", &photo, Some("user-1")).await.unwrap());
    edit.mask = Some(ImageRef::Inline(base64::engine::general_purpose::STANDARD.encode(&mask)));
    edit.width = Some(64);
    edit.height = Some(64);
    let result = queue.submit(&edit, WAIT, |_| {}).await.unwrap();
    assert_eq!(result.status, JobStatus::Ok, "{result:?}");
    let out = decode_images(&queue, &result).await.remove(0).to_rgb8();
    // Unmasked (left) half: the photo, fitted to 64×64, exactly.
    let original = imago::diffusion::input::fit_image(&image::load_from_memory(&photo).unwrap().to_rgb8(), 64, 64);
    assert!((0..64).all(|y| (0..32).all(|x| out.get_pixel(x, y) == original.get_pixel(x, y))));
}
