//! `herald.v1.Admin`: this node's connections, listed and closed, as over HTTP
//! (`/v1/admin/connections`); the `admin` right on `>` (every name) when auth is on.

use herald_protocol::ErrorCode;
use tonic::{Request, Response, Status};

use crate::error::{bad_request, status};
use crate::pb::{self, admin_server::Admin};
use crate::GrpcState;

/// The name connection admin is checked against: only a grant covering every name
/// (`>`, or `*`) allows it.
const ALL_NAMES: &str = ">";

/// Most connections one page lists.
const MAX_PAGE: u32 = 1000;

pub(crate) struct AdminService {
    state: GrpcState,
}

impl AdminService {
    pub(crate) fn new(state: GrpcState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        self.state.permit(&caller, herald_auth::Action::Admin, ALL_NAMES)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n <= MAX_PAGE => n as usize,
            n => return Err(bad_request(format!("limit must be 1-{MAX_PAGE}, not {n}"))),
        };
        let broker = self.state.broker();
        let mut page = broker.connection_page(req.after, limit + 1);
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map_or(0, |(c, _)| c.id)
        } else {
            0
        };
        let connections = page
            .iter()
            .map(|(c, topics)| pb::Connection {
                id: c.id,
                door: c.door.label().to_owned(),
                peer: c.peer().map(|p| p.to_string()).unwrap_or_default(),
                user: c.user().unwrap_or_default().to_owned(),
                subscriptions: topics.iter().map(|t| t.as_str().to_owned()).collect(),
                queued_bytes: c.queued_bytes() as u64,
                since: c.since_ms,
            })
            .collect();
        Ok(Response::new(pb::ListConnectionsResponse { connections, open: broker.connections().len() as u64, next }))
    }

    async fn close_connection(
        &self,
        request: Request<pb::CloseConnectionRequest>,
    ) -> Result<Response<pb::CloseConnectionResponse>, Status> {
        let caller = self.state.admit(&request).await?;
        self.state.permit(&caller, herald_auth::Action::Admin, ALL_NAMES)?;
        let id = request.into_inner().id;
        if self.state.broker().connections().close(id) {
            Ok(Response::new(pb::CloseConnectionResponse {}))
        } else {
            Err(status(ErrorCode::NotFound, format!("no open connection {id}")))
        }
    }
}
