//! NATS connection flags shared by `worker`, `submit` and `cancel`.

use std::path::PathBuf;

use clap::Args;
use imago::queue::{ConnectConfig, Names, Queue, QueueConfig};

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_PREFIX: &str = "imago";

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated.
    /// [default: nats://127.0.0.1:4222]
    #[arg(long, env = "IMAGO_NATS")]
    pub nats: Option<String>,
    /// Credentials file (JWT + NKey seed).
    #[arg(long, env = "IMAGO_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// NKey seed.
    #[arg(long, env = "IMAGO_NATS_NKEY", hide_env_values = true)]
    pub nkey: Option<String>,
    /// User for user/password authentication.
    #[arg(long, env = "IMAGO_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "IMAGO_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Require TLS.
    #[arg(long)]
    pub tls: bool,
    /// CA certificate(s) to trust (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM), with --tls-key.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Subject/stream prefix, so deployments can share a server.
    /// [default: imago]
    #[arg(long, env = "IMAGO_PREFIX")]
    pub prefix: Option<String>,
}

impl ConnectArgs {
    pub fn connect_config(&self, name: &str) -> ConnectConfig {
        ConnectConfig {
            url: self.nats.clone().unwrap_or_else(|| DEFAULT_NATS_URL.to_string()),
            credentials_file: self.creds.clone(),
            nkey_seed: self.nkey.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            require_tls: self.tls,
            root_certificates: self.tls_ca.clone(),
            client_certificate: self.tls_cert.clone(),
            client_key: self.tls_key.clone(),
            name: Some(name.to_string()),
        }
    }

    /// Connects and makes sure the streams, consumer and bucket exist.
    pub async fn queue(&self, name: &str, config: QueueConfig) -> anyhow::Result<Queue> {
        let client = imago::queue::connect(&self.connect_config(name)).await?;
        let prefix = self.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        Ok(Queue::setup(client, QueueConfig { names: Names::new(prefix), ..config }).await?)
    }
}
