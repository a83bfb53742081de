//! The `iron-token-broker` command line, built inside the test package so process tests
//! can run it (`CARGO_BIN_EXE_iron-token-broker-e2e`).

fn main() -> std::process::ExitCode {
    iron_broker::cli::main()
}
