//! The `nodelens` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodelens::config::{self, Config, Settings};

/// Kubernetes node agent for AI workloads: container logs to Elasticsearch, GPU metrics
/// attributed to pods, applications and users.
#[derive(Parser)]
#[command(name = "nodelens", version, about)]
struct Cli {
    /// YAML config file (default: built-in defaults). Also `NODELENS_CONFIG`.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the config and print the effective result; exit 2 on errors.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.or_else(|| std::env::var_os("NODELENS_CONFIG").map(PathBuf::from));
    let config = match config::load(path.as_deref(), std::env::vars()).and_then(Config::validate) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("nodelens: config error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", config.to_yaml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
    }
}

fn run(config: Settings) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!("nodelens: log_level `{}` is not a valid filter ({e}); using info", config.log_level);
        tracing_subscriber::EnvFilter::new("info")
    });
    // Logs go to stderr: stdout belongs to the stdout sink.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    raise_open_files_limit();
    nodelens::memory::limit_arenas();
    let runtime = match nodelens::agent::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodelens: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nodelens::agent::run(config, signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one: the tailer holds files of many
/// containers open, and the usual soft limit of 1024 is reached at about a thousand pods.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open files limit (RLIMIT_NOFILE)");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::debug!(limit = limit.rlim_cur, "open files limit already at its hard limit");
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads only the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            "cannot raise the open files limit (RLIMIT_NOFILE) to its hard limit"
        );
        return;
    }
    tracing::debug!(limit = raised.rlim_cur, "open files limit raised to its hard limit");
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    fn open_files_limit() -> libc::rlimit {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes only the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        limit
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let before = open_files_limit();
        let lowered = libc::rlimit { rlim_cur: before.rlim_max.min(256), rlim_max: before.rlim_max };
        // SAFETY: setrlimit reads only the struct it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        super::raise_open_files_limit();
        let after = open_files_limit();
        assert_eq!((after.rlim_cur, after.rlim_max), (before.rlim_max, before.rlim_max));
    }
}
