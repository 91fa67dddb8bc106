//! Worker processes and queue clients for the tests that run the real worker against a real nats-server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imago::diffusion::tiny::TinyFamily;
use imago::job::JobMessage;
use imago::queue::{Queue, QueueConfig};

use super::nats::NatsServer;
use super::tiny_model_dir;

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(120);

/// A worker process; SIGKILLed on drop unless it already exited.
pub struct WorkerProcess {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn start(server: &NatsServer, name: &str, extra: &[&str]) -> Self {
        Self::start_with_env(server, name, extra, &[("RUST_LOG", "imago=debug")])
    }

    pub fn start_with_env(server: &NatsServer, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let models = tiny_model_dir(TinyFamily::SdTurbo).parent().unwrap().to_path_buf();
        tiny_model_dir(TinyFamily::Sd15);
        let log = server.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_imago"))
            .args(["worker", "--nats", &server.url(), "--models"])
            .arg(&models)
            .args(["--name", name, "--ack-wait", "2", "--max-deliver", "3", "--retry-backoff-ms", "100"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start worker");
        Self { child, name: name.to_string(), log }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for exit and returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(started.elapsed() < timeout, "worker {} did not exit; log:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn client(server: &NatsServer) -> Queue {
    let client = async_nats::connect(server.url()).await.unwrap();
    Queue::setup(client, QueueConfig { ack_wait: Duration::from_secs(2), max_deliver: 3, ..QueueConfig::default() })
        .await
        .unwrap()
}

pub fn job(id: &str, model: &str, steps: u32) -> JobMessage {
    JobMessage {
        model: model.into(),
        steps: Some(steps),
        seed: Some(1),
        user: Some("user-1".into()),
        ..JobMessage::generate(id, format!("a red circle {id}"))
    }
}

/// Publishes without waiting (the test collects results itself).
pub async fn publish(queue: &Queue, job: &JobMessage) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", job.id.as_str());
    let subject = queue.config.names.jobs(job.kind.as_str());
    queue
        .js
        .publish_with_headers(subject, headers, serde_json::to_vec(job).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
}
