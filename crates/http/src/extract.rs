//! Path extractors for the `/v1` routes that answer every failure with an [`ApiError`],
//! so no handler can fall back to axum's plain-text rejections: a name segment that is
//! not UTF-8 once percent-decoded, or that breaks the naming rules, is `invalid_name`;
//! any other bad segment (a delivery id) is `bad_request`.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use herald_core::{QueueName, TopicName};
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Route parameters that hold names (`{topic}`, `{queue}`): bad bytes in them are
/// `invalid_name`, as a bad name is.
const NAME_PARAMS: [&str; 2] = ["topic", "queue"];

/// The `{topic}` of a route, checked against the naming rules.
pub(crate) struct TopicPath(pub TopicName);

/// The `{queue}` of a route, checked against the naming rules.
pub(crate) struct QueuePath(pub QueueName);

/// The `{queue}` and delivery `{id}` of a route, both checked.
pub(crate) struct DeliveryPath(pub QueueName, pub String);

/// The route's parameters as `T`, every rejection mapped to its error code.
async fn params<T, S>(parts: &mut Parts, state: &S) -> Result<T, ApiError>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    Path::<T>::from_request_parts(parts, state).await.map(|Path(t)| t).map_err(rejection)
}

fn rejection(e: PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;
    if let PathRejection::FailedToDeserializePathParams(failed) = &e {
        if let ErrorKind::InvalidUtf8InPathParam { key } = failed.kind() {
            let message = format!("the {key} segment is not UTF-8 once percent-decoded");
            return if NAME_PARAMS.contains(&key.as_str()) {
                ApiError::new(herald_protocol::ErrorCode::InvalidName, message)
            } else {
                ApiError::bad_request(message)
            };
        }
    }
    ApiError::bad_request(e.body_text())
}

/// A delivery id as docs/protocol.md defines it.
fn delivery_id(raw: String) -> Result<String, ApiError> {
    if herald_protocol::is_delivery_id(&raw) {
        Ok(raw)
    } else {
        Err(ApiError::bad_request(herald_protocol::DELIVERY_ID_RULE))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TopicPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw: String = params(parts, state).await?;
        Ok(Self(TopicName::parse(&raw)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueuePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw: String = params(parts, state).await?;
        Ok(Self(QueueName::parse(&raw)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for DeliveryPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (queue, id): (String, String) = params(parts, state).await?;
        // The name first, as everywhere: a request with both wrong is `invalid_name`.
        let queue = QueueName::parse(&queue)?;
        Ok(Self(queue, delivery_id(id)?))
    }
}
