//! Prompts, user ids and image bytes never reach a log line, at any level: a worker at `RUST_LOG=trace` serves a
//! generate and an edit job carrying canaries, and its whole log is searched for them.

mod common;

use base64::Engine as _;
use common::nats::NatsServer;
use common::workers::{client, job, WorkerProcess, WAIT};
use imago::job::{ImageRef, JobKind, JobStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_level_logs_contain_no_user_content() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let worker = WorkerProcess::start_with_env(&server, "traced", &[], &[("RUST_LOG", "trace")]);
    let photo =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos/coffee.jpg")).unwrap();
    let image_b64 = base64::engine::general_purpose::STANDARD.encode(&photo);

    let mut generate = job("log-1", "sd-turbo", 1);
    generate.prompt = "prompt-canary-3b9f riding a horse".into();
    generate.negative_prompt = "negative-canary-c41d".into();
    generate.user = Some("user-canary-77e2".into());
    let mut edit = job("log-2", "sd-turbo", 1);
    edit.kind = JobKind::Edit;
    edit.prompt = "edit-canary-19aa".into();
    edit.image = Some(ImageRef::Inline(image_b64.clone()));
    for j in [&generate, &edit] {
        assert_eq!(queue.submit(j, WAIT, |_| {}).await.unwrap().status, JobStatus::Ok);
    }
    let log = worker.log();
    assert!(log.lines().count() > 10 && log.contains("TRACE"), "the worker should log at trace level:\n{log}");
    assert!(log.contains("log-1"), "job ids are logged (they identify no one)");
    let image_fragment = &image_b64[image_b64.len() / 2..image_b64.len() / 2 + 24];
    for canary in ["prompt-canary-3b9f", "negative-canary-c41d", "user-canary-77e2", "edit-canary-19aa", image_fragment]
    {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(canary)).collect();
        assert!(hits.is_empty(), "{canary} appears in the log:\n{}", hits.join("\n"));
    }
}
