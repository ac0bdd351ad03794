//! The `tunnel-agent` command: parses the CLI, sets up logging, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
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
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration (and the route file and local secrets it names) without
    /// starting anything. Exit 0 if valid; otherwise print every problem and exit 78.
    Check {
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Make this node active: start cloudflared now (through the running agent).
    Promote(ControlArgs),
    /// Make this node standby: stop cloudflared gracefully; the proxy keeps serving.
    Demote(ControlArgs),
    /// Show the running agent's role, where it came from, tunnel state and routes.
    Status(ControlArgs),
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Configuration file (to find the runtime directory and its control socket).
    #[arg(short, long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// The control socket, instead of the one in the config's runtime directory.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the agent's JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tunnel_agent::process_stats::mark_start();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(config),
        Command::Promote(args) => control(args, tunnel_agent::control::Command::Promote),
        Command::Demote(args) => control(args, tunnel_agent::control::Command::Demote),
        Command::Status(args) => control(args, tunnel_agent::control::Command::Status),
    }
}

fn control(args: ControlArgs, command: tunnel_agent::control::Command) -> ExitCode {
    let socket = match args.socket {
        Some(s) => s,
        None => match routing::load_config(&args.config) {
            Ok(c) => tunnel_agent::control::socket_path(&c.agent.runtime_dir),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(tunnel_agent::EXIT_CONFIG);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tunnel_agent::control::call(&socket, command)) {
        Err(e) => {
            eprintln!("tunnel-agent: {e}");
            ExitCode::FAILURE
        }
        Ok(reply) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
            } else {
                print_summary(&reply);
            }
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print_summary(reply: &tunnel_agent::control::Reply) {
    if !reply.ok {
        eprintln!("tunnel-agent: {}", reply.message);
        return;
    }
    println!("{}", reply.message);
    let s = &reply.status;
    if s.is_null() {
        return;
    }
    let cf = &s["cloudflared"];
    println!(
        "role:         {} (from {})",
        s["role"].as_str().unwrap_or("?"),
        s["role_source"].as_str().unwrap_or("?")
    );
    println!("ready:        {}", s["ready"]);
    let or_none = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "none".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "tunnel:       {} connections, pid {}, {} restarts, last exit {}",
        cf["connections"],
        or_none(&cf["pid"]),
        cf["restarts"],
        or_none(&cf["last_exit"])
    );
    println!(
        "routes:       {} from {} (version {})",
        s["routes"]["count"],
        s["routes"]["source"].as_str().unwrap_or("?"),
        s["routes"]["version"]
    );
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match routing::load_config(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(tunnel_agent::EXIT_CONFIG);
        }
    };
    let metrics = tunnel_agent::telemetry::Metrics::default();
    let mut failed = false;
    if let Err(errors) = tunnel_agent::secrets::resolve::load_local(&config, &metrics) {
        for e in errors {
            eprintln!("{}: {e}", path.display());
        }
        failed = true;
    }
    match routing::source::load_local(&config, &metrics) {
        Ok(table) => {
            if !failed {
                println!("{}: ok ({} routes)", path.display(), table.len());
            }
        }
        Err(e) => {
            eprintln!("{}: {e:#}", path.display());
            failed = true;
        }
    }
    if failed {
        ExitCode::from(tunnel_agent::EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match routing::load_config(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(tunnel_agent::EXIT_CONFIG);
        }
    };
    if let Err(e) = tunnel_agent::telemetry::init_logging(config.agent.log_format, &config.agent.log_level) {
        eprintln!("cannot set up logging: {e:#}");
        return ExitCode::FAILURE;
    }
    // The first line of every start says what runs, from which file, in which role, so one
    // `journalctl -u tunnel-agent` excerpt identifies the build without a shell on the host.
    tracing::info!(
        version = tunnel_agent::build_info::VERSION,
        commit = tunnel_agent::build_info::COMMIT,
        build_date = tunnel_agent::build_info::BUILD_DATE,
        config_file = %path.display(),
        configured_role = config.role.as_str(),
        "tunnel-agent {} starting with {} (configured role {})",
        tunnel_agent::build_info::LONG_VERSION,
        path.display(),
        config.role.as_str()
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tunnel-agent")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let agent = async {
        let signals = forward_signals()?;
        tunnel_agent::boot::run(path, config, signals).await
    };
    match runtime.block_on(agent) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "tunnel-agent failed");
            eprintln!("tunnel-agent: {e:#}");
            // A cloudflared too old for the configuration: restarting cannot fix it.
            if e.downcast_ref::<tunnel_agent::tunnel::version::Unsupported>().is_some() {
                ExitCode::from(tunnel_agent::EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// SIGTERM and SIGINT stop the agent, SIGHUP reloads it: installed here, so the library takes
/// its shutdown and reload requests as a stream (a test passes its own).
fn forward_signals() -> anyhow::Result<mpsc::Receiver<Signal>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = term.recv() => Signal::Shutdown,
                _ = int.recv() => Signal::Shutdown,
                _ = hup.recv() => Signal::Reload,
            };
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
