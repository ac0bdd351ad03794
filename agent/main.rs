//! The `tunnel-agent` command: parses the CLI, sets up logging, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tunnel_agent::exit::{AgentError, Exit};
use tunnel_agent::handover::Incoming;
use tunnel_agent::node::Signal;
use tunnel_agent::{config, routing};

#[derive(Parser)]
#[command(
    name = "tunnel-agent",
    version = tunnel_agent::build_info::LONG_VERSION,
    about = "Keeps a Cloudflare Tunnel origin host alive"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what systemd starts).
    Run(Source),
    /// Validate a configuration (and the route file and local secrets it names) without
    /// starting anything. Exit 0 if valid; otherwise print every problem and exit 78.
    Check(Source),
    /// Make this node active: start cloudflared now (through the running agent).
    Promote(ControlArgs),
    /// Make this node standby: stop cloudflared gracefully; the proxy keeps serving.
    Demote(ControlArgs),
    /// Show the running agent's role, where it came from, tunnel state and routes.
    Status(ControlArgs),
    /// Re-execute the running agent in place into the binary now on disk (after a package
    /// upgrade): same process, same cloudflared, no connection refused. Waits for the outcome:
    /// exit 0 when the new binary runs, 1 when it was refused or rolled back.
    Upgrade(ControlArgs),
    /// What an upgrade asks of a new binary before handing over: its version and the state
    /// formats it takes over from, as one JSON line.
    #[command(hide = true)]
    HandoverProbe,
}

/// Where the configuration comes from: a file, or the gateway controller's environment
/// variables (over a file, when one is named).
#[derive(clap::Args)]
struct Source {
    /// Configuration file [default: /etc/tunnel-agent/agent.toml; none with --from-env].
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Read the gateway controller's proxy variables (TUNNEL_TOKEN, PROXY_ADDR,
    /// PROXY_CONFIG_ADDR, PROXY_AUTH_TOKEN, PROXY_GRACE_PERIOD, PROXY_TUNNEL_PROTOCOL, ...);
    /// with -c, over that file (docs/config.md, "The environment mode").
    #[arg(long)]
    from_env: bool,
}

impl Source {
    /// The file to load (empty: the environment alone); turns the environment mode on.
    fn path(self) -> PathBuf {
        if self.from_env {
            config::env::enable();
            return self.config.unwrap_or_default();
        }
        self.config.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
    }
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Configuration file (to find the runtime directory and its control socket).
    #[command(flatten)]
    source: Source,
    /// The control socket, instead of the one in the config's runtime directory.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the agent's JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Writes `text` to stdout. A closed stdout (`tunnel-agent status | head -1`) is not an error
/// for a CLI: the reader has what it wanted, so a broken pipe ends the output quietly (println!
/// would panic on it).
fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => err(&format!("tunnel-agent: cannot write to stdout: {e}\n")),
    }
}

/// Writes `text` to stderr, ignoring a closed stderr (there is nowhere left to report it).
fn err(text: &str) {
    use std::io::Write as _;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
}

fn main() -> ExitCode {
    tunnel_agent::process_stats::mark_start();
    // Every secret the agent resolves lives in its memory, the `source = "env"` ones in its
    // environment too. Not dumpable (prctl(2) PR_SET_DUMPABLE): a watchdog's SIGABRT writes no
    // core holding them, and a process of the same uid (cloudflared, in the unit) can neither
    // ptrace the agent nor read its /proc/PID/environ or mem. Children get the flag back at
    // execve(2). Before anything is read, for every subcommand (`check` resolves secrets too).
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        err(&format!(
            "tunnel-agent: cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}\n"
        ));
        return Exit::Failure.into();
    }
    tunnel_agent::reaper::init_if_pid1();
    // Before any thread exists: the hand-over's variables leave the environment here.
    let incoming = Incoming::take();
    let cli = Cli::parse();
    let exit = match cli.command {
        Command::Check(source) => check(&source.path()),
        Command::Run(source) => run(source.path(), incoming),
        Command::Upgrade(args) => control(args, tunnel_agent::control::Command::Upgrade),
        Command::HandoverProbe => {
            let probe = tunnel_agent::handover::preflight::Probe::mine();
            out(&format!("{}\n", serde_json::to_string(&probe).unwrap_or_default()));
            Exit::Success
        }
        Command::Promote(args) => control(args, tunnel_agent::control::Command::Promote),
        Command::Demote(args) => control(args, tunnel_agent::control::Command::Demote),
        Command::Status(args) => control(args, tunnel_agent::control::Command::Status),
    };
    exit.into()
}

/// The control socket `args` name (or its config's), and a runtime to talk to it.
fn control_target(args: ControlArgs) -> Result<(std::path::PathBuf, tokio::runtime::Runtime), Exit> {
    let socket = match args.socket {
        Some(s) => s,
        None => match routing::load_config(&args.source.path()) {
            Ok(c) => tunnel_agent::control::socket_path(&c.agent.runtime_dir),
            Err(e) => {
                let e = AgentError::from(e);
                err(&format!("{e}\n"));
                return Err(e.exit());
            }
        },
    };
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Ok((socket, rt)),
        Err(e) => {
            err(&format!("cannot start the async runtime: {e}\n"));
            Err(Exit::Failure)
        }
    }
}

/// `promote`, `demote`, `status` and `upgrade` through the control socket. `upgrade` waits for
/// the image that answers afterwards and prints how it went; the others print a summary.
fn control(args: ControlArgs, command: tunnel_agent::control::Command) -> Exit {
    use tunnel_agent::control::{self, Command};
    let json = args.json;
    let (socket, runtime) = match control_target(args) {
        Ok(t) => t,
        Err(exit) => return exit,
    };
    let answer = match command {
        Command::Upgrade => runtime.block_on(control::upgrade(&socket)),
        _ => runtime.block_on(control::call(&socket, command)),
    };
    let reply = match answer {
        Ok(reply) => reply,
        Err(e) => {
            err(&format!("tunnel-agent: {e}\n"));
            return Exit::Failure;
        }
    };
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        ));
    } else if command == Command::Upgrade && reply.ok {
        out(&format!("{}\n", reply.message));
    } else {
        print_summary(&reply);
    }
    if reply.ok {
        Exit::Success
    } else {
        Exit::Failure
    }
}

/// The `agent:` line: the running build, since when, and its upgrades in place.
fn describe_agent(a: &tunnel_agent::health::AgentStatus) -> String {
    let last = match &a.last_upgrade {
        None => String::new(),
        Some(u) => {
            let held = u
                .held_ms
                .map(|ms| format!(", new connections waited {ms} ms"))
                .unwrap_or_default();
            let error = u.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            format!(
                "; last upgrade {} ({} -> {}{held}){error}",
                u.result.as_str(),
                u.from,
                u.to
            )
        }
    };
    format!(
        "{} since {}; {} upgrades in place, {} rolled back, {} refused{last}",
        a.version, a.since, a.upgrades, a.rolled_back, a.refused
    )
}

fn print_summary(reply: &tunnel_agent::control::Reply) {
    if !reply.ok {
        err(&format!("tunnel-agent: {}\n", reply.message));
        return;
    }
    out(&format!("{}\n", reply.message));
    let Some(s) = &reply.status else {
        return;
    };
    out(&format!(
        "role:         {} (from {})\n",
        s.role.map_or("?", |r| r.as_str()),
        s.role_source.map_or("?", |r| r.as_str())
    ));
    out(&format!("ready:        {}\n", s.ready));
    out(&format!("agent:        {}\n", describe_agent(&s.agent)));
    let cf = &s.cloudflared;
    out(&format!(
        "tunnel:       {} connections, pid {}, {} restarts, last exit {}\n",
        cf.connections,
        cf.pid.map_or_else(|| "none".to_owned(), |p| p.to_string()),
        cf.restarts,
        cf.last_exit.as_deref().unwrap_or("none")
    ));
    if let Some(e) = &s.election {
        let lease = match (&e.lease_id, e.lease_remaining_s) {
            (Some(id), Some(left)) => format!("lease {id}, {left:.1} s left"),
            _ => "no lease".to_owned(),
        };
        let what = if e.backend == "kubernetes" {
            "kubernetes Lease"
        } else {
            "etcd key"
        };
        out(&format!(
            "election:     {what} {} is {}; leader {}; {lease}; won {}, lost {}, renew failures {}\n",
            e.key,
            e.state,
            e.leader.as_deref().unwrap_or("none"),
            e.elections_won,
            e.elections_lost,
            e.renew_failures
        ));
    }
    out(&format!(
        "routes:       {} from {} (version {})\n",
        s.routes.count, s.routes.source, s.routes.version
    ));
}

/// `tunnel-agent check`: the library's report, printed.
fn check(path: &std::path::Path) -> Exit {
    for w in config::env::active().map(|e| e.warnings()).unwrap_or_default() {
        err(&format!("(environment): warning: {w}\n"));
    }
    let report = tunnel_agent::check::check(path);
    if let Some(hint) = env_hint(path, report.failed) {
        err(&hint);
    }
    out(&report.stdout);
    err(&report.stderr);
    report.exit()
}

/// A new image that cannot read what the previous one carried returns to it at once (`Err`:
/// that failed too).
fn readable(incoming: Option<Incoming>) -> Result<Option<Incoming>, Exit> {
    match incoming {
        Some(i) => match i.state().err().map(str::to_owned) {
            Some(why) => {
                err(&format!("tunnel-agent: {}\n", i.roll_back(&why)));
                Err(Exit::Failure)
            }
            None => Ok(Some(i)),
        },
        None => Ok(None),
    }
}

fn run(path: PathBuf, incoming: Option<Incoming>) -> Exit {
    let incoming = match readable(incoming) {
        Ok(i) => i,
        Err(exit) => return exit,
    };
    let config = match routing::load_config(&path) {
        Ok(c) => c,
        Err(e) => {
            let e = AgentError::from(e);
            if let Some(i) = incoming {
                err(&format!("tunnel-agent: {}\n", i.roll_back(&e.to_string())));
            }
            err(&format!("{e}\n"));
            if let Some(hint) = env_hint(&path, true) {
                err(&hint);
            }
            return e.exit();
        }
    };
    let (format, stream) = (config.agent.log_format(), config.agent.log_stream());
    if let Err(e) = tunnel_agent::telemetry::init_logging(format, stream, &config.agent.log_level) {
        err(&format!("cannot set up logging: {e:#}\n"));
        return Exit::Failure;
    }
    // From here on what ends the run is logged (by the caller), then said again as a plain last
    // line where the log goes (`agent.log_stream`), so a container that asked for stdout finds
    // nothing on stderr but a panic. Not in JSON: there the logged event is the line, and a
    // plain one would be the one line on the stream a JSON reader cannot parse.
    let fatal = move |text: &str| match (format, stream) {
        (config::LogFormat::Json, _) => {}
        (config::LogFormat::Journald, _) | (_, config::LogStream::Stderr) => err(text),
        (_, config::LogStream::Stdout) => out(text),
    };
    log_start(&config, &path);
    // The control runtime (boot, supervision, health, roles, reloads) is one thread; the proxy
    // runs on its own worker threads (`proxy.workers`), so the autohealing probe and
    // cloudflared's supervision never queue behind proxied requests.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime: {e}");
            fatal(&format!("cannot start the async runtime: {e}\n"));
            return Exit::Failure;
        }
    };
    let agent = async {
        let signals = forward_signals()?;
        tunnel_agent::boot::run(path, config, signals, incoming).await
    };
    match runtime.block_on(agent) {
        Ok(()) => Exit::Success,
        Err(e) => {
            tracing::error!(error = %e, "tunnel-agent failed: {e}");
            fatal(&format!("tunnel-agent: {e}\n"));
            e.exit()
        }
    }
}

/// The first line of every start says what runs, from which file, in which role, so one
/// `journalctl -u tunnel-agent` excerpt identifies the build without a shell on the host. The
/// role is the one this start begins in (a persisted promote, an election's standby), with the
/// file's own next to it. Then, once per start, what the environment mode does not act on.
fn log_start(config: &config::Config, path: &std::path::Path) {
    let plan = tunnel_agent::role::starting(config);
    let (role, role_source, why) = (plan.role(), plan.source(), plan.why());
    let from = match (config::env::active().is_some(), path.as_os_str().is_empty()) {
        (true, true) => "the environment".to_owned(),
        (true, false) => format!("{} and the environment", path.display()),
        (false, _) => path.display().to_string(),
    };
    tracing::info!(
        version = tunnel_agent::build_info::VERSION,
        commit = tunnel_agent::build_info::COMMIT,
        build_date = tunnel_agent::build_info::BUILD_DATE,
        config_file = %from,
        role = role.as_str(),
        role_source = role_source.as_str(),
        configured_role = config.role.as_str(),
        "tunnel-agent {} starting with {} (role {why}; configured role {})",
        tunnel_agent::build_info::LONG_VERSION,
        from,
        config.role.as_str()
    );
    for w in config::env::active().map(|e| e.warnings()).unwrap_or_default() {
        tracing::warn!("environment: {w}");
    }
}

/// When the default file is missing and the gateway controller's variables are set, the
/// switch that reads them: the agent never falls back to them on its own (a host whose file
/// went missing must not start with another configuration).
fn env_hint(path: &std::path::Path, failed: bool) -> Option<String> {
    if !failed || config::env::active().is_some() || path != std::path::Path::new(config::DEFAULT_PATH) || path.exists()
    {
        return None;
    }
    let peer = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k == "TUNNEL_TOKEN" || k.starts_with("PROXY_")
    });
    peer.then(|| "tunnel-agent: the gateway controller's variables (TUNNEL_TOKEN, PROXY_*) are set: run with --from-env to read them\n".to_owned())
}

/// SIGTERM and SIGINT stop the agent, SIGHUP reloads it: installed here, so the library takes
/// its shutdown and reload requests as a stream (a test passes its own).
fn forward_signals() -> anyhow::Result<mpsc::Receiver<Signal>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    // Handled from here: what arrived during an upgrade's exec is delivered now.
    tunnel_agent::handover::unblock_signals();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = term.recv() => Signal::Shutdown,
                _ = int.recv() => Signal::Shutdown,
                _ = hup.recv() => Signal::Reload,
                _ = usr2.recv() => Signal::Upgrade,
            };
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
