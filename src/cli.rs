//! The `chorus` command line: `serve`, `config check`, `user create`, `migrate`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chorus_actors::store::{Role, SqliteStore, StoreError, User, UserSettings};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::app::Application;
use crate::auth::password;
use crate::config::{Config, StoreConfig};
use crate::telemetry;

#[derive(Parser)]
#[command(
    name = "chorus",
    version,
    about = "Chorus: a multi-model AI chat backend",
    long_about = "Chorus: a multi-model AI chat backend.\n\nConfiguration layers: built-in defaults \
                  (config/chorus.toml) → --config FILE → CHORUS__SECTION__KEY environment variables."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// A TOML file overriding the built-in defaults (any subset of config/chorus.toml's keys).
    #[arg(long, short = 'c', value_name = "FILE", env = "CHORUS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGTERM/SIGINT (then drain in-flight requests and exit 0).
    Serve(ConfigArg),
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage accounts from the command line (works on the store directly; no server needed).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Apply pending store migrations and report the schema version (also done by `serve`).
    Migrate(ConfigArg),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the effective configuration and print it with secrets redacted. Exits 1 (and
    /// names the key) when something is wrong.
    Check(ConfigArg),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account, e.g. the first admin: `chorus user create --email a@b.c --password … --admin`.
    Create {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        email: String,
        /// The password (or set CHORUS_USER_PASSWORD to keep it out of the process list).
        #[arg(long, env = "CHORUS_USER_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Give the account the admin role.
        #[arg(long)]
        admin: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` reads its config before the runtime exists: the runtime's size is configured.
    let serve_config = match &cli.command {
        Command::Serve(args) => match load(args) {
            Ok(config) => Some(config),
            Err(e) => return fail(&e),
        },
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = serve_config
        .as_ref()
        .map(|c| c.server.worker_threads)
        .filter(|&n| n > 0)
    {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::from(e)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => match serve_config {
                Some(config) => serve(config).await,
                None => Err(anyhow::anyhow!("serve: configuration missing")),
            },
            Command::Config {
                command: ConfigCommand::Check(args),
            } => config_check(args).await,
            Command::User {
                command:
                    UserCommand::Create {
                        config,
                        email,
                        password,
                        display_name,
                        admin,
                    },
            } => user_create(config, email, password, display_name, admin).await,
            Command::Migrate(args) => migrate(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {error:#}");
    ExitCode::FAILURE
}

fn load(args: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref(), std::env::vars())?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log);
    let app = Application::build(config).await?;
    app.run_until(shutdown_signal()).await
}

/// Resolves on SIGTERM (orchestrators) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

async fn config_check(args: ConfigArg) -> anyhow::Result<()> {
    let config = load(&args)?;
    // Key files are read now, so a missing or malformed key fails the check, not the rollout.
    if config.auth.secret.is_some() || config.auth.algorithm != crate::config::JwtAlgorithm::Hs256 {
        crate::auth::JwtKeys::from_config(&config.auth, None)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "# effective configuration (secrets redacted)")?;
    write!(out, "{}", config.to_redacted_toml()?)?;
    writeln!(std::io::stderr(), "config OK")?;
    Ok(())
}

async fn migrate(args: ConfigArg) -> anyhow::Result<()> {
    let config = load(&args)?;
    let StoreConfig::Sqlite { path } = &config.store;
    let path = path.clone();
    let report = tokio::task::spawn_blocking(move || SqliteStore::migrate(&path))
        .await
        .context("running migrations")??;
    let mut out = std::io::stdout().lock();
    if report.applied.is_empty() {
        writeln!(
            out,
            "schema is up to date at version {}",
            report.current_version
        )?;
    } else {
        for migration in &report.applied {
            writeln!(
                out,
                "applied migration {}: {}",
                migration.version, migration.name
            )?;
        }
        writeln!(out, "schema is now at version {}", report.current_version)?;
    }
    Ok(())
}

async fn user_create(
    args: ConfigArg,
    email: String,
    password_text: String,
    display_name: Option<String>,
    admin: bool,
) -> anyhow::Result<()> {
    let config = load(&args)?;
    let email = crate::http::validate_email(&email)?;
    let chars = password_text.chars().count();
    if chars < config.auth.password_min_chars || chars > config.auth.password_max_chars {
        anyhow::bail!(
            "password must be {}-{} characters",
            config.auth.password_min_chars,
            config.auth.password_max_chars
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store = crate::app::open_store(&config).await?;
    let now = chrono::Utc::now();
    let user = User {
        id: Uuid::now_v7(),
        email,
        display_name: display_name
            .map(|d| d.trim().to_owned())
            .filter(|d| !d.is_empty()),
        password_hash: password::hash_password(password_text).await?,
        tier: config.tiers.default_tier().to_owned(),
        role: if admin { Role::Admin } else { Role::User },
        settings: UserSettings::default(),
        created_at: now,
        updated_at: now,
    };
    match store.create_user(&user).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            anyhow::bail!("an account with email {} already exists", user.email)
        }
        Err(e) => return Err(e.into()),
    }
    let line = serde_json::json!({
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "tier": user.tier,
    });
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}
