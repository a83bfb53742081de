//! `iron-token-broker`: see [`iron_broker::daemon`].

fn main() -> std::process::ExitCode {
    iron_broker::cli::main()
}
