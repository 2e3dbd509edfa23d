//! The harness: spawns the real `chorus` binary on port 0 with a temporary data dir, captures its
//! logs, and offers typed helpers over reqwest.
//!
//! Every test gets its own server process and data dir, so tests run in parallel and never share
//! state. Server logs are kept in memory (tests assert on them) and echoed to the test's stderr
//! only when `TEST_LOG` is set.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_actors::store::{
    Message, MessageRole, MessageStatus, SqliteStore, Store, Summary, Usage,
};
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use uuid::Uuid;

/// The HS256 secret every test server signs with, so tests can forge and tamper tokens.
pub const TEST_JWT_SECRET: &str = "chorus-e2e-test-secret-0123456789-abcdefghij";
/// The issuer the server sets and checks (config default).
pub const TEST_ISSUER: &str = "chorus";
/// The key id the server writes into its tokens (config default).
pub const TEST_KID: &str = "k1";
/// Tiers for tests that send many messages quickly and are not about limits: one default tier
/// `free` with every model and per-minute limits no test reaches.
pub const ROOMY_TIERS: &str = r#"
default_tier = "free"

[tiers.free]
name = "Free"
requests_per_minute = 100000
tokens_per_minute = 1000000000
models = ["*"]
files_per_request = 3
upload_max_bytes = 10485760
"#;

/// A password that passes validation; tests that need to find it in logs use their own.
pub const PASSWORD: &str = "correct-horse-battery-staple";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(45);

/// Environment the harness never lets through from the test process to the server, so a
/// developer's shell cannot change what a test sees.
fn is_scrubbed_var(name: &str) -> bool {
    name.starts_with("CHORUS")
        || name == "RUST_LOG"
        || name.starts_with("OTEL_")
        || name.ends_with("_API_KEY")
        || name.ends_with("_BASE_URL")
}

/// A `Command` for the real binary with a clean environment (inherited `CHORUS*`, `RUST_LOG`,
/// provider keys removed).
pub fn chorus_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_none_or(is_scrubbed_var) {
            command.env_remove(&name);
        }
    }
    command.env("OTEL_SDK_DISABLED", "true");
    command
}

/// Unique email for a test.
pub fn unique_email() -> String {
    format!("user-{}@example.com", Uuid::new_v4().simple())
}

fn test_log_enabled() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// Lines read from one of the child's pipes, shared with a reader thread.
#[derive(Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
}

/// Reads `pipe` line by line into `lines` until EOF; sets `eof` then.
fn drain<R: Read + Send + 'static>(
    pipe: R,
    lines: Lines,
    eof: Arc<AtomicBool>,
    label: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let reader = BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if test_log_enabled() {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("[chorus {label}] {line}");
                }
            }
            lines.push(line);
        }
        eof.store(true, Ordering::SeqCst);
    })
}

/// The address from a `"message":"listening"` JSON log line.
fn listening_addr(line: &str) -> Option<String> {
    let value: Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| {
        value
            .get(name)
            .or_else(|| value.get("fields").and_then(|f| f.get(name)))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    (field("message")? == "listening").then(|| field("addr"))?
}

/// A JSON log line, parsed (non-JSON lines are skipped).
pub fn parse_log_line(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

/// The log line's message (top level with flattened events, or under `fields`).
pub fn log_message(line: &Value) -> Option<&str> {
    line.get("message")
        .or_else(|| line.get("fields").and_then(|f| f.get("message")))
        .and_then(Value::as_str)
}

/// The request id a log line carries (as a field, or on its current span).
pub fn log_request_id(line: &Value) -> Option<&str> {
    line.get("request_id")
        .or_else(|| line.get("span").and_then(|s| s.get("request_id")))
        .or_else(|| line.get("fields").and_then(|f| f.get("request_id")))
        .and_then(Value::as_str)
}

struct Running {
    child: Child,
    pid: u32,
    stderr_eof: Arc<AtomicBool>,
    stdout_eof: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

pub struct TestAppBuilder {
    env: Vec<(String, String)>,
    data_dir: Option<Arc<TempDir>>,
    models_toml: Option<String>,
    tiers_toml: Option<String>,
}

impl TestAppBuilder {
    /// An extra environment variable for the server (overrides the harness defaults).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs the server on an existing data dir (e.g. one prepared with the CLI).
    pub fn data_dir(mut self, dir: Arc<TempDir>) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// A model catalogue (models.toml text) written into the data dir and given to the server
    /// with `CHORUS__MODELS_FILE`. See [`catalogue_toml`].
    pub fn models_toml(mut self, text: &str) -> Self {
        self.models_toml = Some(text.to_owned());
        self
    }

    /// A tiers file (tiers.toml text) written into the data dir and given to the server with
    /// `CHORUS__TIERS_FILE`. [`ROOMY_TIERS`] lifts the per-user limits for tests that send
    /// many messages and are not about limits.
    pub fn tiers_toml(mut self, text: &str) -> Self {
        self.tiers_toml = Some(text.to_owned());
        self
    }

    /// Points the OpenAI, Anthropic and Gemini providers at a mock upstream (keys included), and
    /// keeps any HTTP proxy of the environment away from it.
    pub fn upstream(self, upstream: &chorus_mock_upstream::MockUpstream) -> Self {
        let base = upstream.base_url();
        self.env("OPENAI_API_KEY", MOCK_OPENAI_KEY)
            .env("OPENAI_BASE_URL", &format!("{base}/v1"))
            .env("ANTHROPIC_API_KEY", MOCK_ANTHROPIC_KEY)
            .env("ANTHROPIC_BASE_URL", &base)
            .env("GEMINI_API_KEY", MOCK_GEMINI_KEY)
            .env("GEMINI_BASE_URL", &base)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
    }

    pub async fn spawn(self) -> TestApp {
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => Arc::new(tempfile::tempdir().expect("creating a temp data dir")),
        };
        let mut env = self.env;
        if let Some(text) = &self.tiers_toml {
            let path = data_dir.path().join("test-tiers.toml");
            std::fs::write(&path, text).expect("writing the test tiers");
            env.insert(
                0,
                ("CHORUS__TIERS_FILE".to_owned(), path.display().to_string()),
            );
        }
        if let Some(text) = &self.models_toml {
            let path = data_dir.path().join("test-models.toml");
            std::fs::write(&path, text).expect("writing the test catalogue");
            env.insert(
                0,
                ("CHORUS__MODELS_FILE".to_owned(), path.display().to_string()),
            );
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("building the HTTP client");
        let mut app = TestApp {
            base: String::new(),
            addr: String::new(),
            client,
            data_dir,
            env,
            logs: Lines::default(),
            stdout: Lines::default(),
            running: None,
        };
        app.start().await;
        app
    }
}

/// One running `chorus serve` process and an HTTP client for it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub client: reqwest::Client,
    pub data_dir: Arc<TempDir>,
    env: Vec<(String, String)>,
    logs: Lines,
    stdout: Lines,
    running: Option<Running>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::builder().spawn().await
    }

    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            env: Vec::new(),
            data_dir: None,
            models_toml: None,
            tiers_toml: None,
        }
    }

    /// The environment the server is started with: harness defaults, then the test's extras.
    pub fn server_env(data_dir: &Path, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "CHORUS__DATA_DIR".to_owned(),
                data_dir.display().to_string(),
            ),
            ("CHORUS__SERVER__BIND".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "CHORUS__AUTH__JWT_SECRET".to_owned(),
                TEST_JWT_SECRET.to_owned(),
            ),
            ("CHORUS__LOG__LEVEL".to_owned(), "info".to_owned()),
            ("CHORUS__LOG__FORMAT".to_owned(), "json".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    }

    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "server already running");
        let mut command = chorus_command();
        command
            .arg("serve")
            .envs(Self::server_env(self.data_dir.path(), &self.env))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawning the chorus binary");
        let pid = child.id();
        let stderr_eof = Arc::new(AtomicBool::new(false));
        let stdout_eof = Arc::new(AtomicBool::new(false));
        let first_log_line = self.logs.snapshot().len();
        let readers = vec![
            drain(
                child.stderr.take().expect("stderr piped"),
                self.logs.clone(),
                stderr_eof.clone(),
                "stderr",
            ),
            drain(
                child.stdout.take().expect("stdout piped"),
                self.stdout.clone(),
                stdout_eof.clone(),
                "stdout",
            ),
        ];
        self.running = Some(Running {
            child,
            pid,
            stderr_eof,
            stdout_eof,
            readers,
        });

        let started = Instant::now();
        let addr = loop {
            let found = self.logs.snapshot()[first_log_line..]
                .iter()
                .find_map(|line| listening_addr(line));
            if let Some(addr) = found {
                break addr;
            }
            let exited = self
                .running
                .as_mut()
                .and_then(|r| r.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                // Let the readers catch the last lines before reporting.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "chorus exited before listening ({status}).\nstderr:\n{}\nstdout:\n{}",
                    self.logs.snapshot().join("\n"),
                    self.stdout.snapshot().join("\n")
                );
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                panic!(
                    "chorus did not log `listening` within {STARTUP_TIMEOUT:?}.\nstderr:\n{}",
                    self.logs.snapshot().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.base = format!("http://{addr}");
        self.addr = addr;
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.path().join("chorus.db")
    }

    /// Sends SIGTERM to the server without waiting.
    pub fn terminate(&self) {
        let pid = self.running.as_ref().expect("server running").pid;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits (bounded) for the process to exit and its pipes to close.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut running = self.running.take().expect("server running");
        let started = Instant::now();
        let exit = loop {
            if let Some(exit) = running.child.try_wait().expect("waiting for chorus") {
                break exit;
            }
            if started.elapsed() > EXIT_TIMEOUT {
                let _ = running.child.kill();
                let _ = running.child.wait();
                panic!(
                    "chorus did not exit within {EXIT_TIMEOUT:?}.\nstderr:\n{}",
                    self.logs.snapshot().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pipes_closed = eventually(Duration::from_secs(10), || {
            running.stderr_eof.load(Ordering::SeqCst) && running.stdout_eof.load(Ordering::SeqCst)
        })
        .await;
        assert!(pipes_closed, "the server's pipes did not close after exit");
        for reader in running.readers.drain(..) {
            let _ = reader.join();
        }
        exit
    }

    /// Sends SIGTERM and waits for the process to exit (and its pipes to close).
    pub async fn stop_gracefully(&mut self) -> ExitStatus {
        self.terminate();
        self.wait_exit().await
    }

    /// Stops gracefully (asserting exit code 0) and starts again on the same data dir.
    pub async fn restart(&mut self) {
        let status = self.stop_gracefully().await;
        assert!(
            status.success(),
            "graceful stop exited with {status}.\nstderr:\n{}",
            self.logs.snapshot().join("\n")
        );
        self.start().await;
    }

    /// Kills the server with SIGKILL (no shutdown code runs: a crash) and starts it again on
    /// the same data dir.
    pub async fn crash_and_restart(&mut self) {
        let pid = self.running.as_ref().expect("server running").pid;
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -KILL failed: {status}");
        self.wait_exit().await;
        self.start().await;
    }

    /// Kills the server with SIGKILL (a crash: no shutdown code runs) and waits for it to exit.
    pub async fn kill(&mut self) -> ExitStatus {
        let pid = self.running.as_ref().expect("server running").pid;
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -KILL failed: {status}");
        self.wait_exit().await
    }

    /// Every stderr line the server wrote so far (across restarts).
    pub fn logs(&self) -> Vec<String> {
        self.logs.snapshot()
    }

    /// Waits (bounded) until some log line satisfies `pred`; returns it.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            if let Some(found) = self
                .logs
                .snapshot()
                .iter()
                .filter_map(|l| parse_log_line(l))
                .find(|l| pred(l))
            {
                return found;
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!(
                    "no matching log line within 10s.\nstderr:\n{}",
                    self.logs.snapshot().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ---- raw HTTP ----

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request builder for any method and path, with nothing set.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Like [`TestApp::request`], on a connection used for this request only.
    pub fn unpooled_request(&self, method: Method, path: &str) -> RequestBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(0)
            .build()
            .expect("building an unpooled HTTP client")
            .request(method, self.url(path))
    }

    fn authed(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let builder = self.request(method, path);
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.authed(Method::GET, path, Some(token))
            .send()
            .await
            .expect("GET failed")
    }

    pub async fn get_anon(&self, path: &str) -> Response {
        self.request(Method::GET, path)
            .send()
            .await
            .expect("GET failed")
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        self.authed(Method::POST, path, token)
            .json(body)
            .send()
            .await
            .expect("POST failed")
    }

    pub async fn patch_json(&self, path: &str, token: &str, body: &Value) -> Response {
        self.authed(Method::PATCH, path, Some(token))
            .json(body)
            .send()
            .await
            .expect("PATCH failed")
    }

    /// `POST /api/v1/threads/{thread}/turns/{turn}/cancel`.
    pub async fn cancel_turn(&self, token: &str, thread: &str, turn: &str) -> Response {
        self.post_json(
            &format!("/api/v1/threads/{thread}/turns/{turn}/cancel"),
            Some(token),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.authed(Method::DELETE, path, Some(token))
            .send()
            .await
            .expect("DELETE failed")
    }

    /// Sends raw bytes with the given content type (or none).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        let mut builder = self.authed(method, path, token).body(body);
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        builder.send().await.expect("request failed")
    }

    // ---- typed helpers ----

    /// Registers and returns the session; asserts 201.
    pub async fn register(&self, email: &str, password: &str) -> Session {
        let response = self
            .post_json(
                "/api/v1/auth/register",
                None,
                &json!({ "email": email, "password": password }),
            )
            .await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::CREATED, "register failed: {body}");
        Session::from_body(email, password, body)
    }

    /// Registers a fresh user with a unique email and [`PASSWORD`].
    pub async fn register_user(&self) -> Session {
        self.register(&unique_email(), PASSWORD).await
    }

    /// Registers a user, makes them an admin in the store (as `chorus user create --admin`
    /// would have), and logs in again so the access token carries the role.
    pub async fn register_admin(&self) -> Session {
        let session = self.register_user().await;
        let store = self.store().await;
        let mut user = store
            .get_user(session.user_uuid())
            .await
            .expect("reading the new user")
            .expect("the new user exists");
        user.role = chorus_actors::store::Role::Admin;
        assert!(store.update_user(&user).await.expect("promoting to admin"));
        let admin = self.login(&session.email, &session.password).await;
        assert_eq!(admin.user["role"], "admin", "{:?}", admin.user);
        admin
    }

    pub async fn login_raw(&self, email: &str, password: &str) -> Response {
        self.post_json(
            "/api/v1/auth/login",
            None,
            &json!({ "email": email, "password": password }),
        )
        .await
    }

    /// Logs in; asserts 200.
    pub async fn login(&self, email: &str, password: &str) -> Session {
        let response = self.login_raw(email, password).await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::OK, "login failed: {body}");
        Session::from_body(email, password, body)
    }

    pub async fn refresh_raw(&self, refresh_token: &str) -> Response {
        self.post_json(
            "/api/v1/auth/refresh",
            None,
            &json!({ "refresh_token": refresh_token }),
        )
        .await
    }

    /// Exchanges a refresh token for a new pair; asserts 200.
    pub async fn refresh(&self, session: &Session) -> Session {
        let response = self.refresh_raw(&session.refresh_token).await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::OK, "refresh failed: {body}");
        Session::from_body(&session.email, &session.password, body)
    }

    /// Creates a thread; asserts 201 and returns the `thread` object.
    pub async fn create_thread(&self, token: &str, body: &Value) -> Value {
        let response = self.post_json("/api/v1/threads", Some(token), body).await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::CREATED, "create thread failed: {body}");
        body["thread"].clone()
    }

    /// GET that must answer 200; returns the body.
    pub async fn get_ok(&self, path: &str, token: &str) -> Value {
        let response = self.get(path, token).await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    pub async fn get_thread(&self, token: &str, id: &str) -> Value {
        self.get_ok(&format!("/api/v1/threads/{id}"), token).await["thread"].clone()
    }

    // ---- direct store access ----

    /// Opens the server's own SQLite file (WAL: both processes can use it).
    pub async fn store(&self) -> SqliteStore {
        let path = self.db_path();
        tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .expect("joining the store open")
            .expect("opening the server's SQLite store")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if started.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tokens and identity from an auth response.
#[derive(Debug, Clone)]
pub struct Session {
    pub email: String,
    pub password: String,
    pub user_id: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
    pub user: Value,
}

impl Session {
    fn from_body(email: &str, password: &str, body: Value) -> Session {
        let text = |key: &str| {
            body[key]
                .as_str()
                .unwrap_or_else(|| panic!("auth response has no string `{key}`: {body}"))
                .to_owned()
        };
        Session {
            email: email.to_owned(),
            password: password.to_owned(),
            user_id: body["user"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("auth response has no user.id: {body}"))
                .to_owned(),
            access_token: text("access_token"),
            refresh_token: text("refresh_token"),
            expires_in: body["expires_in"].as_u64().unwrap_or_default(),
            user: body["user"].clone(),
        }
    }

    pub fn user_uuid(&self) -> Uuid {
        Uuid::parse_str(&self.user_id).expect("user id is a UUID")
    }

    pub fn token(&self) -> &str {
        &self.access_token
    }
}

/// The body as JSON (panics with the text when it is not JSON).
pub async fn body_json(response: Response) -> Value {
    let text = response.text().await.expect("reading the body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
}

/// The `X-Request-Id` header of a response.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .expect("response has an X-Request-Id header")
        .to_str()
        .expect("X-Request-Id is ASCII")
        .to_owned()
}

/// Asserts the error envelope `{"error": {code, message, details, request_id}}` with the given
/// status and code, and that `request_id` equals the `X-Request-Id` header. Returns the `error`
/// object.
pub async fn assert_error(response: Response, status: u16, code: &str) -> Value {
    let got_status = response.status().as_u16();
    let header_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("reading the error body");
    assert_eq!(
        got_status, status,
        "expected {status} {code}, got {got_status}: {text}"
    );
    assert!(
        content_type.starts_with("application/json"),
        "error content type is `{content_type}`: {text}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text:?}"));
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object: {body}"))
        .clone();
    assert_eq!(error["code"], code, "error code: {body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message must be a non-empty string: {body}"
    );
    assert!(
        error.get("details").is_some(),
        "error envelope must have `details` (null allowed): {body}"
    );
    let body_id = error["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("error has no request_id: {body}"));
    let header_id =
        header_id.unwrap_or_else(|| panic!("error response has no X-Request-Id: {body}"));
    assert_eq!(body_id, header_id, "request_id in body and header differ");
    error
}

/// The error message of an envelope returned by [`assert_error`].
pub fn message_of(error: &Value) -> String {
    error["message"].as_str().unwrap_or_default().to_owned()
}

/// Percent-encodes a query-string value.
pub fn encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Asserts a string is an RFC 3339 UTC timestamp.
pub fn assert_rfc3339(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    let parsed = chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("`{text}` is not RFC 3339: {e}"));
    assert_eq!(parsed.offset().local_minus_utc(), 0, "`{text}` is not UTC");
}

// ---- tokens ----

/// Signs `claims` with HS256 and `secret`, with the server's key id.
pub fn sign_token(claims: &Value, secret: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(TEST_KID.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a test token")
}

/// Access-token claims as the server issues them, valid for an hour from now.
pub fn access_claims(user_id: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": user_id,
        "role": "user",
        "tier": "free",
        "iss": TEST_ISSUER,
        "iat": now,
        "exp": now + 3600,
        "typ": "access",
    })
}

/// An unsigned token (`alg: none`).
pub fn unsigned_token(claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json!({ "alg": "none", "typ": "JWT", "kid": TEST_KID });
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

// ---- seeding the store ----

/// Builds a message for `append_message`, created now, with a fresh UUIDv7.
pub fn message(
    user_id: Uuid,
    thread_id: Uuid,
    role: MessageRole,
    model: Option<&str>,
    content: &str,
) -> Message {
    Message {
        user_id,
        thread_id,
        id: Uuid::now_v7(),
        role,
        model: model.map(str::to_owned),
        content: content.to_owned(),
        status: MessageStatus::Complete,
        usage: Usage {
            input_tokens: 3,
            output_tokens: if role == MessageRole::Assistant { 5 } else { 0 },
        },
        cost_usd: 0.0,
        latency_ms: None,
        ttft_ms: None,
        provider: None,
        deployment: None,
        citations: Vec::new(),
        parent_id: None,
        turn_id: None,
        created_at: chrono::Utc::now(),
    }
}

/// Appends `specs` (role, model, content) in order; returns the ids in that order.
pub async fn seed_messages(
    store: &SqliteStore,
    user_id: Uuid,
    thread_id: Uuid,
    specs: &[(MessageRole, Option<&str>, &str)],
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (role, model, content) in specs {
        let message = message(user_id, thread_id, *role, *model, content);
        store
            .append_message(&message)
            .await
            .expect("seeding a message");
        ids.push(message.id);
    }
    ids
}

/// Stores a summary of `thread_id` for `model`.
pub async fn seed_summary(
    store: &SqliteStore,
    user_id: Uuid,
    thread_id: Uuid,
    model: &str,
    text: &str,
    covers_until: Uuid,
) {
    store
        .upsert_summary(&Summary {
            user_id,
            thread_id,
            model: model.to_owned(),
            text: text.to_owned(),
            covers_until,
            updated_at: chrono::Utc::now(),
        })
        .await
        .expect("seeding a summary");
}

pub fn uuid_of(value: &Value) -> Uuid {
    Uuid::parse_str(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not a string id: {value}")),
    )
    .unwrap_or_else(|e| panic!("`{value}` is not a UUID: {e}"))
}

// ---- chat: model catalogue, SSE, turns ----

/// The keys the harness gives providers pointed at a mock upstream.
pub const MOCK_OPENAI_KEY: &str = "sk-mock-openai";
pub const MOCK_ANTHROPIC_KEY: &str = "sk-ant-mock";
pub const MOCK_GEMINI_KEY: &str = "gemini-mock-key";

/// Longest wait for one server-sent event (or WebSocket frame) before a test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A model for [`catalogue_toml`]: id, provider (`mock`, `openai`, `anthropic`, `gemini`) and
/// upstream (for the mock provider `echo`/`lorem` with options; for the others the model name
/// the mock upstream receives, switches included, e.g. `m;error=429;retry_after=2`).
#[derive(Debug, Clone, Copy)]
pub struct TestModel<'a> {
    pub id: &'a str,
    pub provider: &'a str,
    pub upstream: &'a str,
}

impl<'a> TestModel<'a> {
    pub const fn new(id: &'a str, provider: &'a str, upstream: &'a str) -> Self {
        TestModel {
            id,
            provider,
            upstream,
        }
    }
}

/// Price per million input / output tokens of every [`catalogue_toml`] model that is not mock.
pub const TEST_INPUT_PER_MTOK: f64 = 1.0;
pub const TEST_OUTPUT_PER_MTOK: f64 = 2.0;

/// A models.toml with the four providers of the tests (mock always on; openai, anthropic and
/// gemini on with their keys, see [`TestAppBuilder::upstream`]), the built-in `mock-echo` and
/// `mock-lorem`, then `extra`.
pub fn catalogue_toml(extra: &[TestModel<'_>]) -> String {
    let mut text = String::from(
        r#"[providers.mock]
kind = "mock"

[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
base_url_env = "OPENAI_BASE_URL"

[providers.anthropic]
kind = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
base_url_env = "ANTHROPIC_BASE_URL"

[providers.gemini]
kind = "gemini"
base_url = "https://generativelanguage.googleapis.com"
api_key_env = "GEMINI_API_KEY"
base_url_env = "GEMINI_BASE_URL"

[[models]]
id = "mock-echo"
name = "Mock Echo"
provider = "mock"
upstream = "echo"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream", "embeddings"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 1024

[[models]]
id = "mock-lorem"
name = "Mock Lorem"
provider = "mock"
upstream = "lorem;words=40;delay_ms=20"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 1024
"#,
    );
    for model in extra {
        let (input, output, context) = if model.provider == "mock" {
            (0.0, 0.0, 8192)
        } else {
            (TEST_INPUT_PER_MTOK, TEST_OUTPUT_PER_MTOK, 128_000)
        };
        text.push_str(&format!(
            r#"
[[models]]
id = "{id}"
name = "Test {id}"
provider = "{provider}"
upstream = "{upstream}"
context_length = {context}
input_per_mtok = {input:?}
output_per_mtok = {output:?}
capabilities = ["chat", "stream"]
tiers = ["free", "pro", "enterprise"]
max_output_tokens = 1024
"#,
            id = model.id,
            provider = model.provider,
            upstream = model.upstream,
        ));
    }
    text
}

/// The `n`-word answer of `mock-lorem` (and of the mock upstream's `tokens=n`).
pub fn lorem(n: usize) -> String {
    chorus_actors::provider::mock::LOREM
        .iter()
        .cycle()
        .take(n)
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The `data` lines joined by `\n`.
    pub raw: String,
    /// `raw` as JSON, or `Null` when it is not JSON (e.g. `[DONE]`).
    pub data: Value,
}

impl SseEvent {
    /// The event name (`message` when the frame has none).
    pub fn name(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// The `id:` as a sequence number.
    pub fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("event has no numeric id: {self:?}"))
    }
}

/// Reads a `text/event-stream` body event by event, with a bounded wait for each.
pub struct SseStream {
    body: futures_util::stream::BoxStream<'static, Result<Vec<u8>, String>>,
    buffer: Vec<u8>,
    /// Comment lines seen so far (`: keep-alive`), without the colon.
    pub comments: Vec<String>,
    /// Set when the body ended with a transport error.
    pub error: Option<String>,
    /// Every event returned so far.
    pub seen: Vec<SseEvent>,
    /// Events parsed but not returned yet.
    pending: std::collections::VecDeque<SseEvent>,
    ended: bool,
}

impl SseStream {
    pub fn new(response: Response) -> SseStream {
        use futures_util::StreamExt;
        SseStream {
            body: response
                .bytes_stream()
                .map(|chunk| chunk.map(|b| b.to_vec()).map_err(|e| e.to_string()))
                .boxed(),
            buffer: Vec::new(),
            comments: Vec::new(),
            error: None,
            seen: Vec::new(),
            pending: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    /// Reads more of the body (bounded by `deadline`); false when it has ended.
    async fn fill(&mut self, deadline: Instant, waiting_for: &str) -> bool {
        use futures_util::StreamExt;
        if self.ended {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.body.next()).await {
            Err(_) => panic!(
                "no {waiting_for} within {EVENT_TIMEOUT:?}; events so far: {:#?}",
                self.seen
            ),
            Ok(None) => self.ended = true,
            Ok(Some(Err(error))) => {
                self.error = Some(error);
                self.ended = true;
            }
            Ok(Some(Ok(bytes))) => self
                .buffer
                .extend(bytes.into_iter().filter(|b| *b != b'\r')),
        }
        true
    }

    /// Waits (bounded) for a new comment line such as `: keep-alive`; events read meanwhile
    /// stay queued for [`SseStream::next_event`].
    pub async fn wait_for_comment(&mut self) {
        let before = self.comments.len();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            while let Some(event) = self.parse_one() {
                self.pending.push_back(event);
            }
            if self.comments.len() > before {
                return;
            }
            if !self.fill(deadline, "comment").await && self.buffer.is_empty() {
                panic!("the event stream ended without a comment");
            }
        }
    }

    /// The next event; `None` when the body ended. Panics after [`EVENT_TIMEOUT`] without one.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            if let Some(event) = self.pending.pop_front().or_else(|| self.parse_one()) {
                self.seen.push(event.clone());
                return Some(event);
            }
            if !self.fill(deadline, "server-sent event").await {
                return None;
            }
        }
    }

    /// The next event, which must exist.
    pub async fn expect_event(&mut self) -> SseEvent {
        match self.next_event().await {
            Some(event) => event,
            None => panic!(
                "the event stream ended early (error: {:?}); events so far: {:#?}",
                self.error, self.seen
            ),
        }
    }

    /// Events up to and including the next one named `name`.
    pub async fn until_event(&mut self, name: &str) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.expect_event().await;
            let found = event.name() == name;
            events.push(event);
            if found {
                return events;
            }
        }
    }

    /// Events up to and including the next `done`.
    pub async fn until_done(&mut self) -> Vec<SseEvent> {
        self.until_event("done").await
    }

    /// Every remaining event until the body ends.
    pub async fn rest(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event().await {
            events.push(event);
        }
        events
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block[..end]).into_owned();
            let mut event = SseEvent {
                id: None,
                event: None,
                raw: String::new(),
                data: Value::Null,
            };
            let mut has_data = false;
            let mut has_field = false;
            for line in block.split('\n') {
                if let Some(comment) = line.strip_prefix(':') {
                    self.comments.push(comment.trim().to_owned());
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                has_field = true;
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            event.raw.push('\n');
                        }
                        event.raw.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if !has_field {
                continue;
            }
            event.data = serde_json::from_str(&event.raw).unwrap_or(Value::Null);
            return Some(event);
        }
    }
}

/// Asserts a response is a 200 event stream and wraps it.
pub async fn sse_of(response: Response) -> SseStream {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if status != StatusCode::OK || !content_type.starts_with("text/event-stream") {
        let text = response.text().await.unwrap_or_default();
        panic!("expected a 200 text/event-stream, got {status} `{content_type}`: {text}");
    }
    SseStream::new(response)
}

/// The concatenated `text` of the `delta` events (of `message_id`, when given).
pub fn delta_text(events: &[SseEvent], message_id: Option<&str>) -> String {
    events
        .iter()
        .filter(|e| e.name() == "delta")
        .filter(|e| message_id.is_none_or(|id| e.data["message_id"] == id))
        .map(|e| e.data["text"].as_str().expect("delta text").to_owned())
        .collect()
}

/// The names of `events`, in order.
pub fn event_names(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.name().to_owned()).collect()
}

/// Asserts the ids of `events` run without a gap, each one more than the last.
pub fn assert_contiguous(events: &[SseEvent]) {
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].seq(),
            pair[0].seq() + 1,
            "event ids must increase by one: {:#?}",
            events
        );
    }
}

impl TestApp {
    /// `POST /api/v1/threads/{thread}/messages`.
    pub async fn post_message(&self, token: &str, thread: &str, body: &Value) -> Response {
        self.post_json(
            &format!("/api/v1/threads/{thread}/messages"),
            Some(token),
            body,
        )
        .await
    }

    /// Sends a message as a stream (asserting a 200 event stream) and returns the stream.
    pub async fn send_streaming(&self, token: &str, thread: &str, body: &Value) -> SseStream {
        sse_of(self.post_message(token, thread, body).await).await
    }

    /// Sends a message and reads its whole turn (through `done`); asserts the stream then ends.
    pub async fn chat_turn(&self, token: &str, thread: &str, body: &Value) -> Vec<SseEvent> {
        let mut stream = self.send_streaming(token, thread, body).await;
        let events = stream.until_done().await;
        let rest = stream.rest().await;
        assert!(
            rest.is_empty(),
            "the POST stream must end after `done`: {rest:#?}"
        );
        events
    }

    /// Opens `GET /api/v1/threads/{thread}/events{query}` (asserting a 200 event stream).
    pub async fn open_events(
        &self,
        token: &str,
        thread: &str,
        query: &str,
        last_event_id: Option<u64>,
    ) -> SseStream {
        let mut request = self
            .request(
                Method::GET,
                &format!("/api/v1/threads/{thread}/events{query}"),
            )
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        sse_of(request.send().await.expect("GET events failed")).await
    }

    /// Every message of a thread, oldest first.
    pub async fn thread_messages(&self, token: &str, thread: &str) -> Vec<Value> {
        let page = self
            .get_ok(
                &format!("/api/v1/threads/{thread}/messages?limit=100"),
                token,
            )
            .await;
        page["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("no messages array: {page}"))
            .clone()
    }

    /// One message of a thread, by id (panics when absent).
    pub async fn thread_message(&self, token: &str, thread: &str, id: &str) -> Value {
        let messages = self.thread_messages(token, thread).await;
        messages
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("message {id} is not in thread {thread}"))
    }

    /// Polls the thread's messages until message `id` has `status` (bounded); returns it.
    pub async fn wait_for_message_status(
        &self,
        token: &str,
        thread: &str,
        id: &str,
        status: &str,
    ) -> Value {
        let started = Instant::now();
        loop {
            let messages = self.thread_messages(token, thread).await;
            let found = messages.iter().find(|m| m["id"] == id).cloned();
            if let Some(message) = &found
                && message["status"] == status
            {
                return message.clone();
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("message {id} did not reach status `{status}` within 30s: {found:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates an API key; returns `(id, key)`.
    pub async fn create_api_key(&self, token: &str, name: &str) -> (String, String) {
        let response = self
            .post_json("/api/v1/me/api-keys", Some(token), &json!({ "name": name }))
            .await;
        let status = response.status();
        let body = body_json(response).await;
        assert_eq!(status, StatusCode::CREATED, "create API key: {body}");
        (
            body["id"].as_str().expect("key id").to_owned(),
            body["key"].as_str().expect("key").to_owned(),
        )
    }
}

/// The id of a thread object.
pub fn id_of(thread: &Value) -> String {
    thread["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {thread}"))
        .to_owned()
}

/// A real `redis-server` on a free loopback port (no persistence), killed on drop: the same
/// harness as the actors' tests.
#[path = "../../actors/tests/common/redis_server.rs"]
mod redis_server;
pub use redis_server::RedisServer;

/// An answer about the shipped corpus (`corpus.md`, document `id`) retrieved at most 5 passages,
/// each with its text, and among them the one under `p02` that the question is about.
pub fn assert_corpus_passage_cited(answer: &Value, id: &str) {
    let citations = answer["citations"].as_array().unwrap();
    assert!(!citations.is_empty() && citations.len() <= 5, "{answer}");
    assert!(
        citations
            .iter()
            .any(|c| c["position"]["heading_path"][1] == "p02"),
        "the feeding passage is cited: {answer}"
    );
    for c in citations {
        assert_eq!(c["document_id"], id);
        assert_eq!(c["document_name"], "corpus.md");
        assert!(!c["text"].as_str().unwrap_or("").is_empty(), "{c}");
    }
}
