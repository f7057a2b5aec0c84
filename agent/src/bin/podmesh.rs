//! `podmesh`: the operator's CLI.
fn main() -> std::process::ExitCode {
    podmesh_agent::cli::main()
}
