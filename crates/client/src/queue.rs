//! Work-queue half of the client: enqueue (one job or a batch), fetch (with long poll),
//! ack (one or a batch), requeue, extend, stats and the list of queues over HTTP.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ws::Payload;
use crate::{Client, ClientError, ListOptions};

/// One delivery of a queue message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The delivery id to ack, requeue or extend.
    pub id: String,
    /// The message id within its queue.
    pub message_id: u64,
    /// Deliveries so far, this one included.
    pub attempt: u32,
    /// Enqueue time, ms since the Unix epoch.
    pub ts: u64,
    /// The payload.
    pub payload: Payload,
}

/// A queue's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct QueueStats {
    /// Ready to be fetched.
    pub ready: u64,
    /// Fetched, not yet acked.
    pub in_flight: u64,
    /// Waiting for their delay.
    pub delayed: u64,
    /// In the dead-letter queue.
    pub dead: u64,
}

/// A queue as `GET /v1/queues` lists it: its name and counts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ListedQueue {
    /// The queue.
    pub queue: String,
    /// Its counts.
    #[serde(flatten)]
    pub stats: QueueStats,
}

#[derive(Deserialize)]
struct QueueList {
    queues: Vec<ListedQueue>,
}

/// Options of [`Client::fetch_jobs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    /// Most messages to take (1 to 100).
    pub max: u32,
    /// Lease length.
    pub visibility: Duration,
    /// Longest wait for a message (0 to 20 s).
    pub wait: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self { max: 1, visibility: Duration::from_secs(30), wait: Duration::ZERO }
    }
}

#[derive(Deserialize)]
struct Enqueued {
    message_id: u64,
}

/// One job of [`Client::enqueue_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The payload and its kind.
    pub payload: JobPayload,
    /// Not ready before this has passed.
    pub delay: Duration,
    /// Dropped once this has passed, whatever its state.
    pub ttl: Option<Duration>,
}

/// A job's payload, by kind (as a single enqueue's `Content-Type` would set it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPayload {
    /// JSON text (kind json; the server refuses text that is not JSON).
    Json(String),
    /// A string (kind text).
    Text(String),
    /// Bytes (kind binary).
    Binary(Vec<u8>),
}

impl NewJob {
    /// A job of `payload`, ready at once, without TTL.
    pub fn new(payload: JobPayload) -> Self {
        Self { payload, delay: Duration::ZERO, ttl: None }
    }

    /// A JSON job, ready at once.
    pub fn json(json: impl Into<String>) -> Self {
        Self::new(JobPayload::Json(json.into()))
    }

    /// A text job, ready at once.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(JobPayload::Text(text.into()))
    }
}

/// Why one entry of a batch was not done (the others may have been).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EntryError {
    /// Herald's error code word, as in [`ClientError::Api`].
    pub code: String,
    /// The server's words.
    pub message: String,
}

#[derive(Deserialize)]
struct BatchErrorEntry {
    index: usize,
    #[serde(flatten)]
    error: EntryError,
}

#[derive(Deserialize)]
struct BatchEnqueued {
    message_ids: Vec<Option<u64>>,
    #[serde(default)]
    errors: Vec<BatchErrorEntry>,
}

#[derive(Deserialize)]
struct BatchAcked {
    #[serde(default)]
    errors: Vec<BatchErrorEntry>,
}

/// One outcome per entry of a batch reply: `ok(i)` where no error names entry `i`.
fn outcomes<T>(
    n: usize,
    errors: Vec<BatchErrorEntry>,
    ok: impl Fn(usize) -> Option<T>,
) -> Result<Vec<Result<T, EntryError>>, ClientError> {
    let mut out: Vec<Option<Result<T, EntryError>>> = (0..n).map(|_| None).collect();
    for e in errors {
        let slot =
            out.get_mut(e.index).ok_or_else(|| ClientError::Protocol(format!("error for entry {} of {n}", e.index)))?;
        *slot = Some(Err(e.error));
    }
    out.into_iter()
        .enumerate()
        .map(|(i, o)| match o {
            Some(err) => Ok(err),
            None => ok(i).map(Ok).ok_or_else(|| ClientError::Protocol(format!("no outcome for entry {i}"))),
        })
        .collect()
}

#[derive(Deserialize)]
struct Fetched {
    messages: Vec<RawJob>,
    #[serde(default)]
    ack_errors: Vec<BatchErrorEntry>,
}

#[derive(Deserialize)]
struct RawJob {
    id: String,
    message_id: u64,
    attempt: u32,
    ts: u64,
    data: Option<Box<serde_json::value::RawValue>>,
    data_b64: Option<String>,
}

impl Client {
    /// Enqueues `body` (kind from `content_type`, as for topics) after `delay`; returns
    /// the message id once the server stored it.
    pub async fn enqueue(
        &self,
        queue: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
        delay: Duration,
    ) -> Result<u64, ClientError> {
        let mut url = format!("{}/v1/queues/{queue}/messages", self.base());
        if !delay.is_zero() {
            url.push_str(&format!("?delay_ms={}", delay.as_millis()));
        }
        let response = self.http().post(url).header("content-type", content_type).body(body).send().await?;
        let bytes = Self::check(response).await?.bytes().await?;
        let e: Enqueued = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(e.message_id)
    }

    /// Enqueues up to 1000 jobs in one request (one group commit on the server's
    /// store); one outcome per job, in order: its message id, or why it was not
    /// stored. When every job fails, the error is the call's.
    pub async fn enqueue_batch(
        &self,
        queue: &str,
        jobs: &[NewJob],
    ) -> Result<Vec<Result<u64, EntryError>>, ClientError> {
        use base64::Engine;
        let mut body = String::from("{\"messages\":[");
        for (i, job) in jobs.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            match &job.payload {
                JobPayload::Json(json) => {
                    body.push_str("{\"data\":");
                    body.push_str(json);
                }
                JobPayload::Text(text) => {
                    body.push_str("{\"text\":");
                    body.push_str(&serde_json::Value::from(text.as_str()).to_string());
                }
                JobPayload::Binary(bytes) => {
                    body.push_str("{\"data_b64\":\"");
                    body.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
                    body.push('"');
                }
            }
            if !job.delay.is_zero() {
                body.push_str(&format!(",\"delay_ms\":{}", job.delay.as_millis()));
            }
            if let Some(ttl) = job.ttl {
                body.push_str(&format!(",\"ttl_ms\":{}", ttl.as_millis()));
            }
            body.push('}');
        }
        body.push_str("]}");
        let url = format!("{}/v1/queues/{queue}/batch", self.base());
        let response = self.http().post(url).header("content-type", "application/json").body(body).send().await?;
        let bytes = Self::check(response).await?.bytes().await?;
        let r: BatchEnqueued = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if r.message_ids.len() != jobs.len() {
            return Err(ClientError::Protocol(format!("{} ids for {} jobs", r.message_ids.len(), jobs.len())));
        }
        outcomes(jobs.len(), r.errors, |i| r.message_ids[i])
    }

    /// Acknowledges up to 1000 jobs of one queue in one request; one outcome per job,
    /// in order. When every ack fails, the error is the call's.
    pub async fn ack_batch(&self, queue: &str, jobs: &[Job]) -> Result<Vec<Result<(), EntryError>>, ClientError> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let body = serde_json::json!({ "ids": ids }).to_string();
        let url = format!("{}/v1/queues/{queue}/ack", self.base());
        let response = self.http().post(url).header("content-type", "application/json").body(body).send().await?;
        let bytes = Self::check(response).await?.bytes().await?;
        let r: BatchAcked = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        outcomes(jobs.len(), r.errors, |_| Some(()))
    }

    /// Fetches up to `options.max` jobs, waiting up to `options.wait` for one.
    pub async fn fetch_jobs(&self, queue: &str, options: FetchOptions) -> Result<Vec<Job>, ClientError> {
        Ok(self.fetch_request(queue, &[], options).await?.1)
    }

    /// Acks `done` (jobs of `queue` this worker finished) and fetches up to
    /// `options.max` more, in one request: the acks go with the fetch, so a
    /// worker taking one job at a time makes one request per job. Returns one ack
    /// outcome per job of `done` (in order; `not_found` for a lease that had ended) and
    /// the jobs fetched. An error means the fetch failed; the acks may have been done
    /// (acking them again then answers `not_found`).
    pub async fn ack_and_fetch(
        &self,
        queue: &str,
        done: &[Job],
        options: FetchOptions,
    ) -> Result<(Vec<Result<(), EntryError>>, Vec<Job>), ClientError> {
        self.fetch_request(queue, done, options).await
    }

    async fn fetch_request(
        &self,
        queue: &str,
        done: &[Job],
        options: FetchOptions,
    ) -> Result<(Vec<Result<(), EntryError>>, Vec<Job>), ClientError> {
        let url = format!(
            "{}/v1/queues/{queue}/fetch?max={}&visibility_ms={}&wait_ms={}",
            self.base(),
            options.max,
            options.visibility.as_millis(),
            options.wait.as_millis()
        );
        let mut request = self.http().post(url);
        if !done.is_empty() {
            let ids: Vec<&str> = done.iter().map(|j| j.id.as_str()).collect();
            let body = serde_json::json!({ "ack": ids }).to_string();
            request = request.header("content-type", "application/json").body(body);
        }
        let bytes = Self::check(request.send().await?).await?.bytes().await?;
        let f: Fetched = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let acks = outcomes(done.len(), f.ack_errors, |_| Some(()))?;
        let jobs = f
            .messages
            .into_iter()
            .map(|m| {
                Ok(Job {
                    id: m.id,
                    message_id: m.message_id,
                    attempt: m.attempt,
                    ts: m.ts,
                    payload: Payload::from_fields(m.data, m.data_b64)?,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok((acks, jobs))
    }

    async fn delivery_call(&self, queue: &str, verb: &str, id: &str, query: &str) -> Result<(), ClientError> {
        let url = format!("{}/v1/queues/{queue}/{verb}/{id}{query}", self.base());
        Self::check(self.http().post(url).send().await?).await?;
        Ok(())
    }

    /// Acknowledges a job: it is done.
    pub async fn ack(&self, queue: &str, job: &Job) -> Result<(), ClientError> {
        self.delivery_call(queue, "ack", &job.id, "").await
    }

    /// Gives a job back, ready again after `delay`.
    pub async fn requeue(&self, queue: &str, job: &Job, delay: Duration) -> Result<(), ClientError> {
        self.delivery_call(queue, "requeue", &job.id, &format!("?delay_ms={}", delay.as_millis())).await
    }

    /// Extends a job's lease to `visibility` from now.
    pub async fn extend(&self, queue: &str, job: &Job, visibility: Duration) -> Result<(), ClientError> {
        self.delivery_call(queue, "extend", &job.id, &format!("?visibility_ms={}", visibility.as_millis())).await
    }

    /// One page of the queues this client may administer (all of them on a server
    /// without auth), in name order, with their counts: pass the last one's name as
    /// `after` for the next.
    pub async fn list_queues(&self, options: ListOptions<'_>) -> Result<Vec<ListedQueue>, ClientError> {
        let url = format!("{}/v1/queues{}", self.base(), options.query());
        let bytes = Self::check(self.http().get(url).send().await?).await?.bytes().await?;
        let list: QueueList = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(list.queues)
    }

    /// The queue's counts.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, ClientError> {
        let url = format!("{}/v1/queues/{queue}", self.base());
        let bytes = Self::check(self.http().get(url).send().await?).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
