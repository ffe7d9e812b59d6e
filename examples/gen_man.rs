//! Writes the man pages of ntp-dtls, generated from its clap definitions: `ntp-dtls.1` and one
//! `ntp-dtls-COMMAND.1` per subcommand, into the directory given as the only argument (created
//! if missing). `make deb` and `make install` run it:
//!
//!     cargo run --release --example gen_man -- target/man

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen_man OUT_DIR");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    let result = std::fs::create_dir_all(&out)
        .and_then(|()| clap_mangen::generate_to(ntp_dtls::cli::Cli::command(), &out));
    if let Err(e) = result {
        eprintln!("gen_man: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let mut pages: Vec<_> = std::fs::read_dir(&out)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|name| name.ends_with(".1"))
                .collect()
        })
        .unwrap_or_default();
    pages.sort();
    println!("gen_man: wrote {} in {}", pages.join(" "), out.display());
    ExitCode::SUCCESS
}
