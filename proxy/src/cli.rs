//! The `iron-proxy` command line (DESIGN.md "Command line"). `main` loads and validates the
//! policy before binding any socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use iron_broker::{ProcessEnv, SourceResolver};
use iron_certs::CertificateAuthority;
use iron_policy::{Diagnostic, Policy, Severity};

use crate::{Runtime, StderrAudit, sandbox, start, state};

/// iron-proxy: an egress, credential-injecting, TLS-intercepting forward proxy.
#[derive(Debug, Parser)]
#[command(name = "iron-proxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
    },
    /// Validate a policy; print every problem as FILE:LINE:COL: message.
    Check {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
    },
    /// Manage the interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the sandbox environment as `export` lines.
    Env {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
    },
    /// Run the proxy in-process on a free port and CMD with the sandbox environment;
    /// exit with CMD's status.
    Run {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// A self-contained demonstration: local TLS origin, demo policy, requests through the
    /// proxy, and what each side saw.
    Demo,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Write ca.crt and ca.key (0600) into DIR; refuses to overwrite.
    Init {
        /// Target directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Entry point of the `iron-proxy` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iron-proxy: failed to start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iron-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let level = std::env::var("IRON_PROXY_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::level_filters::LevelFilter>().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { policy } => Ok(check(&policy)),
        Command::Ca {
            command: CaCommand::Init { dir },
        } => {
            CertificateAuthority::init_dir(&dir).map_err(|e| anyhow::anyhow!(chain(&e)))?;
            println!(
                "wrote {} and {} (key mode 0600)",
                dir.join(iron_certs::CA_CERT_FILE).display(),
                dir.join(iron_certs::CA_KEY_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { policy } => serve(&policy).await,
        Command::Env { policy } => {
            let policy = load(&policy)?;
            let dir = state::state_dir();
            let ca = state::load_ca(&policy, &dir).map_err(anyhow::Error::msg)?;
            let extra = state::gcp_stub_env(&policy, &dir).map_err(anyhow::Error::msg)?;
            let env = sandbox::sandbox_env(&policy, policy.proxy.listen, &ca, &extra);
            print!("{}", sandbox::export_lines(&env));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { policy, cmd } => run(&policy, &cmd).await,
        Command::Demo => {
            let report = crate::demo::run().await.map_err(anyhow::Error::msg)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads the policy and checks its sources; prints warnings; fails with every error.
fn load(path: &Path) -> anyhow::Result<Policy> {
    let (policy, diags) = validate(path);
    for d in &diags {
        eprintln!("{d}");
    }
    match policy {
        Some(p) if !diags.iter().any(|d| d.severity == Severity::Error) => Ok(p),
        _ => bail!("policy {} is invalid", path.display()),
    }
}

/// Parses the policy, then checks what parsing cannot: every required secret's source is
/// present and readable, the CA (if named) loads, `upstream_ca` files are usable.
fn validate(path: &Path) -> (Option<Policy>, Vec<Diagnostic>) {
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(e) => return (None, e.diagnostics),
    };
    let mut diags = policy.warnings.clone();
    let at = |line: usize, col: usize, severity: Severity, message: String| Diagnostic {
        file: path.to_path_buf(),
        line,
        col,
        severity,
        message,
    };
    let sources = SourceResolver::new(Arc::new(ProcessEnv));
    for s in &policy.secrets {
        let (severity, note) = if s.optional {
            (
                Severity::Warning,
                " (optional secret: requests needing it are refused)",
            )
        } else {
            (Severity::Error, "")
        };
        for (field, src) in s.sources() {
            if let Err(e) = sources.resolve(src) {
                let field = if field == "source" {
                    String::new()
                } else {
                    format!("field {field}: ")
                };
                diags.push(at(
                    src.pos.line,
                    src.pos.col,
                    severity,
                    format!("secret `{}`: {field}{e}{note}", s.name),
                ));
            }
        }
        for problem in iron_broker::tokens::validate_inputs(s, &sources) {
            diags.push(at(
                s.pos.line,
                s.pos.col,
                severity,
                format!("secret `{}`: {problem}{note}", s.name),
            ));
        }
    }
    if let Some((cert, key)) = &policy.proxy.ca
        && let Err(e) = CertificateAuthority::load(cert, key)
    {
        diags.push(at(
            1,
            1,
            Severity::Error,
            format!("[proxy] ca_cert/ca_key: {}", chain(&e)),
        ));
    }
    if let Err(e) = crate::upstream::client_tls_config(&policy, crate::crypto_provider()) {
        diags.push(at(1, 1, Severity::Error, format!("[proxy] {e}")));
    }
    diags.sort_by_key(|d| (d.line, d.col));
    (Some(policy), diags)
}

fn check(path: &Path) -> ExitCode {
    let (policy, diags) = validate(path);
    for d in &diags {
        println!("{d}");
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    match policy {
        Some(p) if errors == 0 => {
            println!(
                "{}: ok: {} secret(s), egress {:?}, {} warning(s)",
                path.display(),
                p.secrets.len(),
                p.proxy.egress,
                diags.len()
            );
            ExitCode::SUCCESS
        }
        _ => {
            println!("{}: {} error(s)", path.display(), errors.max(1));
            ExitCode::from(1)
        }
    }
}

async fn runtime(policy: &Path) -> anyhow::Result<(Arc<Runtime>, state::CaFiles)> {
    let policy = Arc::new(load(policy)?);
    let ca = state::load_ca(&policy, &state::state_dir()).map_err(anyhow::Error::msg)?;
    let rt = Runtime::new(
        policy,
        ca.ca.clone(),
        Arc::new(ProcessEnv),
        Arc::new(StderrAudit),
    )
    .map_err(anyhow::Error::msg)?;
    Ok((Arc::new(rt), ca))
}

async fn serve(policy_path: &Path) -> anyhow::Result<ExitCode> {
    let (rt, ca) = runtime(policy_path).await?;
    let listen = rt.policy.proxy.listen;
    let proxy = start(rt.clone(), listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    tracing::info!(
        addr = %proxy.addr,
        ca = %ca.cert.display(),
        secrets = rt.policy.secrets.len(),
        "iron-proxy listening"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    proxy.stop();
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
}

async fn run(policy_path: &Path, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let (rt, ca) = runtime(policy_path).await?;
    let proxy = start(rt.clone(), std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("failed to start the proxy")?;
    let extra = state::gcp_stub_env(&rt.policy, &state::state_dir()).map_err(anyhow::Error::msg)?;
    let env = sandbox::sandbox_env(&rt.policy, proxy.addr, &ca, &extra);
    let Some((program, args)) = cmd.split_first() else {
        bail!("no command given");
    };
    let mut child = tokio::process::Command::new(program);
    child.args(args);
    // The sandbox never inherits a variable a secret source reads.
    for var in SourceResolver::env_vars(
        rt.policy
            .secrets
            .iter()
            .flat_map(|s| s.sources().into_iter().map(|(_, src)| src)),
    ) {
        child.env_remove(var);
    }
    for (k, v) in &env {
        child.env(k, v);
    }
    let status = child
        .status()
        .await
        .with_context(|| format!("failed to run {program}"))?;
    proxy.stop();
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(128 + status_signal(&status)),
    })
}

fn status_signal(status: &std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .signal()
        .and_then(|s| u8::try_from(s).ok())
        .unwrap_or(1)
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::pipeline::ErrorChain(e).to_string()
}
