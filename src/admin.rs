//! The admin HTTP endpoint: `POST /revoke`, for an identity provider's webhook or an operator.
//!
//! Authenticated with `Authorization: Bearer <admin secret>` (RFC 6750 section 2.1), the secret
//! read from `--admin-secret-file` and compared in constant time by the gate every endpoint
//! shares ([`endpoint::require_caller`], which also takes it as a Basic password). Body (JSON):
//! `{"domain": "example.com", "user": "alice"}` revokes every verdict of the user;
//! adding `"token": "..."` revokes that token's verdict only.
//!
//! Answers: 200 `{"revoked": "user"|"token", "at_ms": T, "dropped": N}` (the revocation mark's
//! instant, ms since the epoch, and how many verdicts were deleted from Redis); 400 for a
//! malformed body or JID;
//! 401 without the right bearer secret; 413 for a body over [`body_limit`]; 503 when Redis failed
//! (nothing revoked cluster-wide) or the request outlived the endpoint's request timeout.
//!
//! The bearer is checked before any byte of the body is read (a stranger's body costs nothing;
//! hyper sends no `100 Continue` for it), then a `Content-Length` over the limit is refused
//! before reading too. Connection cap and timeouts: [`crate::endpoint`].

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{info, warn};

use crate::endpoint::{self, Access, Callers, EndpointLimits};
use crate::engine::Engine;
use crate::kick::{KickReport, Kicker};
use crate::revoke::{RevokeError, Target};
use extauth_protocol::extauth::Secret;

/// Shared state of the admin routes.
struct Admin {
    engine: Arc<Engine>,
    /// The revoke hook: this broker kicks for the revocations it is asked to perform.
    kicker: Option<Arc<Kicker>>,
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

/// Room in a `POST /revoke` body besides the token (bytes): a domain and a user of up to
/// 1023 bytes each (RFC 7622 section 3) and the JSON around them.
const BODY_OVERHEAD: usize = 4 * 1024;

/// Largest `POST /revoke` body accepted (bytes): the longest token the broker accepts
/// (`--max-token-len`) plus `BODY_OVERHEAD`, 20 KiB by default.
pub(crate) fn body_limit(max_token_len: usize) -> usize {
    max_token_len.saturating_add(BODY_OVERHEAD)
}

/// Serves the admin routes on `listener` within `limits` until `shutdown` is cancelled; bodies
/// are limited to [`body_limit`]`(max_token_len)` bytes. `kicker`, when set, ends a revoked
/// user's sessions through ejabberd after each user revocation.
pub(crate) async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    secret: Secret,
    kicker: Option<Arc<Kicker>>,
    limits: EndpointLimits,
    max_token_len: usize,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, max_connections = limits.max_connections, "admin endpoint listening (POST /revoke)");
    }
    let callers = Arc::new(Callers {
        secret: Some(secret),
        mtls: false,
    });
    let admin = Arc::new(Admin { engine, kicker });
    // Layers run outermost (last added) first: the bearer check, then the body limit.
    let app = Router::new()
        .route("/revoke", post(revoke))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(body_limit(max_token_len)))
        .layer(middleware::from_fn_with_state(
            callers,
            endpoint::require_caller,
        ))
        .with_state(admin);
    endpoint::serve("admin", listener, app, limits, Access::default(), shutdown).await;
}

async fn revoke(State(admin): State<Arc<Admin>>, body: axum::body::Bytes) -> Response {
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
        Ok(done) => {
            let revoked = if body.token.is_some() {
                "token"
            } else {
                "user"
            };
            let (status, kick) = kick_after(&admin, &target).await;
            let answer = json!({
                "revoked": revoked,
                "at_ms": done.at_ms,
                "dropped": done.dropped,
                "kick": kick,
            });
            (status, Json(answer)).into_response()
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

/// Runs the revoke hook after a revocation that succeeded (so the JID parts are valid): the
/// answer's status (502 when the kick failed) and its `"kick"` member.
async fn kick_after(admin: &Admin, target: &Target<'_>) -> (StatusCode, serde_json::Value) {
    let Ok((user, domain)) = crate::revoke::normalise(target) else {
        return (
            StatusCode::OK,
            json!({"outcome": KickReport::Off.outcome()}),
        );
    };
    let kicker = admin.kicker.as_deref();
    let kick = crate::kick::after_revoke(kicker, &user, &domain, target.token.is_some()).await;
    let mut shown = json!({"outcome": kick.outcome()});
    match &kick {
        KickReport::Kicked { sessions: Some(n) } => shown["sessions"] = json!(n),
        KickReport::Failed(_) | KickReport::NotForToken => {
            shown["message"] = json!(kick.describe(&user, &domain));
        }
        _ => {}
    }
    let status = match kick {
        KickReport::Failed(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::OK,
    };
    (status, shown)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
