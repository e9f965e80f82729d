//! Real identity providers on loopback: django-oauth-toolkit 3.4 on Django 5.2
//! (`tests/idp/dot/`) and panva/oidc-provider 8.8 (`tests/idp/oidc/`), each a child process on
//! a free 127.0.0.1 port with its files in a temp dir, killed on drop.
//!
//! ```ignore
//! if !Dot::available() { return; }
//! let dot = Dot::start(DotOptions::default());
//! let token = dot.user_token(idp::user("alice"));
//! assert_eq!(dot.introspect(&token).json()["username"], "alice");
//! ```
//!
//! Facts these providers show are in docs/providers.md and checked by
//! `tests/e2e/idp_providers.rs`. Accounts come from `tests/idp/accounts.json` ([`accounts`],
//! [`user`]), which both providers read too.
//!
//! Needs (`tests/run` installs them): a python with django, django-oauth-toolkit and
//! cryptography (env `EXTAUTH_IDP_PYTHON`, default `/opt/extauth-venv/bin/python`); node 18+
//! (env `EXTAUTH_IDP_NODE`, default `node` on PATH) with `npm ci` done in `tests/idp/oidc/`.
//! When something is missing, [`Dot::available`] and [`Oidc::available`] print a loud SKIPPED
//! block and return false, or panic when `EXTAUTH_REQUIRE_IDP=1`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::prelude::{Engine as _, BASE64_URL_SAFE_NO_PAD};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;

use super::services::{free_port, skip_or_require};

/// How long a provider may take to answer after it is spawned (python imports and system
/// checks take about 1 s, node about 0.3 s; the bound is for a loaded 2-core machine).
const START_LIMIT: Duration = Duration::from_secs(60);
/// Bound of one HTTP call to a provider (a DOT password grant with Django's stock hasher checks
/// two PBKDF2 hashes, about 0.4 s each).
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one helper script run (fixture: migrations and users, a few seconds).
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);
/// The environment variable that turns a skip into a failure (CI and `tests/run` set it).
const REQUIRE_ENV: &str = "EXTAUTH_REQUIRE_IDP";

/// `tests/idp/` in the source tree.
fn idp_dir() -> PathBuf {
    super::services::repo_root().join("tests/idp")
}

// ---------------------------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------------------------

/// One account of `tests/idp/accounts.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Account {
    /// An ASCII handle for tests (`alice`, `fullwidth_alice`, ...).
    pub key: String,
    /// The provider's account name: Django username, oidc-provider account id (= `sub`).
    pub username: String,
    /// What the account is for (for a look-alike: how folding could turn it into a real name).
    pub why: String,
}

/// Every account both providers create, in file order.
pub fn accounts() -> &'static [Account] {
    #[derive(Deserialize)]
    struct AccountsFile {
        accounts: Vec<Account>,
    }
    static ACCOUNTS: OnceLock<Vec<Account>> = OnceLock::new();
    ACCOUNTS.get_or_init(|| {
        let text = include_str!("../../idp/accounts.json");
        let file: AccountsFile = serde_json::from_str(text).expect("tests/idp/accounts.json");
        file.accounts
    })
}

/// The username of the account whose key is `key` (e.g. `user("fullwidth_alice")` is
/// `ａｌｉｃｅ`). Panics on an unknown key.
pub fn user(key: &str) -> &'static str {
    accounts()
        .iter()
        .find(|a| a.key == key)
        .map(|a| a.username.as_str())
        .unwrap_or_else(|| panic!("no account with key {key:?} in tests/idp/accounts.json"))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// OAuth client credentials registered at a provider.
#[derive(Debug, Clone, Deserialize)]
pub struct OAuthClient {
    /// The registered client id (sent as the HTTP Basic user name).
    pub client_id: String,
    /// The client secret in clear (generated per instance; the provider may store it hashed).
    pub client_secret: String,
}

/// A provider's answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body as text (empty for none).
    pub body: String,
    /// The `WWW-Authenticate` header, if any (RFC 6750 challenges).
    pub www_authenticate: Option<String>,
    /// The `Location` header, if any (redirects are not followed).
    pub location: Option<String>,
}

impl Answer {
    /// The body as JSON; panics (showing status and body) when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status, self.body
            )
        })
    }
}

/// A blocking HTTP client for tests: reqwest on its own small runtime, redirects not followed
/// (like the broker), every call bounded by `HTTP_TIMEOUT`.
pub struct Http {
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Http {
    fn new() -> Http {
        // reqwest is built with `rustls-no-provider`; the broker installs ring at start-up too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the test HTTP client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test HTTP runtime");
        Http { client, rt }
    }

    /// Sends `request`; a transport error is `Err` with reqwest's message (which names the URL,
    /// never a body or header).
    fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, String> {
        self.rt.block_on(async {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let status = response.status().as_u16();
            let www_authenticate = header(reqwest::header::WWW_AUTHENTICATE);
            let location = header(reqwest::header::LOCATION);
            let body = response.text().await.map_err(|e| e.to_string())?;
            Ok(Answer {
                status,
                body,
                www_authenticate,
                location,
            })
        })
    }

    /// `GET url`, with `Authorization: Bearer <bearer>` when given. Panics on a transport error.
    pub fn get(&self, url: &str, bearer: Option<&str>) -> Answer {
        let mut request = self.client.get(url);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        self.send(request)
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `POST url` with a form body, authenticated as `client` with HTTP Basic when given
    /// (`client_secret_basic`). Panics on a transport error.
    pub fn post_form(
        &self,
        url: &str,
        client: Option<&OAuthClient>,
        form: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.client.post(url).form(form);
        if let Some(c) = client {
            request = request.basic_auth(&c.client_id, Some(&c.client_secret));
        }
        self.send(request)
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }
}

/// The header and claims of a JWT, decoded but NOT verified (tests look at what a provider
/// put in; verification is the broker's job).
pub fn jwt_parts(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut decode = |what| {
        let part = parts
            .next()
            .unwrap_or_else(|| panic!("JWT without a {what}"));
        let bytes = BASE64_URL_SAFE_NO_PAD
            .decode(part)
            .unwrap_or_else(|e| panic!("JWT {what} is not base64url: {e}"));
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|e| panic!("JWT {what} is not JSON: {e}"))
    };
    (decode("header"), decode("payload"))
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A provider server process whose stdout and stderr go to a log file; killed on drop.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Spawns `cmd` with its output appended to `log`.
    fn spawn(cmd: &mut Command, log: &Path) -> Server {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let err = out.try_clone().expect("log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Server {
            child,
            log: log.to_owned(),
        }
    }

    /// Waits until `ready` holds; panics with the log if the process exits or
    /// [`START_LIMIT`] passes first.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            if let Some(status) = self.child.try_wait().expect("polling the provider") {
                panic!("{what} exited ({status}) before answering:\n{}", self.log());
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "{what} did not answer within {START_LIMIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a helper script to completion with `stdin` as its input and returns its stdout; panics
/// with its stderr (never its stdout, which carries secrets) when it fails or runs longer than
/// [`SCRIPT_LIMIT`]. Output goes to unnamed temp files, so a chatty script cannot block on a
/// full pipe while it is waited for.
fn run_script(cmd: &mut Command, stdin: &str) -> String {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out.try_clone().expect("temp file handle"))
        .stderr(err.try_clone().expect("temp file handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.as_bytes())
        .expect("writing the script's stdin");
    drop(input);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling the script") {
            break Some(status);
        }
        if start.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |file: &mut File| {
        let mut text = String::new();
        file.seek(SeekFrom::Start(0))
            .expect("rewinding a temp file");
        file.read_to_string(&mut text)
            .expect("script output is UTF-8");
        text
    };
    match status {
        Some(s) if s.success() => read(&mut out),
        Some(s) => panic!("{cmd:?} failed ({s}):\n{}", read(&mut err)),
        None => panic!(
            "{cmd:?} ran longer than {SCRIPT_LIMIT:?}:\n{}",
            read(&mut err)
        ),
    }
}

/// A fresh private temp dir named after `what`.
fn private_dir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("extauth-{what}-"))
        .tempdir()
        .expect("temp dir")
}

// ---------------------------------------------------------------------------------------------
// django-oauth-toolkit
// ---------------------------------------------------------------------------------------------

/// The python that runs `tests/idp/dot` (env `EXTAUTH_IDP_PYTHON`, default the venv that
/// `tests/run` makes).
pub fn dot_python() -> PathBuf {
    std::env::var_os("EXTAUTH_IDP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/extauth-venv/bin/python"))
}

/// How a [`Dot`] instance is configured (environment of `tests/idp/dot/idpsite/settings.py`).
#[derive(Debug, Clone)]
pub struct DotOptions {
    /// `ACCESS_TOKEN_EXPIRE_SECONDS` (s).
    pub access_token_seconds: u64,
    /// Django `USE_TZ`. `false` with a non-UTC [`DotOptions::time_zone`] makes introspection's
    /// `exp` wrong by the zone's offset (naive local time read as UTC).
    pub use_tz: bool,
    /// Django `TIME_ZONE` (an IANA name).
    pub time_zone: String,
    /// Django's stock password hasher (PBKDF2, about 0.4 s per check, so every introspection
    /// and password grant costs that) instead of MD5. Off by default to keep tests fast; the
    /// OAuth behaviour is the same.
    pub stock_password_hashing: bool,
}

impl Default for DotOptions {
    fn default() -> Self {
        DotOptions {
            access_token_seconds: 3600,
            use_tz: true,
            time_zone: "UTC".to_string(),
            stock_password_hashing: false,
        }
    }
}

/// What `manage.py fixture --json` prints.
#[derive(Debug, Deserialize)]
struct DotFixture {
    /// username -> password
    users: HashMap<String, String>,
    clients: DotClients,
}

#[derive(Debug, Deserialize)]
struct DotClients {
    /// Confidential; the broker's introspection credentials.
    broker: OAuthClient,
    /// Confidential, password grant: mints user tokens.
    minter: OAuthClient,
    /// Confidential, client credentials, client_id `bob`.
    machine: OAuthClient,
}

/// A running django-oauth-toolkit site (`manage.py runserver 127.0.0.1:PORT --noreload`) with
/// the fixture's users and applications.
pub struct Dot {
    // Declared first so the server stops before its directory goes.
    server: Server,
    base: String,
    fixture: DotFixture,
    http: Http,
    dir: TempDir,
}

impl Dot {
    /// Whether DOT can run here: the venv python imports django, oauth2_provider and
    /// cryptography. Otherwise prints SKIPPED and returns false, or panics when
    /// `EXTAUTH_REQUIRE_IDP=1`.
    pub fn available() -> bool {
        static MISSING: OnceLock<Vec<String>> = OnceLock::new();
        let missing = MISSING.get_or_init(|| {
            let python = dot_python();
            let imports = Command::new(&python)
                .args(["-c", "import django, oauth2_provider, cryptography"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match imports {
                Ok(s) if s.success() => Vec::new(),
                _ => vec![format!(
                    "django, django-oauth-toolkit and cryptography in {} (set EXTAUTH_IDP_PYTHON)",
                    python.display()
                )],
            }
        });
        skip_or_require(
            REQUIRE_ENV,
            "A test against a real django-oauth-toolkit",
            missing,
        )
    }

    /// Migrates a fresh SQLite database, creates the fixture, starts the server and waits until
    /// its discovery document answers. Panics with the server log on failure.
    pub fn start(opts: DotOptions) -> Dot {
        let dir = private_dir("dot");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut fixture_cmd = Self::command(&dir, &opts);
        let fixture = run_script(fixture_cmd.args(["manage.py", "fixture", "--json"]), "");
        let fixture: DotFixture =
            serde_json::from_str(&fixture).expect("manage.py fixture --json printed no JSON");
        let mut server = Server::spawn(
            Self::command(&dir, &opts).args([
                "manage.py",
                "runserver",
                &format!("127.0.0.1:{port}"),
                "--noreload",
            ]),
            &dir.path().join("server.log"),
        );
        let http = Http::new();
        let discovery = format!("{base}/o/.well-known/openid-configuration");
        server.wait_ready("django-oauth-toolkit", || {
            http.send(http.client.get(&discovery))
                .is_ok_and(|a| a.status == 200)
        });
        Dot {
            server,
            base,
            fixture,
            http,
            dir,
        }
    }

    /// `python manage.py ...` in `tests/idp/dot` with the instance's environment.
    fn command(dir: &TempDir, opts: &DotOptions) -> Command {
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut cmd = Command::new(dot_python());
        cmd.current_dir(idp_dir().join("dot"))
            .env("IDP_DATA_DIR", dir.path())
            .env(
                "IDP_ACCESS_TOKEN_SECONDS",
                opts.access_token_seconds.to_string(),
            )
            .env("IDP_USE_TZ", flag(opts.use_tz))
            .env("IDP_TIME_ZONE", &opts.time_zone)
            .env("IDP_FAST_HASHING", flag(!opts.stock_password_hashing))
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1");
        cmd
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }
    /// The issuer DOT reports in discovery and ID tokens: `<base>/o`.
    pub fn issuer(&self) -> String {
        format!("{}/o", self.base)
    }
    /// `<base>/o/.well-known/openid-configuration` (lists no introspection endpoint).
    pub fn discovery_url(&self) -> String {
        format!("{}/o/.well-known/openid-configuration", self.base)
    }
    /// `<base>/o/token/` (the trailing slash is required).
    pub fn token_url(&self) -> String {
        format!("{}/o/token/", self.base)
    }
    /// `<base>/o/introspect/` (RFC 7662).
    pub fn introspection_url(&self) -> String {
        format!("{}/o/introspect/", self.base)
    }
    /// `<base>/o/revoke_token/` (RFC 7009).
    pub fn revocation_url(&self) -> String {
        format!("{}/o/revoke_token/", self.base)
    }
    /// `<base>/o/userinfo/`.
    pub fn userinfo_url(&self) -> String {
        format!("{}/o/userinfo/", self.base)
    }
    /// `<base>/o/.well-known/jwks.json` (the RS256 key of ID tokens).
    pub fn jwks_url(&self) -> String {
        format!("{}/o/.well-known/jwks.json", self.base)
    }
    /// The site's API as a broker `kind = "http"` URL template: `<base>/api/xmpp/check/{user}`.
    pub fn check_url_template(&self) -> String {
        format!("{}/api/xmpp/check/{{user}}", self.base)
    }
    /// The site's API URL for `user` (percent-encoded).
    pub fn check_url(&self, user: &str) -> String {
        format!(
            "{}/api/xmpp/check/{}",
            self.base,
            utf8_percent_encode(user, NON_ALPHANUMERIC)
        )
    }

    /// The confidential client the broker introspects with.
    pub fn broker_client(&self) -> &OAuthClient {
        &self.fixture.clients.broker
    }
    /// The client-credentials application, client_id `bob`.
    pub fn machine_client(&self) -> &OAuthClient {
        &self.fixture.clients.machine
    }
    /// The password-grant application that mints user tokens.
    pub fn minter_client(&self) -> &OAuthClient {
        &self.fixture.clients.minter
    }
    /// The fixture's password of `user`.
    pub fn password(&self, user: &str) -> &str {
        self.fixture
            .users
            .get(user)
            .unwrap_or_else(|| panic!("no DOT fixture user {user:?}"))
    }
    /// The HTTP client, for requests the helpers below do not cover.
    pub fn http(&self) -> &Http {
        &self.http
    }
    /// The instance's directory (SQLite database, keys, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// Everything the server logged so far (request lines; no tokens).
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// The token endpoint's answer to a password grant for `user`/`password` with `scope`.
    pub fn password_grant(&self, user: &str, password: &str, scope: &str) -> Answer {
        let form = [
            ("grant_type", "password"),
            ("username", user),
            ("password", password),
            ("scope", scope),
        ];
        self.http
            .post_form(&self.token_url(), Some(self.minter_client()), &form)
    }

    /// An access token of `user` (password grant, scope `openid profile read`: introspectable,
    /// and accepted by userinfo). Panics when the grant fails.
    pub fn password_token(&self, user: &str, password: &str) -> String {
        let answer = self.password_grant(user, password, "openid profile read");
        access_token(&answer, "DOT password grant")
    }

    /// [`Dot::password_token`] with the fixture's password of `user`.
    pub fn user_token(&self, user: &str) -> String {
        self.password_token(user, self.password(user))
    }

    /// A client-credentials token of the application `bob` (a token of no user).
    pub fn client_credentials_token(&self) -> String {
        let form = [("grant_type", "client_credentials")];
        let answer = self
            .http
            .post_form(&self.token_url(), Some(self.machine_client()), &form);
        access_token(&answer, "DOT client credentials grant")
    }

    /// RFC 7662 introspection of `token` as the broker.
    pub fn introspect(&self, token: &str) -> Answer {
        self.introspect_as(self.broker_client(), token)
    }

    /// RFC 7662 introspection of `token` as `client`.
    pub fn introspect_as(&self, client: &OAuthClient, token: &str) -> Answer {
        self.http
            .post_form(&self.introspection_url(), Some(client), &[("token", token)])
    }

    /// Userinfo with `token` as the bearer.
    pub fn userinfo(&self, token: &str) -> Answer {
        self.http.get(&self.userinfo_url(), Some(token))
    }

    /// The site's API: is `token` valid, and `user`'s?
    pub fn check(&self, user: &str, token: &str) -> Answer {
        self.http.get(&self.check_url(user), Some(token))
    }

    /// Revokes `token` (RFC 7009). DOT answers 200 but revokes nothing unless the caller is
    /// the client the token was issued to, so introspection tells which one first. Panics when
    /// the token is not active or revocation fails.
    pub fn revoke(&self, token: &str) {
        let issued_to = self.introspect(token).json()["client_id"].clone();
        let clients = &self.fixture.clients;
        let owner = [&clients.minter, &clients.machine, &clients.broker]
            .into_iter()
            .find(|c| issued_to == c.client_id.as_str())
            .unwrap_or_else(|| {
                panic!("revoke: token not active or of an unknown client ({issued_to})")
            });
        let answer = self
            .http
            .post_form(&self.revocation_url(), Some(owner), &[("token", token)]);
        assert_eq!(answer.status, 200, "DOT revocation: {}", answer.body);
    }
}

/// The `access_token` of a successful token endpoint answer; panics with the status and the
/// OAuth error otherwise (never the body of a success, which holds tokens).
fn access_token(answer: &Answer, what: &str) -> String {
    assert_eq!(answer.status, 200, "{what} failed: {}", answer.body);
    answer.json()["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no access_token in the answer"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// panva/oidc-provider
// ---------------------------------------------------------------------------------------------

/// The node that runs `tests/idp/oidc` (env `EXTAUTH_IDP_NODE`, default `node` on PATH).
pub fn node() -> PathBuf {
    std::env::var_os("EXTAUTH_IDP_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("node"))
}

/// The oidc-provider version `tests/idp/oidc/package.json` pins.
pub const OIDC_PROVIDER_VERSION: &str = "8.8.1";

/// How an [`Oidc`] instance is configured (`node config.mjs new`).
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Lifetime of access tokens, opaque and JWT (s).
    pub access_token_ttl_s: u64,
    /// The resource indicator (RFC 8707) that gets JWT access tokens with `aud` = it.
    pub resource: String,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            access_token_ttl_s: 3600,
            resource: "urn:xmpp".to_string(),
        }
    }
}

/// The parts of the instance configuration (`tests/idp/oidc/config.mjs`) tests use.
#[derive(Debug, Deserialize)]
struct OidcConfig {
    issuer: String,
    port: u16,
    resource: String,
    jwks: JwkSet,
    clients: OidcClients,
}

#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct OidcClients {
    /// client_secret_basic; the broker's introspection credentials.
    broker: OAuthClient,
    /// authorization_code + refresh_token: the user-facing application.
    app: OAuthClient,
    /// client_credentials, client_id `bob`.
    machine: OAuthClient,
}

/// The tokens of one scripted authorization code flow (`node mint.mjs CONFIG user ACCOUNT`).
#[derive(Debug, Clone, Deserialize)]
pub struct UserTokens {
    /// Opaque access token for the userinfo endpoint (no resource); introspectable.
    pub opaque: String,
    /// JWT access token for the resource (`typ: at+jwt`, `aud` = the resource); introspects
    /// as inactive at this provider and cannot be revoked there.
    pub jwt: String,
    /// The ID token (`aud` = the app's client id): not an access token.
    pub id_token: String,
    /// The refresh token of the app client (lost when the provider restarts).
    pub refresh_token: String,
}

/// A running panva/oidc-provider (`node provider.mjs CONFIG`).
pub struct Oidc {
    // Declared first so the server stops before its directory goes.
    server: Option<Server>,
    config: OidcConfig,
    config_path: PathBuf,
    http: Http,
    dir: TempDir,
}

impl Oidc {
    /// Whether oidc-provider can run here: node runs, and `npm ci` was done in
    /// `tests/idp/oidc` with the pinned version. Otherwise prints SKIPPED and returns false, or
    /// panics when `EXTAUTH_REQUIRE_IDP=1`.
    pub fn available() -> bool {
        static MISSING: OnceLock<Vec<String>> = OnceLock::new();
        let missing = MISSING.get_or_init(|| {
            let mut missing = Vec::new();
            let node_runs = Command::new(node())
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !node_runs {
                missing.push(format!("node ({}; set EXTAUTH_IDP_NODE)", node().display()));
            }
            let package = idp_dir().join("oidc/node_modules/oidc-provider/package.json");
            let version = std::fs::read_to_string(&package)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["version"].as_str().map(str::to_owned));
            if version.as_deref() != Some(OIDC_PROVIDER_VERSION) {
                missing.push(format!(
                    "oidc-provider {OIDC_PROVIDER_VERSION} in {} (npm ci there; found {version:?})",
                    package.display()
                ));
            }
            missing
        });
        skip_or_require(
            REQUIRE_ENV,
            "A test against a real panva/oidc-provider",
            missing,
        )
    }

    /// Writes a fresh configuration (new key, new client secrets), starts the provider and
    /// waits until its discovery document answers.
    pub fn start(opts: OidcOptions) -> Oidc {
        let dir = private_dir("oidc");
        let config_path = dir.path().join("config.json");
        let port = free_port().to_string();
        let ttl = opts.access_token_ttl_s.to_string();
        let path = config_path.to_str().expect("UTF-8 temp path");
        let args = [
            "new",
            path,
            "--port",
            &port,
            "--access-token-ttl",
            &ttl,
            "--resource",
            &opts.resource,
        ];
        script("config.mjs", &args, "");
        let mut oidc = Oidc {
            server: None,
            config: read_oidc_config(&config_path),
            config_path,
            http: Http::new(),
            dir,
        };
        oidc.launch();
        oidc
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(node());
        cmd.current_dir(idp_dir().join("oidc"))
            .arg("provider.mjs")
            .arg(&self.config_path);
        let mut server = Server::spawn(&mut cmd, &self.dir.path().join("provider.log"));
        let discovery = self.discovery_url();
        let http = &self.http;
        server.wait_ready("oidc-provider", || {
            http.send(http.client.get(&discovery))
                .is_ok_and(|a| a.status == 200)
        });
        self.server = Some(server);
    }

    /// Stops the provider, puts a new signing key (new `kid`) first in its key set, and starts
    /// it again on the same port. With `keep_old` the previous keys stay in the JWKS (a
    /// graceful rotation); without, they vanish (tokens they signed no longer verify). The
    /// in-memory store is lost: opaque tokens and refresh tokens issued before are unknown.
    pub fn restart_with_new_key(&mut self, keep_old: bool) {
        drop(self.server.take());
        let path = self.config_path.to_str().expect("UTF-8 temp path");
        let mut args = vec!["rotate-key", path];
        if keep_old {
            args.push("--keep-old");
        }
        script("config.mjs", &args, "");
        self.config = read_oidc_config(&self.config_path);
        self.launch();
    }

    /// The `kid` tokens are signed with now (the first key of the set).
    pub fn signing_kid(&self) -> String {
        self.config.jwks.keys[0]["kid"]
            .as_str()
            .expect("kid")
            .to_owned()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash): `iss` of every token.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }
    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.config.port
    }
    /// `<issuer>/.well-known/openid-configuration` (lists every endpoint).
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.config.issuer)
    }
    /// `<issuer>/jwks`.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.config.issuer)
    }
    /// `<issuer>/token`.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.config.issuer)
    }
    /// `<issuer>/token/introspection` (RFC 7662).
    pub fn introspection_url(&self) -> String {
        format!("{}/token/introspection", self.config.issuer)
    }
    /// `<issuer>/token/revocation` (RFC 7009).
    pub fn revocation_url(&self) -> String {
        format!("{}/token/revocation", self.config.issuer)
    }
    /// `<issuer>/me`.
    pub fn userinfo_url(&self) -> String {
        format!("{}/me", self.config.issuer)
    }
    /// The resource indicator whose access tokens are JWTs (`aud` = it).
    pub fn resource(&self) -> &str {
        &self.config.resource
    }
    /// The confidential client the broker introspects with (client_secret_basic).
    pub fn broker_client(&self) -> &OAuthClient {
        &self.config.clients.broker
    }
    /// The user-facing client (authorization code + refresh): `aud` of ID tokens.
    pub fn app_client(&self) -> &OAuthClient {
        &self.config.clients.app
    }
    /// The client-credentials client, client_id `bob`.
    pub fn machine_client(&self) -> &OAuthClient {
        &self.config.clients.machine
    }
    /// The HTTP client, for requests the helpers below do not cover.
    pub fn http(&self) -> &Http {
        &self.http
    }
    /// Everything the provider logged so far (warnings and server errors; no tokens).
    pub fn log(&self) -> String {
        self.server.as_ref().map(Server::log).unwrap_or_default()
    }

    /// The tokens of `account` from a scripted authorization code flow (login and consent
    /// through devInteractions, then a refresh for the resource). Panics with the failing step
    /// (an unknown account fails at the login step with HTTP 500: devInteractions does not
    /// check that the account exists).
    pub fn user_tokens(&self, account: &str) -> UserTokens {
        let out = self.mint(&["user", account], "");
        serde_json::from_str(&out).expect("mint.mjs user printed no tokens")
    }

    /// A client-credentials access token of client `bob`: opaque without `resource`, a JWT
    /// with `sub` = `bob` and `aud` = the resource with one.
    pub fn client_credentials(&self, resource: Option<&str>) -> String {
        let mut args = vec!["client-credentials"];
        args.extend(resource);
        let out = self.mint(&args, "");
        let answer: Value = serde_json::from_str(&out).expect("mint.mjs printed no JSON");
        answer["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// Revokes an opaque `token` as the client it was issued to (the provider refuses another
    /// client's). Panics when it is not active (JWT access tokens cannot be revoked here).
    pub fn revoke(&self, token: &str) {
        self.mint(&["revoke"], token);
    }

    /// RFC 7662 introspection of `token` as the broker.
    pub fn introspect(&self, token: &str) -> Answer {
        self.introspect_as(self.broker_client(), token)
    }

    /// RFC 7662 introspection of `token` as `client`.
    pub fn introspect_as(&self, client: &OAuthClient, token: &str) -> Answer {
        self.http
            .post_form(&self.introspection_url(), Some(client), &[("token", token)])
    }

    /// Userinfo with `token` as the bearer.
    pub fn userinfo(&self, token: &str) -> Answer {
        self.http.get(&self.userinfo_url(), Some(token))
    }

    /// `node mint.mjs CONFIG args...` with `stdin` (tokens never go on a command line).
    fn mint(&self, args: &[&str], stdin: &str) -> String {
        let path = self.config_path.to_str().expect("UTF-8 temp path");
        let mut all = vec![path];
        all.extend_from_slice(args);
        script("mint.mjs", &all, stdin)
    }
}

/// Runs `node tests/idp/oidc/<name> args...` with `stdin`; returns its stdout.
fn script(name: &str, args: &[&str], stdin: &str) -> String {
    let mut cmd = Command::new(node());
    cmd.current_dir(idp_dir().join("oidc")).arg(name).args(args);
    run_script(&mut cmd, stdin)
}

fn read_oidc_config(path: &Path) -> OidcConfig {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("oidc config.json")
}
