//! portguard: per-cgroup ephemeral port ranges enforced by eBPF.

use std::process::ExitCode;

use clap::Parser as _;
use portguard::{
    check,
    cli::{Cli, Command},
    daemon, doctor, events, reload, status, uninstall,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match cli.command {
        Command::Daemon(args) => daemon::run(args),
        Command::Check { file } => check::run(&file),
        Command::Doctor {
            json,
            policy,
            nodeport_range,
        } => doctor::run(json, policy.as_deref(), nodeport_range.as_deref()),
        Command::Uninstall { pin_path, cgroup } => uninstall::run(&pin_path, cgroup.as_deref()),
        Command::Reload { socket } => reload::run(&socket).map(|()| ExitCode::SUCCESS),
        Command::Status { json, socket } => status::run(&socket, json).map(|()| ExitCode::SUCCESS),
        Command::Events {
            follow,
            json,
            scope,
            socket,
        } => events::run(&socket, follow, json, scope).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("portguard: {error:#}");
            ExitCode::FAILURE
        }
    }
}
