//! The `chorus` command line: `config check`, `migrate`, `user create`, and `--help`.

use std::process::Output;
use std::sync::Arc;

use chorus_actors::store::sqlite::SCHEMA_VERSION;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TEST_JWT_SECRET, TestApp, chorus_command, unique_email};

/// Runs `chorus <args>` with `env` (on top of a scrubbed environment).
async fn chorus(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::from(chorus_command());
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("chorus {args:?} did not finish within 60s"))
        .expect("running chorus")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

const PROVIDER_SECRET: &str = "provider-keys-secret-for-tests-0123456789";

#[tokio::test]
async fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let output = chorus(
        &["config", "check"],
        &[
            ("CHORUS__DATA_DIR", &data_dir),
            ("CHORUS__AUTH__JWT_SECRET", TEST_JWT_SECRET),
            ("CHORUS__SERVER__BIND", "127.0.0.1:9999"),
            ("CHORUS__AUTH__PROVIDER_KEYS_SECRET", PROVIDER_SECRET),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    for secret in [TEST_JWT_SECRET, PROVIDER_SECRET] {
        assert!(!stdout.contains(secret), "secret printed: {stdout}");
        assert!(!stderr.contains(secret), "secret printed: {stderr}");
    }
    assert!(stdout.contains("<redacted>"), "{stdout}");
    // The env overrides are what it shows.
    assert!(stdout.contains("127.0.0.1:9999"), "{stdout}");
    assert!(stdout.contains(&data_dir), "{stdout}");
    for section in ["[server]", "[auth]", "[store]", "[limits]", "[log]"] {
        assert!(stdout.contains(section), "{section} missing: {stdout}");
    }
}

#[tokio::test]
async fn config_check_without_a_secret_shows_it_empty_not_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let output = chorus(
        &["config", "check"],
        &[("CHORUS__DATA_DIR", &dir.path().display().to_string())],
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("jwt_secret = \"\""), "{stdout}");
}

#[tokio::test]
async fn config_check_names_an_unknown_key_and_fails() {
    let output = chorus(&["config", "check"], &[("CHORUS__SERVER__NOPE", "1")]).await;
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("nope"), "{}", describe(&output));
}

#[tokio::test]
async fn config_check_names_a_bad_value_and_fails() {
    for (var, value, key) in [
        ("CHORUS__SERVER__BIND", "nowhere", "server.bind"),
        ("CHORUS__AUTH__JWT_SECRET", "too-short", "auth.jwt_secret"),
        (
            "CHORUS__SERVER__BODY_LIMIT_BYTES",
            "lots",
            "CHORUS__SERVER__BODY_LIMIT_BYTES",
        ),
    ] {
        let output = chorus(&["config", "check"], &[(var, value)]).await;
        assert!(!output.status.success(), "{var}: {}", describe(&output));
        assert!(
            text(&output.stderr).contains(key),
            "{var}: {}",
            describe(&output)
        );
        assert!(
            var != "CHORUS__AUTH__JWT_SECRET" || !text(&output.stderr).contains(value),
            "a rejected secret was printed: {}",
            describe(&output)
        );
    }
}

#[tokio::test]
async fn serve_refuses_a_bad_config_with_a_nonzero_exit() {
    let output = chorus(
        &["serve"],
        &[
            ("CHORUS__SERVER__NOPE", "1"),
            ("CHORUS__SERVER__BIND", "127.0.0.1:0"),
        ],
    )
    .await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("nope"),
        "{}",
        describe(&output)
    );
}

#[tokio::test]
async fn migrate_reports_the_schema_version_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("CHORUS__DATA_DIR", dir.path().to_str().unwrap())];
    let output = chorus(&["migrate"], &env).await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains(&format!("version {SCHEMA_VERSION}")),
        "expected schema version {SCHEMA_VERSION}: {stdout}"
    );
    assert!(stdout.contains("applied migration 1"), "{stdout}");
    assert!(dir.path().join("chorus.db").exists());

    let again = chorus(&["migrate"], &env).await;
    assert!(again.status.success(), "{}", describe(&again));
    let stdout = text(&again.stdout);
    assert!(
        stdout.contains(&format!("version {SCHEMA_VERSION}")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("applied migration"),
        "re-applied: {stdout}"
    );
}

#[tokio::test]
async fn user_create_admin_then_the_server_logs_them_in_as_admin() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data_dir = dir.path().display().to_string();
    let email = unique_email();
    let password = "admin-password-123";
    let output = chorus(
        &[
            "user",
            "create",
            "--email",
            &email,
            "--password",
            password,
            "--display-name",
            "Root",
            "--admin",
        ],
        &[("CHORUS__DATA_DIR", &data_dir)],
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(!stdout.contains(password), "password printed: {stdout}");
    let created: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("user create prints one JSON line ({e}): {stdout}"));
    assert_eq!(created["email"], email.as_str());
    assert_eq!(created["role"], "admin");

    // Same email again: refused, nothing overwritten.
    let duplicate = chorus(
        &[
            "user",
            "create",
            "--email",
            &email.to_uppercase(),
            "--password",
            "other-password-1",
        ],
        &[("CHORUS__DATA_DIR", &data_dir)],
    )
    .await;
    assert!(!duplicate.status.success(), "{}", describe(&duplicate));
    assert!(
        text(&duplicate.stderr).contains("already exists"),
        "{}",
        describe(&duplicate)
    );

    let app = TestApp::builder().data_dir(dir.clone()).spawn().await;
    let session = app.login(&email, password).await;
    assert_eq!(session.user["id"], created["id"]);
    let me = app.get_ok("/api/v1/me", session.token()).await;
    assert_eq!(me["user"]["role"], "admin");
    assert_eq!(me["user"]["display_name"], "Root");
    assert_eq!(me["user"]["email"], email.as_str());
    let wrong = app.login_raw(&email, "other-password-1").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    // Accounts registered over HTTP are plain users.
    let user = app.register_user().await;
    assert_eq!(user.user["role"], "user");
}

#[tokio::test]
async fn user_create_takes_the_password_from_the_environment() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data_dir = dir.path().display().to_string();
    let email = unique_email();
    let output = chorus(
        &["user", "create", "--email", &email],
        &[
            ("CHORUS__DATA_DIR", &data_dir),
            ("CHORUS_USER_PASSWORD", "env-password-456"),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", describe(&output));
    let created: Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    assert_eq!(created["role"], "user");

    let app = TestApp::builder().data_dir(dir).spawn().await;
    let session = app.login(&email, "env-password-456").await;
    let me = app.get_ok("/api/v1/me", session.token()).await;
    assert_eq!(me["user"]["role"], "user");
}

#[tokio::test]
async fn user_create_refuses_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    for args in [
        vec![
            "user",
            "create",
            "--email",
            "not-an-email",
            "--password",
            "long-enough-1",
        ],
        vec![
            "user",
            "create",
            "--email",
            "short@example.com",
            "--password",
            "short",
        ],
        vec!["user", "create", "--password", "long-enough-1"],
    ] {
        let output = chorus(&args, &[("CHORUS__DATA_DIR", &data_dir)]).await;
        assert!(!output.status.success(), "{args:?}: {}", describe(&output));
        assert!(
            !text(&output.stderr).trim().is_empty(),
            "{args:?}: no explanation"
        );
    }
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["config", "--help"],
        vec!["config", "check", "--help"],
        vec!["user", "--help"],
        vec!["user", "create", "--help"],
        vec!["migrate", "--help"],
    ] {
        let output = chorus(&args, &[]).await;
        assert!(output.status.success(), "{args:?}: {}", describe(&output));
        let stdout = text(&output.stdout);
        assert!(stdout.contains("Usage"), "{args:?}: {stdout}");
    }
    let output = chorus(&["user", "create", "--help"], &[]).await;
    let stdout = text(&output.stdout);
    for flag in ["--email", "--password", "--admin"] {
        assert!(
            stdout.contains(flag),
            "user create --help lacks {flag}: {stdout}"
        );
    }
    let output = chorus(&["--version"], &[]).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text(&output.stdout).contains(env!("CARGO_PKG_VERSION")));

    let output = chorus(&["frobnicate"], &[]).await;
    assert!(!output.status.success(), "{}", describe(&output));
}
