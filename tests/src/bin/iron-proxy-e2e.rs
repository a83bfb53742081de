//! The `iron-proxy` command line, built inside the test package so end-to-end tests can
//! run it as a separate process (`CARGO_BIN_EXE_iron-proxy-e2e`).

fn main() -> std::process::ExitCode {
    iron_proxy::cli::main()
}
