//! The privacy policy's duties, against a real nats-server and worker processes: training samples only from
//! opted-in non-private jobs and without identifying fields; deletion and export of a user's stored data; aggregate
//! metrics scraped over HTTP; workers visible to the NATS service API; TLS and mutual TLS.

mod common;

use std::time::Duration;

use common::nats::NatsServer;
use common::workers::{client, job, WorkerProcess, WAIT};
use futures::StreamExt;
use imago::job::{JobStatus, OutputFormat};
use imago::queue::{connect, ConnectConfig, Queue, QueueConfig, TrainingSample, UserDeletion, UserExport};

async fn request<T: serde::de::DeserializeOwned>(queue: &Queue, op: &str, user: &str) -> T {
    let subject = format!("{}.{op}", queue.config.names.admin());
    let body = serde_json::json!({ "user": user }).to_string();
    let reply = tokio::time::timeout(WAIT, queue.client.request(subject, body.into())).await.unwrap().unwrap();
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{op}: {e}: {}", String::from_utf8_lossy(&reply.payload)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_opted_in_non_private_jobs_become_anonymous_training_samples() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &[]);
    let mut opted = job("opted-in", "sd-turbo", 1);
    opted.training_opt_in = true;
    opted.prompt = "a green star canary-7f3".into();
    let plain = job("not-opted", "sd-turbo", 1);
    let mut private = job("private", "sd-turbo", 1);
    private.training_opt_in = true;
    private.private = true;
    private.reply = Some(queue.client.new_inbox()); // an unsealed private job's images go only there
    for j in [&opted, &plain, &private] {
        queue.submit(j, WAIT, |_| {}).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = queue.training.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "exactly one sample");
    let raw = queue.training.get_raw_message(info.state.first_sequence).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(&raw.payload).unwrap();
    let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
    for forbidden in ["id", "user", "reply", "worker", "timings", "deadline_ms"] {
        assert!(!keys.contains(&forbidden), "sample carries {forbidden}: {keys:?}");
    }
    let sample: TrainingSample = serde_json::from_value(value).unwrap();
    assert_eq!(sample.prompt, "a green star canary-7f3");
    assert_eq!((sample.model.as_str(), sample.steps, sample.format), ("sd-turbo", 1, OutputFormat::Png));
    let png = queue.image_bytes(&sample.image).await.unwrap();
    assert!(image::load_from_memory(&png).is_ok());
    assert!(raw.headers.is_empty(), "no headers (no job id, no user) on samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_data_is_exported_and_deleted_and_nobody_elses() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _worker = WorkerProcess::start(&server, "w", &["--inline-limit", "100"]);
    let photo = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/photos/astronaut.png"))
        .unwrap();
    let mut jobs = Vec::new();
    for (id, user) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")] {
        let mut j = job(id, "sd-turbo", 1);
        j.user = Some(user.into());
        jobs.push(j);
    }
    // Alice's second job is an edit with an uploaded input: inputs count as her data too.
    jobs[1].kind = imago::job::JobKind::Edit;
    jobs[1].image = Some(queue.upload_input("a2", "image", &photo, Some("alice")).await.unwrap());
    for j in &jobs {
        assert_eq!(queue.submit(j, WAIT, |_| {}).await.unwrap().status, JobStatus::Ok);
    }
    let export: UserExport = request(&queue, "export_user", "alice").await;
    let mut keys: Vec<&str> = export.objects.iter().map(|o| o.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["inputs/a2/image", "results/a1/0.png", "results/a2/0.png"]);
    let mut results = export.results.clone();
    results.sort();
    assert_eq!(results, ["a1", "a2"]);

    let deleted: UserDeletion = request(&queue, "delete_user", "alice").await;
    assert_eq!((deleted.deleted_objects, deleted.deleted_results), (3, 2));
    let after: UserExport = request(&queue, "export_user", "alice").await;
    assert!(after.objects.is_empty() && after.results.is_empty(), "{after:?}");
    assert!(queue.existing_result("a1").await.is_none() && queue.images.get("results/a1/0.png").await.is_err());
    let bob: UserExport = request(&queue, "export_user", "bob").await;
    assert_eq!(bob.objects.len(), 1);
    assert_eq!(bob.results, ["b1"]);
    assert!(queue.existing_result("b1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_over_http_and_never_carry_prompts() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let worker = WorkerProcess::start(&server, "w", &["--metrics-addr", "127.0.0.1:0"]);
    let address = {
        let started = std::time::Instant::now();
        loop {
            let log = worker.log();
            if let Some(addr) =
                log.lines().find_map(|l| l.split("metrics on http://").nth(1)).and_then(|r| r.split('/').next())
            {
                break addr.to_string();
            }
            assert!(started.elapsed() < WAIT, "no metrics address in log:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let get = |path: &str| {
        let url = format!("http://{address}{path}");
        tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{url}: {e}"),
        })
    };
    assert_eq!(get("/healthz").await.unwrap().0, 200);
    let ok_line = "imago_jobs_total{kind=\"generate\",model=\"sd-turbo\",status=\"ok\",private=\"false\"}";
    let before = get("/metrics").await.unwrap().1;
    assert!(!before.contains(ok_line));
    let mut j = job("m1", "sd-turbo", 1);
    j.prompt = "a purple triangle canary-91c".into();
    queue.submit(&j, WAIT, |_| {}).await.unwrap();
    let mut bad = job("m2", "canary-model-55", 1);
    bad.user = Some("canary-user-8d2".into());
    queue.submit(&bad, WAIT, |_| {}).await.unwrap();
    // Counters move when a job is acknowledged, just after its result is out: scrape until they show it.
    let started = std::time::Instant::now();
    let after = loop {
        let (status, body) = get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        if body.contains("imago_job_errors_total{code=\"unknown_model\"} 1") || started.elapsed() > WAIT {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after.contains(&format!("{ok_line} 1")), "{after}");
    assert!(after.contains("imago_job_errors_total{code=\"unknown_model\"} 1"), "{after}");
    assert!(after.contains("imago_images_total 1"));
    assert!(after.contains("imago_host_memory_bytes"));
    for canary in ["canary-91c", "canary-model-55", "canary-user-8d2", "m1", "m2"] {
        assert!(!after.contains(canary), "{canary} leaked into metrics");
    }
    assert_eq!(get("/readyz").await.unwrap().0, 200);
    assert_eq!(get("/nope").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_answer_the_nats_service_api() {
    let server = NatsServer::start();
    let queue = client(&server).await;
    let _workers = [WorkerProcess::start(&server, "w1", &[]), WorkerProcess::start(&server, "w2", &[])];
    let inbox = queue.client.new_inbox();
    let mut replies = queue.client.subscribe(inbox.clone()).await.unwrap();
    let mut ids = std::collections::HashSet::new();
    let started = std::time::Instant::now();
    // Workers register the service right after start; ask until both have answered.
    while ids.len() < 2 {
        assert!(started.elapsed() < WAIT, "only {} workers answered $SRV.PING", ids.len());
        queue.client.publish_with_reply("$SRV.PING.imago", inbox.clone(), "".into()).await.unwrap();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await {
            if m.payload.is_empty() {
                continue; // "no responders" status while the workers are still starting
            }
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["name"], "imago");
            ids.insert(v["id"].as_str().unwrap().to_string());
        }
    }
    let stats = queue.client.request("$SRV.STATS.imago", "".into()).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let subjects: Vec<&str> =
        v["endpoints"].as_array().unwrap().iter().map(|e| e["subject"].as_str().unwrap()).collect();
    assert!(subjects.contains(&"imago.admin.delete_user") && subjects.contains(&"imago.admin.export_user"), "{v}");
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, file: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
        };
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
        leaf(vec!["imago-worker".into()], "client");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn server_config(&self, verify_clients: bool) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify_clients}\n}}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem")
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_work_and_plaintext_to_a_tls_only_server_fails_clearly() {
    let pki = Pki::new();
    let server = NatsServer::start_with_config(&pki.server_config(false));
    let secure = ConnectConfig {
        url: server.tls_url(),
        require_tls: true,
        root_certificates: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let client = connect(&secure).await.expect("TLS connection with our CA");
    let queue = Queue::setup(client, QueueConfig::default()).await.unwrap();
    queue.client.publish("t", "x".into()).await.unwrap();

    let plaintext = ConnectConfig { url: server.url(), ..Default::default() };
    let err = tokio::time::timeout(Duration::from_secs(20), connect(&plaintext))
        .await
        .expect("fails, not hangs")
        .unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("connecting to NATS") && message.contains(&server.url()), "{message}");
    assert!(message.to_lowercase().contains("tls") || message.to_lowercase().contains("certificate"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_the_client_certificate() {
    let pki = Pki::new();
    let server = NatsServer::start_with_config(&pki.server_config(true));
    let base = ConnectConfig {
        url: server.tls_url(),
        require_tls: true,
        root_certificates: Some(pki.path("ca.pem")),
        ..Default::default()
    };
    let anonymous = tokio::time::timeout(Duration::from_secs(20), connect(&base)).await.expect("fails, not hangs");
    assert!(anonymous.is_err(), "a client without certificate must be refused");
    let with_cert = ConnectConfig {
        client_certificate: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client-key.pem")),
        ..base
    };
    let client = connect(&with_cert).await.expect("mutual TLS");
    client.flush().await.unwrap();
}
