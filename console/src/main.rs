//! `vmiscope`: an interactive, debugger-style VM introspection console on KVM.

use vmiscope::{batch, bench, caps, cli, symbols_cmd};

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(cli.command, None | Some(cli::Command::Run(_))) {
        // Before anything else of a run: from here on SIGINT, SIGTERM and SIGHUP
        // end it with its stop summary and a complete journal instead of killing
        // the process. (`images`, `caps` and `bench` keep the default: a signal
        // ends them at once.)
        vmiscope_vmm::signals::install();
    }
    let code = match cli.command {
        None => batch::run_default(),
        Some(cli::Command::Images(a)) => cli::images(&a),
        Some(cli::Command::Run(a)) => batch::run(&a),
        Some(cli::Command::Caps(a)) => caps::run(&a),
        Some(cli::Command::Bench(a)) => bench::run(&a),
        Some(cli::Command::Symbols(a)) => symbols_cmd::symbols(&a),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
