#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgsidecar::cli::{Cli, Command};

// One allocator for the whole process: see Cargo.toml for why mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.build_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgsidecar: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_logging(&config.logging.format, &config.logging.level);
    // One event loop by default: on a small machine shared with PostgreSQL, cross-thread
    // wake-ups and work stealing cost more CPU per transaction than they win.
    let built = if config.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgsidecar: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(pgsidecar::app::run(cli, config))
}

fn init_logging(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSIDECAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour codes only for a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format.eq_ignore_ascii_case("json") {
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(pgsidecar::logfmt::FlatJson)
            .init();
    } else {
        builder.init();
    }
}
