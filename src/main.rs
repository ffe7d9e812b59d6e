use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ntp_dtls::cli::Cli::parse();
    match ntp_dtls::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, the whole chain of causes: what failed and why.
            eprintln!("ntp-dtls: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
