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
        /// The caller (`[[callers]]`) the sandbox is: its token goes in the proxy URL, and
        /// only its granted secrets get variables. Required when the policy has callers.
        #[arg(long)]
        caller: Option<String>,
    },
    /// Run the proxy in-process on a free port and CMD with the sandbox environment;
    /// exit with CMD's status.
    Run {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Run CMD as this user (`NAME`, `UID` or `UID:GID`; a name takes its primary
        /// group), so it cannot read the proxy's secret files, CA key or memory. Without it,
        /// CMD runs as the proxy's user and a warning says what it can read.
        #[arg(long)]
        user: Option<String>,
        /// The caller (`[[callers]]`) CMD is, as for `env`.
        #[arg(long)]
        caller: Option<String>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// A self-contained demonstration: local TLS origin, demo policy, requests through the
    /// proxy, and what each side saw.
    Demo,
    /// List or show secrets: names, types, hosts, sources, state — never values. Reads the
    /// running proxy's admin API with `--admin`, else the policy file.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Ask the running proxy to reload its policy (POST /v1/reload on the admin API).
    Reload {
        /// The policy file (its `admin_listen` is used). Without `--policy` and `--admin`,
        /// the default admin address 127.0.0.1:9092.
        #[arg(long, conflicts_with = "admin")]
        policy: Option<PathBuf>,
        /// The admin API address, e.g. 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// One line per secret.
    List {
        /// The policy file.
        #[arg(long, required_unless_present = "admin")]
        policy: Option<PathBuf>,
        /// The admin API address, e.g. 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// One secret in detail (JSON).
    Show {
        /// The secret's name.
        name: String,
        /// The policy file.
        #[arg(long, required_unless_present = "admin")]
        policy: Option<PathBuf>,
        /// The admin API address, e.g. 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
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

/// Event loops (threads, see [`crate::workers`]) `serve` runs: `TOKIO_WORKER_THREADS` when
/// set to a positive number, else one per available core. A loop uses CPU only for the
/// connections it serves. Measured on 2 shared cores (bench/README.md), two loops instead of
/// one: keep-alive +4–8 % (level with or ahead of hudsucker), a new connection per request
/// −6–9 % (the accepted socket moves to the other loop's thread).
fn event_loops() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Entry point of the `iron-proxy` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // The main thread is event loop 0; `serve` starts the others.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    let rt = match builder.build() {
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
        Command::Env { policy, caller } => {
            let policy = load(&policy)?;
            let dir = state::state_dir();
            let sources = SourceResolver::new(Arc::new(ProcessEnv));
            let caller = sandbox::sandbox_caller(&policy, &sources, caller.as_deref())
                .map_err(anyhow::Error::msg)?;
            let ca = state::load_ca(&policy, &dir).map_err(anyhow::Error::msg)?;
            let mut extra = state::gcp_stub_env(&policy, &dir, sandbox::grants(caller.as_ref()))
                .map_err(anyhow::Error::msg)?;
            extra.extend(
                sandbox::pg_env(&policy, &sources, &dir, &ca, &[], caller.as_ref())
                    .map_err(anyhow::Error::msg)?,
            );
            let env =
                sandbox::sandbox_env(&policy, policy.proxy.listen, &ca, &extra, caller.as_ref());
            print!("{}", sandbox::export_lines(&env));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            policy,
            user,
            caller,
            cmd,
        } => run(&policy, user.as_deref(), caller.as_deref(), &cmd).await,
        Command::Secrets { command } => secrets(command).await,
        Command::Reload { policy, admin } => {
            // The bearer token goes only to an address the operator named (flag or
            // policy): whoever holds the default port on this machine is not trusted with it.
            let (addr, named) = match (admin, policy) {
                (Some(a), _) => (a, true),
                // Only `admin_listen` is needed: the policy is parsed, and its sources are
                // not read here (they live in the server's environment, not this shell's).
                (None, Some(p)) => match iron_policy::Policy::load(&p)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .proxy
                    .admin_listen
                {
                    Some(a) => (a, true),
                    None => (crate::admin::DEFAULT_ADMIN_LISTEN, false),
                },
                (None, None) => (crate::admin::DEFAULT_ADMIN_LISTEN, false),
            };
            let (status, body) =
                crate::admin::call_with(addr, http::Method::POST, "/v1/reload", named)
                    .await
                    .map_err(anyhow::Error::msg)?;
            print!("{body}");
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Demo => {
            let report = crate::demo::run().await.map_err(anyhow::Error::msg)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads the policy for serving ([`crate::loader::load_for_serving`]: an absent source of a
/// required secret is a warning); prints warnings; fails with every error.
fn load(path: &Path) -> anyhow::Result<Policy> {
    let (policy, diags) = crate::loader::load_for_serving(path, Arc::new(ProcessEnv));
    for d in &diags {
        eprintln!("{d}");
    }
    match policy {
        Some(p) if !diags.iter().any(|d| d.severity == Severity::Error) => Ok(p),
        _ => bail!("policy {} is invalid", path.display()),
    }
}

fn validate(path: &Path) -> (Option<Policy>, Vec<Diagnostic>) {
    crate::loader::load(path, Arc::new(ProcessEnv))
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
                "{}: ok: {} secret(s), egress {}, {} warning(s)",
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
        Arc::new(StderrAudit::new()),
    )
    .map_err(anyhow::Error::msg)?;
    Ok((rt, ca))
}

/// Process set-up for `serve` and `run`: not dumpable (no core file with secrets in it,
/// and other processes of the same user cannot read this one's memory or
/// `/proc/PID/environ`, where the real values of `env` sources are), and the soft limit on
/// open files raised to the hard limit (each proxied connection needs two descriptors; the
/// usual soft limit of 1024 would make most requests fail under load).
fn harden_process() {
    use rustix::process::{
        DumpableBehavior, Resource, getrlimit, set_dumpable_behavior, setrlimit,
    };
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process not dumpable");
    }
    let mut lim = getrlimit(Resource::Nofile);
    if let Some(hard) = lim.maximum
        && lim.current.is_some_and(|soft| soft < hard)
    {
        let from = lim.current;
        lim.current = Some(hard);
        match setrlimit(Resource::Nofile, lim) {
            Ok(()) => tracing::debug!(from = ?from, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
        }
    }
}

async fn serve(policy_path: &Path) -> anyhow::Result<ExitCode> {
    // A SIGHUP before the policy watcher is up must not end the process (its default).
    let _early_hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    harden_process();
    crate::workers::start(event_loops()).map_err(anyhow::Error::msg)?;
    let (rt, ca) = runtime(policy_path).await?;
    let policy = rt.policy();
    let listen = policy.proxy.listen;
    let proxy = start(rt.clone(), listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    // The admin API is on by default on loopback; a default address already taken (another
    // proxy on this machine) is a warning, an explicit one a startup error.
    let admin_addr = policy
        .proxy
        .admin_listen
        .unwrap_or(crate::admin::DEFAULT_ADMIN_LISTEN);
    let _admin = match crate::admin::start(rt.clone(), admin_addr).await {
        Ok((addr, task)) => {
            tracing::info!(addr = %addr, "admin API listening");
            Some(task)
        }
        Err(e) if policy.proxy.admin_listen.is_none() => {
            tracing::warn!(addr = %admin_addr, error = %e, "admin API not started: the default address is taken; set [proxy] admin_listen");
            None
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("failed to listen on admin_listen {admin_addr}")));
        }
    };
    crate::pg::start_all(&rt, &state::state_dir(), false)
        .await
        .map_err(anyhow::Error::msg)?;
    crate::watch::spawn(rt.clone()).map_err(anyhow::Error::msg)?;
    tracing::info!(
        addr = %proxy.addr,
        ca = %ca.cert.display(),
        secrets = policy.secrets.len(),
        "iron-proxy listening"
    );
    shutdown_signal().await;
    let grace = rt.policy().proxy.limits.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining requests in flight"
    );
    // HTTP connections and Postgres sessions drain side by side, under one grace period.
    let relays = crate::pg::take_all(&rt).await;
    let (http, pg) = tokio::join!(proxy.drain(grace), crate::pg::drain_all(relays, grace));
    if http && pg {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            http_drained = http,
            pg_drained = pg,
            "grace period over with connections still open; closed them; exiting"
        );
    }
    rt.audit.flush();
    Ok(ExitCode::SUCCESS)
}

async fn secrets(command: SecretsCommand) -> anyhow::Result<ExitCode> {
    let (name, policy, admin) = match command {
        SecretsCommand::List { policy, admin } => (None, policy, admin),
        SecretsCommand::Show {
            name,
            policy,
            admin,
        } => (Some(name), policy, admin),
    };
    let view: serde_json::Value = match (admin, policy) {
        (Some(addr), _) => {
            let path = match &name {
                Some(n) => format!("/v1/secrets/{n}"),
                None => "/v1/secrets".into(),
            };
            let (status, body) = crate::admin::call(addr, http::Method::GET, &path)
                .await
                .map_err(anyhow::Error::msg)?;
            if status != 200 {
                print!("{body}");
                return Ok(ExitCode::from(1));
            }
            serde_json::from_str(&body).context("admin API answered something that is not JSON")?
        }
        (None, Some(p)) => {
            // Reading the policy needs no CA: a throwaway one in memory, so listing secrets
            // never creates CA files.
            let policy = Arc::new(load(&p)?);
            let (ca, _) = iron_certs::CertificateAuthority::generate("iron-proxy secrets list")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let rt = Runtime::new(
                policy,
                Arc::new(ca),
                Arc::new(ProcessEnv),
                Arc::new(StderrAudit::new()),
            )
            .map_err(anyhow::Error::msg)?;
            let policy = rt.policy();
            let views: Vec<serde_json::Value> = policy
                .secrets
                .iter()
                .filter(|s| name.as_deref().is_none_or(|n| n == s.name))
                .map(|s| crate::admin::secret_view(&rt, s))
                .collect();
            match &name {
                Some(n) => views
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("no secret named {n}"))?,
                None => serde_json::json!({ "secrets": views }),
            }
        }
        (None, None) => bail!("give --policy or --admin"),
    };
    if name.is_some() {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:<8} {:<40} SOURCES",
        "NAME", "TYPE", "STATE", "HOSTS"
    );
    for s in view["secrets"].as_array().cloned().unwrap_or_default() {
        let list = |k: &str| -> String {
            s[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let sources = s["sources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        format!(
                            "{}={}:{}",
                            x["field"].as_str().unwrap_or(""),
                            x["kind"].as_str().unwrap_or(""),
                            x["ref"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        println!(
            "{:<24} {:<12} {:<8} {:<40} {}",
            s["name"].as_str().unwrap_or(""),
            s["type"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            list("hosts"),
            sources
        );
    }
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

/// How long `run` waits, after its child exits, for Postgres sessions still open.
const RUN_PG_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// `NAME`, `UID` or `UID:GID` → (uid, gid). A name is looked up with `getent passwd`
/// (so NSS users resolve too) and takes its primary group; a bare UID keeps it as GID too.
///
/// # Errors
/// When the user is unknown or the numbers do not parse.
fn resolve_user(spec: &str) -> anyhow::Result<(u32, u32)> {
    if let Some((u, g)) = spec.split_once(':') {
        let uid = u
            .parse()
            .with_context(|| format!("--user {spec}: UID is not a number"))?;
        let gid = g
            .parse()
            .with_context(|| format!("--user {spec}: GID is not a number"))?;
        return Ok((uid, gid));
    }
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok((uid, uid));
    }
    let out = std::process::Command::new("getent")
        .args(["passwd", spec])
        .output()
        .with_context(|| format!("--user {spec}: failed to run getent"))?;
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (out.status.success(), fields.get(2), fields.get(3)) {
        (true, Some(u), Some(g)) => Ok((
            u.parse()
                .with_context(|| format!("--user {spec}: bad passwd entry"))?,
            g.parse()
                .with_context(|| format!("--user {spec}: bad passwd entry"))?,
        )),
        _ => bail!("--user {spec}: no such user"),
    }
}

async fn run(
    policy_path: &Path,
    user: Option<&str>,
    caller: Option<&str>,
    cmd: &[String],
) -> anyhow::Result<ExitCode> {
    let run_as = user.map(resolve_user).transpose()?;
    harden_process();
    let (rt, ca) = runtime(policy_path).await?;
    let caller =
        sandbox::sandbox_caller(&rt.policy(), &rt.sources, caller).map_err(anyhow::Error::msg)?;
    let proxy = start(rt.clone(), std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("failed to start the proxy")?;
    let dir = state::state_dir();
    // Relays of their own on fresh loopback ports (unless the policy fixes `listen`), so
    // `run` works beside a `serve` sharing the state directory.
    let relays = crate::pg::start_all(&rt, &dir, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let policy = rt.policy();
    let mut extra = state::gcp_stub_env(&policy, &dir, sandbox::grants(caller.as_ref()))
        .map_err(anyhow::Error::msg)?;
    extra.extend(
        sandbox::pg_env(&policy, &rt.sources, &dir, &ca, &relays, caller.as_ref())
            .map_err(anyhow::Error::msg)?,
    );
    let env = sandbox::sandbox_env(&policy, proxy.addr, &ca, &extra, caller.as_ref());
    let Some((program, args)) = cmd.split_first() else {
        bail!("no command given");
    };
    let mut child = tokio::process::Command::new(program);
    child.args(args);
    // The sandbox never inherits a variable a secret source reads, nor the admin API's
    // bearer token (its source, and the variable `iron-proxy reload` sends).
    for var in SourceResolver::env_vars(
        policy
            .secrets
            .iter()
            .flat_map(|s| s.sources().into_iter().map(|(_, src)| src))
            .chain(policy.proxy.admin_token.iter())
            .chain(policy.callers.iter().map(|c| &c.token))
            .chain(
                policy
                    .proxy
                    .upstream_proxy
                    .iter()
                    .filter_map(|p| p.auth.as_ref()),
            ),
    ) {
        child.env_remove(var);
    }
    child.env_remove("IRON_PROXY_ADMIN_TOKEN");
    for (k, v) in &env {
        child.env(k, v);
    }
    match run_as {
        // std drops supplementary groups (setgroups) when it switches from root.
        Some((uid, gid)) => {
            child.uid(uid).gid(gid);
        }
        None => {
            let file_sources = policy.secrets.iter().any(|s| {
                s.sources()
                    .into_iter()
                    .any(|(_, src)| matches!(src.kind, iron_policy::SourceKind::File(_)))
            });
            if rustix::process::geteuid().is_root() {
                tracing::warn!(
                    "`run` without --user: the command runs as root and can read every real secret (the proxy's memory, its secret files, the CA key); use --user to run it as another user"
                );
            } else if file_sources || policy.proxy.ca.is_none() {
                tracing::warn!(
                    "`run` without --user: the command runs as the proxy's user and can read the secret files and the CA key; use --user to run it as another user"
                );
            }
        }
    }
    let status = child
        .status()
        .await
        .with_context(|| format!("failed to run {program}"))?;
    proxy.stop();
    // The child's Postgres sessions end with it; a descendant's still open after a moment
    // is closed. Either way each session's audit record is written before exit.
    crate::pg::drain_all(crate::pg::take_all(&rt).await, RUN_PG_GRACE).await;
    rt.audit.flush();
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
