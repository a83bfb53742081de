//! The `iron-proxy` binary; see [`iron_proxy::cli`].

fn main() -> std::process::ExitCode {
    iron_proxy::cli::main()
}
