//! The `iron-token-broker` command line: `serve`, and the admin commands
//! `credentials set | list | revive`, which work on the store directly (with or without a
//! running daemon). No command ever prints a token.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::store::{CredState, Record, now_ms};

#[derive(Parser)]
#[command(
    name = "iron-token-broker",
    version,
    about = "Crash-safe refresh-token rotation shared by many iron-proxy instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the broker.
    Serve {
        /// Broker config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Bootstraps and inspects credentials in the store.
    Credentials {
        #[command(subcommand)]
        command: CredCommand,
    },
}

#[derive(Subcommand)]
enum CredCommand {
    /// Stores a refresh token for a credential (from a file, or stdin when no file is given).
    Set {
        /// Broker config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Credential id.
        #[arg(long)]
        id: String,
        /// File holding the refresh token (a trailing newline is removed).
        #[arg(long)]
        refresh_token_file: Option<PathBuf>,
    },
    /// Lists credentials: id, state, reason, expiry, last refresh. Never a token.
    List {
        /// Broker config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Marks a dead credential usable again, keeping its stored refresh token.
    Revive {
        /// Broker config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Credential id.
        #[arg(long)]
        id: String,
    },
}

/// Entry point of the binary (and of the test harness's copy of it).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("IRON_TOKEN_BROKER_LOG").unwrap_or_else(|_| "info".into());
    let level = filter
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iron-token-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iron-token-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            crate::daemon::serve(&config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Credentials { command } => credentials(command).await,
    }
}

async fn credentials(cmd: CredCommand) -> anyhow::Result<ExitCode> {
    const WAIT: Duration = Duration::from_secs(30);
    match cmd {
        CredCommand::Set {
            config,
            id,
            refresh_token_file,
        } => {
            let (cfg, store) = open(&config).await?;
            if !cfg.credentials.iter().any(|c| c.id == id) {
                anyhow::bail!("{}: no credential `{id}` in the config", config.display());
            }
            let mut raw = Vec::new();
            match &refresh_token_file {
                Some(f) => {
                    raw = std::fs::read(f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
                }
                None => {
                    std::io::stdin().read_to_end(&mut raw)?;
                }
            }
            let token = String::from_utf8(raw)
                .map_err(|_| anyhow::anyhow!("the refresh token is not UTF-8"))?
                .trim()
                .to_string();
            if token.is_empty() || token.chars().any(char::is_whitespace) {
                anyhow::bail!("the refresh token is empty or contains whitespace");
            }
            // A corrupt record is what `set` repairs: it is replaced, not read.
            let generation = match store.load(&id).await {
                Ok(r) => r.map_or(1, |r| r.generation + 1),
                Err(crate::store::StoreError::Corrupt { reason, .. }) => {
                    eprintln!(
                        "warning: the stored record of {id} is corrupt ({reason}); replacing it"
                    );
                    1
                }
                Err(e) => return Err(e.into()),
            };
            store
                .put(&Record::bootstrap(&id, token, generation), WAIT)
                .await?;
            println!("credential {id}: refresh token stored (generation {generation})");
            if let Some(path) = spilled(&cfg, &id) {
                eprintln!(
                    "warning: {} holds a record of {id} the store had not taken; the broker will drop it (a rotated token in it is kept aside as {id}.spill.dropped-*)",
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CredCommand::List { config } => {
            let (cfg, store) = open(&config).await?;
            let records = store.list().await?;
            println!(
                "{:<24} {:<6} {:<22} {:<26} {:<26} IN_FLIGHT",
                "ID", "STATE", "REASON", "EXPIRES_AT", "LAST_REFRESH"
            );
            let mut ids: Vec<&str> = cfg.credentials.iter().map(|c| c.id.as_str()).collect();
            for r in &records {
                if !ids.contains(&r.id.as_str()) {
                    ids.push(&r.id);
                }
            }
            for id in ids {
                match records.iter().find(|r| r.id == id) {
                    None => println!("{id:<24} {:<6} {:<22}", "dead", "not_bootstrapped"),
                    Some(r) => {
                        let state = match r.state {
                            CredState::Ok => "ok",
                            CredState::Dead => "dead",
                        };
                        println!(
                            "{:<24} {:<6} {:<22} {:<26} {:<26} {}",
                            r.id,
                            state,
                            r.dead_reason.as_deref().unwrap_or("-"),
                            r.expires_at_ms.map_or("-".into(), rfc3339),
                            r.last_refresh_ms.map_or("-".into(), rfc3339),
                            r.in_flight.as_ref().map_or("-".into(), |f| format!(
                                "since {} by {}",
                                rfc3339(f.started_at_ms),
                                f.owner
                            )),
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CredCommand::Revive { config, id } => {
            let (cfg, store) = open(&config).await?;
            if let Some(path) = spilled(&cfg, &id) {
                anyhow::bail!(
                    "a broker holds a record for {id} that the store has not taken yet ({}); start the broker with this spill_dir so it writes it first: reviving now could replay a rotated-out refresh token",
                    path.display()
                );
            }
            // Read, check and write under the refresh lease, so a broker's refresh cannot
            // run in between and a stale read never puts back an older refresh token.
            let owner = format!("credentials-revive:{}", std::process::id());
            let deadline = tokio::time::Instant::now() + WAIT;
            let lease = loop {
                if let Some(lease) = store.acquire(&id, &owner, WAIT).await? {
                    break lease;
                }
                if store.load(&id).await?.is_none() {
                    anyhow::bail!("credential {id} was never bootstrapped: use `credentials set`");
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("credential {id} is being refreshed; try again");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let mut r = lease.record.clone();
            if r.state != CredState::Dead {
                store.release(lease).await;
                anyhow::bail!("credential {id} is not dead; nothing to revive");
            }
            if r.dead_reason.as_deref() == Some("rotation_interrupted") {
                eprintln!(
                    "warning: {id} died with an interrupted rotation; if the IdP rotated the token, the next refresh will be refused (and may revoke the token family)"
                );
            }
            r.state = CredState::Ok;
            r.dead_reason = None;
            r.in_flight = None;
            r.generation += 1;
            r.updated_at_ms = now_ms();
            let written = store.write(&lease, &r).await;
            store.release(lease).await;
            written?;
            println!("credential {id}: revived");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The spill file of `id` in the config's `spill_dir`, when there is one.
fn spilled(cfg: &crate::daemon::Config, id: &str) -> Option<std::path::PathBuf> {
    cfg.spill_dir
        .as_ref()
        .map(|d| d.join(format!("{id}.spill.json")))
        .filter(|p| p.exists())
}

async fn open(config: &Path) -> anyhow::Result<(crate::daemon::Config, crate::store::Store)> {
    crate::daemon::open_store(config)
        .await
        .map_err(anyhow::Error::msg)
}

fn rfc3339(ms: u64) -> String {
    crate::daemon::rfc3339_ms(ms)
}
