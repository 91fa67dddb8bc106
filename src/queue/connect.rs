//! Connecting to NATS with the configured authentication and TLS.

use async_nats::ConnectOptions;

use super::config::ConnectConfig;
use super::QueueError;

/// Opens a connection; errors say which setting failed.
pub async fn connect(config: &ConnectConfig) -> Result<async_nats::Client, QueueError> {
    let mut options = ConnectOptions::new();
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| QueueError::Connect(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => options = options.user_and_password(user.clone(), password.clone()),
        (None, None) => {}
        _ => return Err(QueueError::Connect("give both a user and a password, or neither".into())),
    }
    if config.require_tls {
        options = options.require_tls(true);
    }
    if let Some(roots) = &config.root_certificates {
        options = options.add_root_certificates(roots.clone());
    }
    match (&config.client_certificate, &config.client_key) {
        (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => return Err(QueueError::Connect("a client certificate needs its key, and the key its certificate".into())),
    }
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    options.connect(config.url.as_str()).await.map_err(|e| QueueError::Connect(format!("{}: {e}", config.url)))
}
