//! The HTTP check front (`--http-listen`): the same engine as the shim path (same L1, Redis,
//! flights, revocations; metrics labelled `front="http"`) behind the request contracts of the
//! HTTP auth modules of other servers. Pages with their configuration: `docs/mongooseim.md`,
//! `docs/prosody.md`, `docs/nginx.md`.
//!
//! | route | asked by | request | answer |
//! |---|---|---|---|
//! | `GET`/`POST /check_password` | MongooseIM `http` auth, ejabberd-contrib `ejabberd_auth_http`, Prosody `mod_auth_http` | `user`, `server`, `pass` (query, or `application/x-www-form-urlencoded` body) | 200 `true` / `false` |
//! | `GET`/`POST /user_exists` | the same | `user`, `server` | 200 `true` / `false` (the `isuser` policy) |
//! | `/set_password`, `/register`, `/remove_user`, `/remove_user_validate`, `/get_password`, `/get_certs` | the same | | 403: accounts are the provider's (both Erlang modules read 403 as `not_allowed`) |
//! | `POST /custom_http/{domain}` | Prosody `mod_auth_custom_http` | JSON `{"username": ..., "password": ...}`, any content type | 200 `true` / `false` |
//! | any method `/auth_request[/{domain}[/{user}]]` | nginx `auth_request` | `Authorization: Bearer TOKEN`; user and domain from the path or `X-Extauth-User` / `X-Extauth-Domain` | 204 with `X-Extauth-User` and `X-Extauth-Jid`; 401 bad, expired or another user's token; 403 unknown domain; 503 provider unavailable |
//!
//! Every refusal is `false` with 200 on the `true`/`false` routes (the reason, a fixed word, is
//! in `X-Extauth-Reason`), as the shim answers `0`: a module that reads another status as an
//! error would log it as an outage. A request without its parameters, or with a body that does
//! not parse, is 400; a body over [`body_limit`] is 413.
//!
//! The sources these contracts follow: MongooseIM `src/auth/ejabberd_auth_http.erl`
//! (`make_req`: GET `check_password`/`user_exists` with the query `user`, `server`, `pass`; 200
//! with the body `true`), ejabberd-contrib `ejabberd_auth_http/src/ejabberd_auth_http.erl` (the
//! same, `path_prefix`, POSTs as forms), Prosody's `mod_auth_http` README (`<url>/METHOD`, GET
//! query or POST form, body `true`/`false`), `mod_auth_custom_http` (POST of the JSON object to
//! `post_url`, success when the body is exactly `true`), nginx `ngx_http_auth_request_module`
//! (2xx allows, 401/403 deny, anything else is an error).
//!
//! Callers are authenticated by the gate every endpoint shares ([`endpoint::require_caller`]):
//! the caller secret as a Basic password, a bearer, or `X-Extauth-Caller`, or mTLS. Passwords
//! in a GET query are in the URL: whoever logs URLs (a proxy in between, the caller's debug
//! log) logs tokens. This front logs the path only, never the query, headers or body.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Form, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{debug, info};

use crate::endpoint::{self, Access, Callers, HttpFrontConfig};
use crate::engine::{Engine, Front, Outcome};
use extauth_protocol::extauth::{Command, Secret};
use extauth_protocol::wire::Reason;

/// Header naming the user on `/auth_request` when the path does not.
pub(crate) const USER_HEADER: &str = "x-extauth-user";
/// Header naming the domain on `/auth_request` when the path does not.
pub(crate) const DOMAIN_HEADER: &str = "x-extauth-domain";
/// Response header with the accepted JID (`user@domain`) on `/auth_request`.
pub(crate) const JID_HEADER: &str = "x-extauth-jid";
/// Response header with the reason of an answer (a fixed word such as `wrong_user`).
pub(crate) const REASON_HEADER: &str = "x-extauth-reason";

/// Largest request body (bytes): a form-encoded token can take three bytes per byte of the
/// token (`%XX`), plus the admin endpoint's room for a user, a domain and the syntax around them.
pub(crate) fn body_limit(max_token_len: usize) -> usize {
    crate::admin::body_limit(max_token_len.saturating_mul(3))
}

/// Shared state of the routes.
struct Checker {
    engine: Arc<Engine>,
    /// How long a request may wait for its answer: inside the endpoint's request timeout, so a
    /// slow provider is a refusal, not a 503 from the endpoint.
    deadline: Duration,
}

/// Serves the front on `listener` until `shutdown` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    config: HttpFrontConfig,
    max_token_len: usize,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(
            listen = %addr,
            tls = config.tls.is_some(),
            mtls = config.mtls,
            max_connections = config.limits.max_connections,
            "HTTP check front listening"
        );
    }
    let checker = Arc::new(Checker {
        engine,
        deadline: config.limits.request_timeout.mul_f64(0.9),
    });
    let callers = Arc::new(Callers {
        secret: config.secret.clone(),
        mtls: config.mtls,
    });
    let access = Access {
        tls: config.tls.clone().map(TlsAcceptor::from),
        allow: config.allow.clone(),
    };
    let app = router(checker)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(body_limit(max_token_len)))
        // The caller check runs before anything reads the body (layers run outermost first).
        .layer(middleware::from_fn_with_state(
            callers,
            endpoint::require_caller,
        ))
        .layer(middleware::from_fn(access_log));
    endpoint::serve("http", listener, app, config.limits, access, shutdown).await;
}

fn router(checker: Arc<Checker>) -> Router {
    let refused = || any(not_allowed);
    Router::new()
        .route("/check_password", get(check_password).post(check_password))
        .route("/user_exists", get(user_exists).post(user_exists))
        .route("/set_password", refused())
        .route("/register", refused())
        .route("/remove_user", refused())
        .route("/remove_user_validate", refused())
        .route("/get_password", refused())
        .route("/get_certs", refused())
        .route("/custom_http/{domain}", post(custom_http))
        .route("/auth_request", any(auth_request))
        .route("/auth_request/{domain}", any(auth_request))
        .route("/auth_request/{domain}/{user}", any(auth_request))
        .with_state(checker)
}

/// One debug line per request: method, path (never the query, which may hold a password),
/// status and time.
async fn access_log(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    debug!(
        %method,
        path = %path,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "http front request"
    );
    response
}

/// `user`, `server` and `pass` of the MongooseIM / ejabberd-contrib / Prosody contracts.
#[derive(Deserialize)]
struct Params {
    user: String,
    server: String,
    #[serde(default)]
    pass: Option<Secret>,
}

async fn check_password(
    State(checker): State<Arc<Checker>>,
    params: Result<Form<Params>, FormRejection>,
) -> Response {
    let Ok(Form(params)) = params else {
        return bad_request("want user, server and pass, as a query or a form body");
    };
    let Some(password) = params.pass else {
        return bad_request("want user, server and pass, as a query or a form body");
    };
    let command = Command::Auth {
        user: params.user,
        server: params.server,
        password,
    };
    true_or_false(checker.answer(&command).await)
}

async fn user_exists(
    State(checker): State<Arc<Checker>>,
    params: Result<Form<Params>, FormRejection>,
) -> Response {
    let Ok(Form(params)) = params else {
        return bad_request("want user and server, as a query or a form body");
    };
    let command = Command::IsUser {
        user: params.user,
        server: params.server,
    };
    true_or_false(checker.answer(&command).await)
}

async fn not_allowed() -> Response {
    (
        StatusCode::FORBIDDEN,
        "accounts are managed by the OAuth provider\n",
    )
        .into_response()
}

/// `mod_auth_custom_http`'s body. Its content type is not checked: LuaSocket's simple
/// `http.request(url, body)` labels it a form.
#[derive(Deserialize)]
struct CustomHttp {
    username: String,
    password: Secret,
}

async fn custom_http(
    State(checker): State<Arc<Checker>>,
    Path(domain): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    // Parsed by hand so a parse error (which could quote the token) is never echoed.
    let Ok(body) = serde_json::from_slice::<CustomHttp>(&body) else {
        return bad_request("want {\"username\": ..., \"password\": ...}");
    };
    let command = Command::Auth {
        user: body.username,
        server: domain,
        password: body.password,
    };
    true_or_false(checker.answer(&command).await)
}

/// User and domain of `/auth_request`, from the path when it names them.
#[derive(Deserialize)]
struct AuthPath {
    domain: Option<String>,
    user: Option<String>,
}

async fn auth_request(
    State(checker): State<Arc<Checker>>,
    path: Option<Path<AuthPath>>,
    headers: HeaderMap,
) -> Response {
    let path = path.map_or(
        AuthPath {
            domain: None,
            user: None,
        },
        |Path(p)| p,
    );
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (Some(user), Some(domain)) = (
        path.user.or_else(|| header(USER_HEADER)),
        path.domain.or_else(|| header(DOMAIN_HEADER)),
    ) else {
        return bad_request(
            "name the user and domain in the path or in X-Extauth-User and X-Extauth-Domain",
        );
    };
    let Some(token) = bearer(&headers) else {
        return unauthorized(Reason::Malformed, false);
    };
    let jid = format!("{user}@{domain}");
    let command = Command::Auth {
        user: user.clone(),
        server: domain,
        password: token,
    };
    let outcome = checker.answer(&command).await;
    match outcome.reason {
        _ if outcome.ok => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let headers = response.headers_mut();
            // Both came in as header values or path segments, so they are valid header values.
            if let (Ok(user), Ok(jid)) = (HeaderValue::from_str(&user), HeaderValue::from_str(&jid))
            {
                headers.insert(USER_HEADER, user);
                headers.insert(JID_HEADER, jid);
            }
            headers.insert(
                REASON_HEADER,
                HeaderValue::from_static(outcome.reason.as_str()),
            );
            response
        }
        Reason::UnknownDomain => with_reason(StatusCode::FORBIDDEN, outcome.reason),
        Reason::UpstreamUnavailable | Reason::DeadlineExceeded => {
            with_reason(StatusCode::SERVICE_UNAVAILABLE, outcome.reason)
        }
        reason => unauthorized(reason, true),
    }
}

/// The token of `Authorization: Bearer` (RFC 6750 section 2.1).
fn bearer(headers: &HeaderMap) -> Option<Secret> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| Secret::new(token.to_owned()))
}

impl Checker {
    async fn answer(&self, command: &Command) -> Outcome {
        self.engine
            .answer(command, self.deadline, Front::Http)
            .await
    }
}

fn true_or_false(outcome: Outcome) -> Response {
    let body = if outcome.ok { "true" } else { "false" };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain"),
            (
                header::HeaderName::from_static(REASON_HEADER),
                outcome.reason.as_str(),
            ),
        ],
        body,
    )
        .into_response()
}

fn with_reason(status: StatusCode, reason: Reason) -> Response {
    (status, [(REASON_HEADER, reason.as_str())]).into_response()
}

/// 401 with the RFC 6750 section 3 challenge: `invalid_token` when a token was presented and
/// refused, a bare `Bearer` when none was.
fn unauthorized(reason: Reason, token_presented: bool) -> Response {
    let challenge = match token_presented {
        true => "Bearer error=\"invalid_token\"",
        false => "Bearer",
    };
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE.as_str(), challenge),
            (REASON_HEADER, reason.as_str()),
        ],
    )
        .into_response()
}

fn bad_request(message: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}
