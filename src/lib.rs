//! ntp-dtls: NTP over DTLS 1.2, one NTP datagram per DTLS record.
//!
//! Pure protocol logic (`ntp`, `pending`, `record`, `backoff`, the `engine` interface) is kept
//! apart from the tokio shells that drive it (`client`, `server`, `query`).

pub mod admission;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod ntp;
pub mod observe;
pub mod pending;
pub mod pki;
pub mod privileges;
pub mod query;
pub mod record;
pub mod server;
pub mod stats;
pub mod timer;
pub mod udp;

use std::process::ExitCode;

use anyhow::Context;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs(args) => {
            let written = pki::generate_lab_pki(&pki::LabPkiRequest {
                out_dir: args.out.clone(),
                server_names: args.server_names.clone(),
                client_names: args.client_names.clone(),
                days: args.days,
                force: args.force,
            })?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(args) => {
            let answered = runtime()?.block_on(query::run(&args))?;
            Ok(if answered {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status(args) => {
            let text = runtime()?
                .block_on(metrics::fetch(
                    &args.addr,
                    std::time::Duration::from_secs(3),
                ))
                .with_context(|| format!("cannot read metrics from {}", args.addr))?;
            print!("{}", metrics::summary(&text));
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(args) => {
            daemon::init_logging(&cli.log_level, cli.log_format);
            let config = config::ClientConfig::from_args(&args)?;
            runtime()?.block_on(async {
                let (shutdown, reload) =
                    daemon::Shutdown::on_signals().context("signal handlers")?;
                client::run(config, args, shutdown, reload).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Server(args) => {
            daemon::init_logging(&cli.log_level, cli.log_format);
            let config = config::ServerConfig::from_args(&args)?;
            runtime()?.block_on(async {
                let (shutdown, reload) =
                    daemon::Shutdown::on_signals().context("signal handlers")?;
                server::run(config, shutdown, reload).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One thread: every relay task owns its sockets and state, and a datagram's whole path runs
/// without a thread hop, which keeps the added delay small and the same in both directions.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
