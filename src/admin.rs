//! The admin HTTP endpoint: `POST /revoke`, for an identity provider's webhook or an operator.
//!
//! Authenticated with `Authorization: Bearer <admin secret>` (RFC 6750 section 2.1), the secret
//! read from `--admin-secret-file` and compared in constant time. Body (JSON):
//! `{"domain": "example.com", "user": "alice"}` revokes every verdict of the user;
//! adding `"token": "..."` revokes that token's verdict only.
//!
//! Answers: 200 `{"revoked": "user"|"token", "generation": N}`; 400 for a malformed body or JID;
//! 401 without the right bearer secret; 503 when Redis failed (nothing revoked cluster-wide).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Engine;
use crate::extauth::Secret;
use crate::revoke::{RevokeError, Target};

/// Shared state of the admin routes.
struct Admin {
    engine: Arc<Engine>,
    secret: Secret,
}

/// A `POST /revoke` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    domain: String,
    user: String,
    #[serde(default)]
    token: Option<Secret>,
}

/// Serves the admin routes on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    secret: Secret,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "admin endpoint listening (POST /revoke)");
    }
    let app = Router::new()
        .route("/revoke", post(revoke))
        .with_state(Arc::new(Admin { engine, secret }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!("admin endpoint stopped: {e}");
    }
}

async fn revoke(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorised(&headers, &admin.secret) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            Json(json!({"error": "unauthorized"})),
        )
            .into_response();
    }
    // Parsed by hand so a bad body's error message (which could quote a token) is not echoed.
    let Ok(body) = serde_json::from_slice::<RevokeBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be {\"domain\": ..., \"user\": ..., \"token\"?: ...}",
        );
    };
    let target = Target {
        domain: &body.domain,
        user: &body.user,
        token: body.token.as_ref(),
    };
    match admin.engine.revoke(&target).await {
        Ok(generation) => {
            let revoked = if body.token.is_some() {
                "token"
            } else {
                "user"
            };
            Json(json!({"revoked": revoked, "generation": generation})).into_response()
        }
        Err(RevokeError::BadJid) => error(
            StatusCode::BAD_REQUEST,
            "user or domain is not a valid JID part",
        ),
        Err(e @ RevokeError::Redis(_)) => {
            warn!("admin revoke failed: {e}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis failed; nothing was revoked cluster-wide",
            )
        }
    }
}

fn authorised(headers: &HeaderMap, secret: &Secret) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(secret.expose().as_bytes())))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
