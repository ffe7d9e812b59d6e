//! ntp-dtls: NTP over DTLS 1.2, one NTP datagram per DTLS record.
//!
//! The protocol logic lives in the `ntp-dtls-proto` crate (sans I/O: no sockets, no clocks, no
//! tasks). This crate holds what drives it and what an operator touches:
//! - [`relay`]: the shells, the client relay's tunnels and the server relay's workers, with the
//!   datagram I/O and the one timer each loop has;
//! - [`query`]: `ntp-dtls query`, a one-shot NTP client, plain or over DTLS;
//! - [`config`] and [`cli`]: flags and TOML files turned into validated settings;
//! - [`pki`]: `ntp-dtls certs`, and loading certificates and keys from files;
//! - [`ops`]: logs, signals and readiness, metrics, privilege drop.

pub mod cli;
pub mod config;
pub mod ops;
pub mod pki;
pub mod query;
pub mod relay;

pub use ntp_dtls_proto as proto;
use std::process::ExitCode;

use anyhow::Context;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs(args) => {
            let key_type = match args.key_type {
                cli::KeyTypeArg::EcdsaP256 => pki::KeyType::EcdsaP256,
                cli::KeyTypeArg::EcdsaP384 => pki::KeyType::EcdsaP384,
                cli::KeyTypeArg::Rsa3072 => pki::KeyType::Rsa3072,
            };
            let written = match args.request {
                Some(role) => {
                    let (role, names) = match role {
                        cli::RequestRole::Server => {
                            (pki::RequestRole::Server, args.server_names.clone())
                        }
                        cli::RequestRole::Client => {
                            (pki::RequestRole::Client, args.client_names.clone())
                        }
                    };
                    pki::generate_request(&pki::CsrRequest {
                        out_dir: args.out.clone(),
                        role,
                        names,
                        key_type,
                        force: args.force,
                    })?
                }
                None => pki::generate_lab_pki(&pki::LabPkiRequest {
                    out_dir: args.out.clone(),
                    server_names: args.server_names.clone(),
                    client_names: args.client_names.clone(),
                    days: args.days,
                    force: args.force,
                    key_type,
                })?,
            };
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
            print!("{}", runtime()?.block_on(ops::status::run(&args.addr))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(args) if args.daemon.check => ops::check::client(&args),
        Command::Server(args) if args.daemon.check => ops::check::server(&args),
        Command::Client(args) => {
            ops::daemon::init_logging(&cli.log_level, cli.log_format);
            let config = config::ClientConfig::from_args(&args)?;
            runtime()?.block_on(async {
                let (shutdown, reload) =
                    ops::daemon::Shutdown::on_signals().context("signal handlers")?;
                relay::client::run(config, args, shutdown, reload).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Server(args) => {
            ops::daemon::init_logging(&cli.log_level, cli.log_format);
            let config = config::ServerConfig::from_args(&args)?;
            runtime()?.block_on(async {
                let (shutdown, reload) =
                    ops::daemon::Shutdown::on_signals().context("signal handlers")?;
                relay::server::run(config, shutdown, reload).await
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
