//! The `tunnel-agent` command: parses the CLI, sets up logging, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tunnel_agent::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "tunnel-agent",
    version,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(config),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(tunnel_agent::EXIT_CONFIG);
        }
    };
    let metrics = tunnel_agent::telemetry::Metrics::default();
    let mut failed = false;
    if let Err(errors) = tunnel_agent::load_local_secrets(&config, &metrics) {
        for e in errors {
            eprintln!("{}: {e}", path.display());
        }
        failed = true;
    }
    match tunnel_agent::load_routes(&config, &metrics) {
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
    let config = match Config::load(&path) {
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
    match runtime.block_on(tunnel_agent::run(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "tunnel-agent failed");
            eprintln!("tunnel-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
