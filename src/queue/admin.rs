//! The privacy duties a worker fleet answers over NATS: delete or export everything stored for a pseudonymous
//! user (`<prefix>.admin.delete_user`, `<prefix>.admin.export_user`, request/reply with `{"user": "…"}`), through the
//! NATS service API — which also makes every worker answer `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`.

use std::sync::Arc;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::service::ServiceExt;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::setup::Queue;
use super::transport::{JOB_ID_HEADER, USER_HEADER};
use super::QueueError;

#[derive(Debug, Deserialize)]
struct UserRequest {
    user: String,
}

/// One stored object of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Key in the images bucket (fetch it with any object-store client).
    pub key: String,
    pub size: usize,
    pub job: Option<String>,
}

/// Answer to `export_user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserExport {
    pub user: String,
    pub objects: Vec<StoredObject>,
    /// Ids of the user's jobs whose results are stored (`<prefix>.results.<id>`).
    pub results: Vec<String>,
}

/// Answer to `delete_user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDeletion {
    pub user: String,
    pub deleted_objects: usize,
    pub deleted_results: usize,
}

fn admin_error(e: impl std::fmt::Display) -> QueueError {
    QueueError::Protocol(e.to_string())
}

impl Queue {
    /// Objects in the bucket tagged with `user` (outputs and uploaded inputs).
    pub async fn user_objects(&self, user: &str) -> Result<Vec<StoredObject>, QueueError> {
        let mut list = self.images.list().await.map_err(admin_error)?;
        let mut objects = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(admin_error)?;
            if !info.deleted && info.metadata.get("user").map(String::as_str) == Some(user) {
                objects.push(StoredObject {
                    key: info.name.clone(),
                    size: info.size,
                    job: info.metadata.get("job").cloned(),
                });
            }
        }
        Ok(objects)
    }

    /// (stream sequence, job id) of every stored result of `user`: a scan of the results stream's headers.
    async fn user_results(&self, user: &str) -> Result<Vec<(u64, String)>, QueueError> {
        let mut stream = self.results.clone();
        let last = stream.info().await.map_err(admin_error)?.state.last_sequence;
        if stream.cached_info().state.messages == 0 {
            return Ok(Vec::new());
        }
        let scanner = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(admin_error)?;
        let mut messages = scanner.messages().await.map_err(admin_error)?;
        let mut found = Vec::new();
        while let Some(message) = messages.next().await {
            let message = message.map_err(admin_error)?;
            let seq = message.info().map_err(admin_error)?.stream_sequence;
            if let Some(headers) = &message.headers {
                if headers.get(USER_HEADER).map(|v| v.as_str()) == Some(user) {
                    let id = headers.get(JOB_ID_HEADER).map(|v| v.to_string()).unwrap_or_default();
                    found.push((seq, id));
                }
            }
            if seq >= last {
                break;
            }
        }
        Ok(found)
    }

    /// Everything stored for `user`, with keys to fetch it.
    pub async fn export_user(&self, user: &str) -> Result<UserExport, QueueError> {
        let objects = self.user_objects(user).await?;
        let results = self.user_results(user).await?.into_iter().map(|(_, id)| id).collect();
        Ok(UserExport { user: user.to_string(), objects, results })
    }

    /// Removes every stored object and result of `user`.
    pub async fn delete_user(&self, user: &str) -> Result<UserDeletion, QueueError> {
        let objects = self.user_objects(user).await?;
        for object in &objects {
            self.images.delete(&object.key).await.map_err(admin_error)?;
        }
        let results = self.user_results(user).await?;
        for (seq, _) in &results {
            self.results.delete_message(*seq).await.map_err(admin_error)?;
        }
        tracing::info!(objects = objects.len(), results = results.len(), "user data deleted");
        Ok(UserDeletion { user: user.to_string(), deleted_objects: objects.len(), deleted_results: results.len() })
    }
}

/// Starts the admin service; it runs until the returned task is aborted.
pub async fn serve_admin(queue: Arc<Queue>) -> Result<tokio::task::JoinHandle<()>, QueueError> {
    let service = queue
        .client
        .service_builder()
        .description("imago image-generation workers")
        .start("imago", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| QueueError::Setup(format!("service API: {e}")))?;
    let group = service.group(queue.config.names.admin());
    let mut delete = group.endpoint("delete_user").await.map_err(|e| QueueError::Setup(e.to_string()))?;
    let mut export = group.endpoint("export_user").await.map_err(|e| QueueError::Setup(e.to_string()))?;
    Ok(tokio::spawn(async move {
        let _service = service; // keeps $SRV.PING/INFO/STATS answered
        loop {
            let (request, deleting) = tokio::select! {
                Some(r) = delete.next() => (r, true),
                Some(r) = export.next() => (r, false),
                else => break,
            };
            let user = match serde_json::from_slice::<UserRequest>(&request.message.payload) {
                Ok(r) if (1..=128).contains(&r.user.len()) => r.user,
                _ => {
                    let error = async_nats::service::error::Error {
                        status: "expected {\"user\": \"<1-128 bytes>\"}".into(),
                        code: 400,
                    };
                    let _ = request.respond(Err(error)).await;
                    continue;
                }
            };
            let answer = if deleting {
                queue.delete_user(&user).await.and_then(|r| serde_json::to_vec(&r).map_err(admin_error))
            } else {
                queue.export_user(&user).await.and_then(|r| serde_json::to_vec(&r).map_err(admin_error))
            };
            let response = answer
                .map(Into::into)
                .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
            let _ = request.respond(response).await;
        }
    }))
}
