use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ntp_dtls::cli::Cli::parse();
    let format = cli.log_format;
    match ntp_dtls::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, the whole chain of causes: what failed and why (JSON with
            // --log-format json, like the log lines).
            eprintln!("{}", ntp_dtls::ops::daemon::error_line(format, &error));
            ExitCode::FAILURE
        }
    }
}
