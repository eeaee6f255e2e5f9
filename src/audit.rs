//! The attributed audit trail of writes (issue: "Attributed audit trail").
//!
//! Under one admin key OpenAI's own records cannot tell which internal service changed what;
//! permgate can. Every create or delete attempt, allowed or denied (a POST or DELETE refused
//! before routing, 414, included), becomes one JSON line appended to `audit.path` (opened in
//! append mode, never truncated) and one tracing event on target `permgate::audit`. A record
//! lists each upstream attempt (`attempts`), since a retry's answer alone can hide that an
//! earlier attempt applied the write (SPEC "Hygiene rules"). The line is written before the response leaves. Records hold
//! client names, never tokens or key material.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::metrics::Metrics;
use crate::upstream::Attempted;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// One write attempt.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client: Option<&'a str>,
    pub method: &'a str,
    /// `None` for a write refused before routing (a URI too long, 414).
    pub route: Option<&'a str>,
    pub checkpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permission_id: Option<&'a str>,
    /// `succeeded`, `denied` (401/403), `rejected` (bad input, 413, 414), `failed` (upstream said
    /// no or could not be reached).
    pub outcome: &'static str,
    pub status: u16,
    /// Upstream's last status, when one arrived.
    pub upstream_status: Option<u16>,
    /// Each attempt that reached upstream, in order: an earlier attempt that failed in
    /// transport may have applied the write that a retry then answers 404.
    pub attempts: &'a [Attempted],
    pub error_code: Option<&'static str>,
}

/// The append-only audit file.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

fn open_append(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("audit.path {}: {}", path.display(), e.kind()))
}

impl AuditLog {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<AuditLog, String> {
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(tokio::fs::File::from_std(open_append(path)?)),
        })
    }

    /// Opens `audit.path` again (after log rotation moved the old file away); records written
    /// meanwhile go to the old file. A failure keeps the old file, is logged and counted.
    pub async fn reopen(&self, metrics: &Metrics) {
        let path = self.path.clone();
        let opened = crate::secret::off_runtime(move || open_append(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match opened {
            Ok(file) => {
                let mut current = self.file.lock().await;
                let _ = current.flush().await;
                *current = tokio::fs::File::from_std(file);
                tracing::info!(target: "permgate::audit", path = %self.path.display(), "audit file reopened");
            }
            Err(why) => {
                tracing::error!(target: "permgate::audit", reason = %why, "cannot reopen the audit file; still writing to the old one");
                metrics.audit_failure();
            }
        }
    }

    /// Appends one line and waits until it has been handed to the OS.
    pub async fn append(&self, record: &Record<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().await;
        file.write_all(&line).await?;
        file.flush().await
    }
}

/// Emits the record as a tracing event and, when configured, appends it to the file.
pub async fn record(log: Option<&AuditLog>, metrics: &Metrics, record: Record<'_>) {
    tracing::info!(
        target: "permgate::audit",
        request_id = record.request_id,
        client = record.client,
        method = record.method,
        checkpoint = record.checkpoint,
        project_ids = ?record.project_ids,
        permission_id = record.permission_id,
        outcome = record.outcome,
        status = record.status,
        upstream_status = record.upstream_status,
        attempts = ?record.attempts,
        "write attempt"
    );
    if let Some(log) = log {
        if let Err(e) = log.append(&record).await {
            tracing::error!(target: "permgate::audit", error = %e, request_id = record.request_id, "audit file write failed");
            metrics.audit_failure();
        }
    }
}

pub fn now_rfc3339() -> String {
    use std::fmt::Write as _;
    // humantime panics before 1970 and fails to format after 9999: a wrong clock must not
    // take the gateway down with it.
    let now = std::time::SystemTime::now().max(std::time::UNIX_EPOCH);
    let mut out = String::with_capacity(24);
    let _ = write!(out, "{}", humantime::format_rfc3339_millis(now));
    out
}
