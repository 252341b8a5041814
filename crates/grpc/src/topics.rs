//! The `herald.v1.Topics` service: publish (one or a batch), fetch, subscribe, info,
//! list and delete, with the HTTP front door's semantics, limits and error codes.

use herald_core::{Door, StartFrom, TopicName};
use tonic::{Request, Response, Status};

use crate::encoded::topic_message;
use crate::error::{bad_request, from_broker, from_name};
use crate::pb::subscribe_request::From as FromPosition;
use crate::pb::{self, topics_server::Topics};
use crate::subscribe::{self, EventStream};
use crate::{check_batch, kind_of, new_message, GrpcState};

/// Most messages a Fetch or List returns.
const MAX_LIMIT: u32 = 1000;
const DEFAULT_LIMIT: u32 = 100;
/// Fetch stops before its response would pass this (gRPC's usual 4 MiB receive limit,
/// less room for the envelope), always returning at least one message.
const FETCH_RESPONSE_BYTES: usize = (4 << 20) - (64 << 10);

pub(crate) struct TopicsService {
    state: GrpcState,
}

impl TopicsService {
    pub(crate) fn new(state: GrpcState) -> Self {
        Self { state }
    }
}

fn topic_name(raw: &str) -> Result<TopicName, Status> {
    TopicName::parse(raw).map_err(from_name)
}

/// `limit` with proto3's 0 meaning the default, else 1 to 1000.
pub(crate) fn limit(raw: u32) -> Result<usize, Status> {
    match raw {
        0 => Ok(DEFAULT_LIMIT as usize),
        1..=MAX_LIMIT => Ok(raw as usize),
        _ => Err(bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))),
    }
}

#[tonic::async_trait]
impl Topics for TopicsService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let peer = crate::peer_of(&request);
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Publish, topic.as_str())?;
        let broker = self.state.broker();
        let msg = new_message(broker, kind_of(req.kind, &req.content_type)?, req.data, req.ttl_ms)?;
        self.state.pace(peer.as_deref(), &caller, 1, msg.payload.len())?;
        let p = broker.publish_via(Door::Grpc, &topic, msg).await.map_err(from_broker)?;
        Ok(Response::new(pb::PublishResponse { topic: req.topic, offset: p.offset, ts: p.ts }))
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let peer = crate::peer_of(&request);
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Publish, topic.as_str())?;
        check_batch(req.messages.len(), "messages")?;
        let broker = self.state.broker();
        let batch = req
            .messages
            .into_iter()
            .map(|m| new_message(broker, kind_of(m.kind, &m.content_type)?, m.data, m.ttl_ms))
            .collect::<Result<Vec<_>, Status>>()?;
        let bytes = batch.iter().map(|m| m.payload.len()).sum();
        self.state.pace(peer.as_deref(), &caller, batch.len(), bytes)?;
        let published = broker.publish_batch_via(Door::Grpc, &topic, batch).await.map_err(from_broker)?;
        let published = published.into_iter().map(|p| pb::Published { offset: p.offset, ts: p.ts }).collect();
        Ok(Response::new(pb::PublishBatchResponse { topic: req.topic, published }))
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Subscribe, topic.as_str())?;
        let limit = limit(req.limit)?;
        let page = self.state.broker().fetch(&topic, req.from, limit).await.map_err(from_broker)?;
        let mut next = page.next;
        let mut size = 0;
        let mut messages = Vec::with_capacity(page.messages.len());
        for m in &page.messages {
            size += m.payload.len() + m.topic.as_str().len() + 64;
            if size > FETCH_RESPONSE_BYTES && !messages.is_empty() {
                next = m.offset;
                break;
            }
            messages.push(topic_message(m));
        }
        Ok(Response::new(pb::FetchResponse { topic: req.topic, epoch: page.epoch.to_string(), messages, next }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<EventStream>, Status> {
        let caller = self.state.admit(&request).await?;
        let credentials = crate::credentials_of(&request);
        let who = (crate::peer_of(&request).map(|p| p.addr()), caller.as_ref().map(|p| p.name.clone()));
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Subscribe, topic.as_str())?;
        let from = match req.from {
            None => StartFrom::Latest,
            Some(FromPosition::Offset(n)) => StartFrom::Offset(n),
            Some(FromPosition::Start(s)) => match pb::Start::try_from(s) {
                Ok(pb::Start::Latest) => StartFrom::Latest,
                Ok(pb::Start::Earliest) => StartFrom::Earliest,
                Err(_) => return Err(bad_request(format!("start {s} is not a known Start"))),
            },
        };
        // Ends the stream when the token expires or a reload takes the grant away.
        let watch = herald_auth::Watch::new(
            self.state.auth(),
            caller,
            credentials,
            vec![herald_auth::Action::Subscribe],
            topic.as_str(),
        );
        let info = herald_protocol::decode::member_info(&req.info).map_err(bad_request)?;
        let ask = subscribe::PresenceAsk { events: req.presence, info };
        let stream =
            subscribe::open(&self.state, topic, from, req.epoch.as_deref(), (req.pack, ask), watch, who).await?;
        Ok(Response::new(stream))
    }

    async fn info(&self, request: Request<pb::TopicInfoRequest>) -> Result<Response<pb::TopicInfo>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Subscribe, topic.as_str())?;
        let info = self.state.broker().info(&topic).await.map_err(from_broker)?;
        let h = info.head;
        Ok(Response::new(pb::TopicInfo {
            topic: req.topic,
            epoch: h.epoch.to_string(),
            first: h.first,
            last: h.last,
            retained: h.retained,
            subscribers: info.subscribers,
            publishers: info.publishers,
        }))
    }

    async fn presence(&self, request: Request<pb::PresenceRequest>) -> Result<Response<pb::PresenceResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let topic = topic_name(&req.topic)?;
        self.state.permit(&caller, herald_auth::Action::Subscribe, topic.as_str())?;
        let list = self.state.broker().presence().list(&topic, req.after, limit(req.limit)?);
        Ok(Response::new(pb::PresenceResponse {
            topic: req.topic,
            subscribers: list.subscribers,
            publishers: list.publishers,
            members: list.members.iter().map(subscribe::pb_member).collect(),
            more: list.more,
        }))
    }

    async fn list(&self, request: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let req = request.into_inner();
        let limit = limit(req.limit)?;
        // The topics the caller may administer (all of them without auth).
        let visible = |t: &herald_core::TopicName| {
            caller.as_ref().is_none_or(|p| p.allows(herald_auth::Action::Admin, t.as_str()))
        };
        let after = (!req.after.is_empty()).then_some(req.after.as_str());
        let listed = self.state.broker().list_visible(&req.prefix, after, limit, visible).await.map_err(from_broker)?;
        let topics = listed
            .into_iter()
            .map(|t| pb::TopicSummary {
                topic: t.topic.as_str().to_owned(),
                last: t.last,
                subscribers: t.subscribers,
                publishers: t.publishers,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        let topic = topic_name(&request.into_inner().topic)?;
        self.state.permit(&caller, herald_auth::Action::Admin, topic.as_str())?;
        self.state.broker().delete(&topic).await.map_err(from_broker)?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }
}
