use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = permgate::cli::Cli::parse();
    match permgate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("permgate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
