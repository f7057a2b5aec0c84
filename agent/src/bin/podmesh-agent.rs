//! `podmesh-agent`: the node daemon.
use clap::Parser;
use podmesh_agent::config::AgentArgs;

fn main() -> std::process::ExitCode {
    let args = AgentArgs::parse();
    eprintln!("podmesh-agent: parsed {args:?}; the control plane is not wired yet");
    std::process::ExitCode::from(70)
}
