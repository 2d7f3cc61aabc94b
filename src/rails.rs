//! HTTP client to the Rails API: the active in-house queues (for the reconciler) and Rails'
//! own `/health` (for readiness). Each call is bounded by a timeout.

use std::time::Duration;

use serde_json::Value;

use crate::auth;
use crate::inhouse::{entries_field, id_field, parse_deadline, QueueSpec, QueueStatus};

pub const ACTIVE_QUEUES_PATH: &str = "/internal/api/inhouse_queues/active";
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to Rails failed; `Display` is what readiness reports (never a URL).
#[derive(Debug, thiserror::Error)]
pub enum RailsError {
    #[error("timeout")]
    Timeout,
    #[error("connection refused")]
    Unreachable,
    #[error("request failed: {0}")]
    Request(String),
    #[error("status {0}")]
    Status(u16),
    #[error("unexpected body: {0}")]
    Body(&'static str),
}

#[derive(Clone)]
pub struct RailsClient {
    http: reqwest::Client,
    base_url: String,
    internal_secret: String,
}

impl RailsClient {
    pub fn new(base_url: &str, internal_secret: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client builds without TLS configuration");
        RailsClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            internal_secret: internal_secret.to_string(),
        }
    }

    /// `GET /internal/api/inhouse_queues/active` with a fresh internal token.
    pub async fn active_queues(&self) -> Result<Vec<QueueSpec>, RailsError> {
        let response = self
            .http
            .get(format!("{}{ACTIVE_QUEUES_PATH}", self.base_url))
            .bearer_auth(auth::mint_reconciler_token(&self.internal_secret))
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(RailsError::from_reqwest)?;
        if !response.status().is_success() {
            return Err(RailsError::Status(response.status().as_u16()));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|_| RailsError::Body("not JSON"))?;
        parse_active_queues(&body)
    }

    /// Rails `GET /health`, bounded by `timeout`.
    pub async fn health(&self, timeout: Duration) -> Result<(), RailsError> {
        let response = self
            .http
            .get(format!("{}/health", self.base_url))
            .timeout(timeout)
            .send()
            .await
            .map_err(RailsError::from_reqwest)?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(RailsError::Status(response.status().as_u16()))
        }
    }
}

impl RailsError {
    fn from_reqwest(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            RailsError::Timeout
        } else if error.is_connect() {
            RailsError::Unreachable
        } else {
            RailsError::Request(error.without_url().to_string())
        }
    }
}

/// Parses `{"queues":[…]}`; a queue with an unknown status or missing ids is skipped.
pub fn parse_active_queues(body: &Value) -> Result<Vec<QueueSpec>, RailsError> {
    let queues = body
        .get("queues")
        .and_then(Value::as_array)
        .ok_or(RailsError::Body("missing queues array"))?;
    let mut specs = Vec::with_capacity(queues.len());
    for queue in queues {
        let (Some(queue_id), Some(org_id)) =
            (id_field(queue, "id"), id_field(queue, "organization_id"))
        else {
            tracing::warn!("reconcile: skipping a queue without id or organization_id");
            continue;
        };
        let Some(status) = queue
            .get("status")
            .and_then(Value::as_str)
            .and_then(QueueStatus::parse)
        else {
            tracing::warn!(
                queue_id = %crate::logsafe::LogSafe(&queue_id),
                "reconcile: skipping a queue with an unknown status"
            );
            continue;
        };
        let entries = entries_field(queue);
        specs.push(QueueSpec {
            queue_id,
            org_id,
            status,
            check_in_deadline: queue
                .get("check_in_deadline")
                .and_then(Value::as_str)
                .and_then(parse_deadline),
            entries,
        });
    }
    Ok(specs)
}
