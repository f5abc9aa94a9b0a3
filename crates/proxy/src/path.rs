//! The id in a request path, refused in OpenAI's error shape when malformed.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use crate::errors::ApiError;

/// The id in a path (a key, a request, a model). A malformed one (percent-encoding
/// that is not UTF-8) is refused in OpenAI's error shape, not with axum's plain-text
/// rejection.
#[derive(Debug)]
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Self(id))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}
