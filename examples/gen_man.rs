//! Writes the man pages of ntp-dtls into the directory given as the only argument (created if
//! missing): `ntp-dtls.1` and one `ntp-dtls-COMMAND.1` per subcommand, generated from the clap
//! definitions with FILES, CONFIGURATION, SIGNALS, EXIT STATUS and EXAMPLES sections added, and
//! `ntp-dtls.toml.5` for both configuration files (examples/man/mod.rs). `make man` runs it:
//!
//!     cargo run --release --example gen_man -- target/man

mod man;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen_man OUT_DIR");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    match man::write_all(&out) {
        Ok(written) => {
            let mut names: Vec<String> = written
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            names.sort();
            println!("gen_man: wrote {} in {}", names.join(" "), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen_man: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
