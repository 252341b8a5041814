//! The `herald.v1.Queues` service: enqueue (one or a batch), fetch (with long poll), ack
//! (one or a batch), requeue, extend, stats, list, purge and redrive. Thin, like the
//! HTTP one: every rule lives in the core's queues.

use std::time::Duration;

use herald_core::{QueueError, QueueName};
use herald_protocol::ErrorCode;
use tonic::{Request, Response, Status};

use crate::encoded::{content_type, pb_kind};
use crate::error::{bad_request, from_broker, from_name, from_queue};
use crate::pb::{self, queues_server::Queues};
use crate::{check_batch, kind_of, new_message, GrpcState, MAX_BATCH};

/// Longest a fetch may wait, per docs/protocol.md.
const MAX_WAIT_MS: u64 = 20_000;
/// Longest lease: 12 hours.
const MAX_VISIBILITY_MS: u64 = 43_200_000;
const DEFAULT_VISIBILITY_MS: u64 = 30_000;
const MAX_FETCH: u32 = 100;
/// Delays and TTLs are capped as over HTTP, so deadlines never overflow.
const MAX_DELAY_MS: u64 = u64::MAX / 2;

pub(crate) struct QueuesService {
    state: GrpcState,
}

impl QueuesService {
    pub(crate) fn new(state: GrpcState) -> Self {
        Self { state }
    }
}

fn queue_name(raw: &str) -> Result<QueueName, Status> {
    QueueName::parse(raw).map_err(from_name)
}

/// A delivery id as docs/protocol.md defines it.
fn delivery_id(raw: &str) -> Result<&str, Status> {
    herald_protocol::is_delivery_id(raw).then_some(raw).ok_or_else(|| bad_request(herald_protocol::DELIVERY_ID_RULE))
}

/// Delivery ids of a request's repeated `field`, each as docs/protocol.md defines it.
fn delivery_ids(ids: &[String], field: &str) -> Result<(), Status> {
    match ids.iter().position(|id| !herald_protocol::is_delivery_id(id)) {
        Some(i) => Err(bad_request(format!("{field}[{i}]: {}", herald_protocol::DELIVERY_ID_RULE))),
        None => Ok(()),
    }
}

fn in_range(name: &str, value: u64, min: u64, max: u64) -> Result<u64, Status> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(bad_request(format!("{name} must be an integer from {min} to {max}")))
    }
}

/// A batch's outcomes as the response carries them: per entry its value (`None` where
/// it failed) and the failed entries' errors; when every entry failed, the first
/// failure is the call's error.
fn split_outcomes<T>(outcomes: Vec<Result<T, QueueError>>) -> Result<(Vec<Option<T>>, Vec<pb::EntryError>), Status> {
    if !outcomes.is_empty() && outcomes.iter().all(Result::is_err) {
        let first = outcomes.into_iter().find_map(Result::err);
        return Err(first.map_or_else(|| bad_request("an empty batch"), from_queue));
    }
    Ok(entry_errors(outcomes))
}

/// Per entry its value (`None` where it failed), and the failed entries' errors.
fn entry_errors<T>(outcomes: Vec<Result<T, QueueError>>) -> (Vec<Option<T>>, Vec<pb::EntryError>) {
    let mut errors = Vec::new();
    let done = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.map_err(|e| {
                if let QueueError::Store(store) = &e {
                    tracing::warn!(error = %store, "store error");
                }
                errors.push(pb::EntryError {
                    index: i as u32,
                    code: ErrorCode::from(&e).as_str().to_owned(),
                    message: e.to_string(),
                })
            })
            .ok()
        })
        .collect();
    (done, errors)
}

#[tonic::async_trait]
impl Queues for QueuesService {
    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let peer = crate::peer_of(&request);
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Enqueue, queue.as_str())?;
        let delay_ms = in_range("delay_ms", req.delay_ms, 0, MAX_DELAY_MS)?;
        let ttl_ms = req.ttl_ms.map(|t| in_range("ttl_ms", t, 0, MAX_DELAY_MS)).transpose()?;
        let broker = self.state.broker();
        let msg = new_message(broker, kind_of(req.kind, &req.content_type)?, req.data, ttl_ms)?;
        self.state.pace(peer.as_deref(), &caller, 1, msg.payload.len())?;
        let message_id =
            broker.queue_service().map_err(from_broker)?.enqueue(&queue, msg, delay_ms).await.map_err(from_queue)?;
        Ok(Response::new(pb::EnqueueResponse { queue: req.queue, message_id }))
    }

    async fn enqueue_batch(
        &self,
        request: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let peer = crate::peer_of(&request);
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Enqueue, queue.as_str())?;
        check_batch(req.messages.len(), "messages")?;
        let broker = self.state.broker();
        let batch = req
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                // The entry is named after the code word every message starts with.
                let at = |s: Status| match s.message().split_once(": ") {
                    Some((word, rest)) => Status::new(s.code(), format!("{word}: messages[{i}]: {rest}")),
                    None => s,
                };
                let delay_ms = in_range("delay_ms", m.delay_ms, 0, MAX_DELAY_MS).map_err(at)?;
                let ttl_ms = m.ttl_ms.map(|t| in_range("ttl_ms", t, 0, MAX_DELAY_MS)).transpose().map_err(at)?;
                let kind = kind_of(m.kind, &m.content_type).map_err(at)?;
                Ok((new_message(broker, kind, m.data, ttl_ms).map_err(at)?, delay_ms))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.state.pace(peer.as_deref(), &caller, batch.len(), batch.iter().map(|(m, _)| m.payload.len()).sum())?;
        let outcomes = broker.queue_service().map_err(from_broker)?.enqueue_batch(&queue, batch).await;
        let (done, errors) = split_outcomes(outcomes)?;
        let message_ids = done.into_iter().map(Option::unwrap_or_default).collect();
        Ok(Response::new(pb::EnqueueBatchResponse { queue: req.queue, message_ids, errors }))
    }

    async fn ack_batch(&self, request: Request<pb::AckBatchRequest>) -> Result<Response<pb::AckBatchResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Consume, queue.as_str())?;
        check_batch(req.ids.len(), "ids")?;
        delivery_ids(&req.ids, "ids")?;
        let outcomes = self.state.broker().queue_service().map_err(from_broker)?.ack_batch(&queue, &req.ids).await;
        let (done, errors) = split_outcomes(outcomes)?;
        let acked = done.iter().flatten().count() as u32;
        Ok(Response::new(pb::AckBatchResponse { acked, errors }))
    }

    async fn fetch(&self, request: Request<pb::QueueFetchRequest>) -> Result<Response<pb::QueueFetchResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Consume, queue.as_str())?;
        let max = if req.max == 0 { 1 } else { in_range("max", req.max.into(), 1, MAX_FETCH.into())? as usize };
        let visibility_ms = match req.visibility_ms {
            0 => DEFAULT_VISIBILITY_MS,
            v => in_range("visibility_ms", v, 1, MAX_VISIBILITY_MS)?,
        };
        let wait = Duration::from_millis(in_range("wait_ms", req.wait_ms, 0, MAX_WAIT_MS)?);
        if req.ack.len() > MAX_BATCH {
            return Err(bad_request(format!("a fetch acks at most {MAX_BATCH} ids, not {}", req.ack.len())));
        }
        delivery_ids(&req.ack, "ack")?;
        let queues = self.state.broker().queue_service().map_err(from_broker)?;
        let started = std::time::Instant::now();
        // The acks with the fetch: one call per job for a worker taking one.
        let (limits, stop) = ((max, visibility_ms, wait), self.state.inner.shutdown.cancelled());
        let (acked, fetched) = herald_core::fetch_acking(queues, &queue, &req.ack, limits, stop).await;
        let deliveries = fetched.map_err(from_queue)?;
        let (done, ack_errors) = entry_errors(acked);
        let acked = done.iter().flatten().count() as u32;
        self.state.broker().metrics().latency.fetch_wait.observe(started.elapsed().as_secs_f64());
        let messages = deliveries
            .into_iter()
            .map(|d| pb::Job {
                id: d.id,
                message_id: d.message_id,
                attempt: d.attempt,
                ts: d.ts,
                kind: pb_kind(d.kind) as i32,
                data: d.payload,
                content_type: content_type(d.kind).to_owned(),
            })
            .collect();
        Ok(Response::new(pb::QueueFetchResponse { messages, acked, ack_errors }))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Consume, queue.as_str())?;
        self.state
            .broker()
            .queue_service()
            .map_err(from_broker)?
            .ack(&queue, delivery_id(&req.id)?)
            .await
            .map_err(from_queue)?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn requeue(&self, request: Request<pb::RequeueRequest>) -> Result<Response<pb::RequeueResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Consume, queue.as_str())?;
        let delay_ms = in_range("delay_ms", req.delay_ms, 0, MAX_DELAY_MS)?;
        self.state
            .broker()
            .queue_service()
            .map_err(from_broker)?
            .requeue(&queue, delivery_id(&req.id)?, delay_ms)
            .await
            .map_err(from_queue)?;
        Ok(Response::new(pb::RequeueResponse {}))
    }

    async fn extend(&self, request: Request<pb::ExtendRequest>) -> Result<Response<pb::ExtendResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Consume, queue.as_str())?;
        let visibility_ms = in_range("visibility_ms", req.visibility_ms, 1, MAX_VISIBILITY_MS)?;
        self.state
            .broker()
            .queue_service()
            .map_err(from_broker)?
            .extend(&queue, delivery_id(&req.id)?, visibility_ms)
            .await
            .map_err(from_queue)?;
        Ok(Response::new(pb::ExtendResponse {}))
    }

    async fn stats(&self, request: Request<pb::QueueStatsRequest>) -> Result<Response<pb::QueueStats>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Admin, queue.as_str())?;
        let s = self.state.broker().queue_service().map_err(from_broker)?.stats(&queue).await.map_err(from_queue)?;
        Ok(Response::new(pb::QueueStats {
            queue: req.queue,
            ready: s.ready,
            in_flight: s.in_flight,
            delayed: s.delayed,
            dead: s.dead,
        }))
    }

    async fn list(&self, request: Request<pb::ListQueuesRequest>) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let limit = crate::topics::limit(req.limit)?;
        let after = (!req.after.is_empty()).then_some(req.after.as_str());
        // The queues the caller may administer (all of them without auth).
        let visible = |q: &QueueName| caller.as_ref().is_none_or(|p| p.allows(herald_auth::Action::Admin, q.as_str()));
        let queues = self.state.broker().queue_service().map_err(from_broker)?;
        let listed = queues.list(&req.prefix, after, limit, &visible).await.map_err(from_queue)?;
        let queues = listed
            .into_iter()
            .map(|l| pb::QueueStats {
                queue: l.queue.as_str().to_owned(),
                ready: l.stats.ready,
                in_flight: l.stats.in_flight,
                delayed: l.stats.delayed,
                dead: l.stats.dead,
            })
            .collect();
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn purge(&self, request: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Admin, queue.as_str())?;
        let queues = self.state.broker().queue_service().map_err(from_broker)?;
        let purged = queues.purge(&queue).await.map_err(from_queue)?;
        tracing::info!(%queue, purged, "queue purged");
        Ok(Response::new(pb::PurgeResponse { queue: req.queue, purged }))
    }

    async fn redrive(&self, request: Request<pb::RedriveRequest>) -> Result<Response<pb::RedriveResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let queue = queue_name(&req.queue)?;
        self.state.permit(&caller, herald_auth::Action::Admin, queue.as_str())?;
        let max = match req.max {
            0 => MAX_REDRIVE,
            n => in_range("max", n.into(), 1, MAX_REDRIVE)?,
        };
        let queues = self.state.broker().queue_service().map_err(from_broker)?;
        let moved = queues.redrive(&queue, max as usize).await.map_err(from_queue)?;
        tracing::info!(%queue, moved, "dead letters redriven");
        Ok(Response::new(pb::RedriveResponse { queue: req.queue, moved }))
    }
}

/// Most dead letters one redrive call moves.
const MAX_REDRIVE: u64 = 100_000;
