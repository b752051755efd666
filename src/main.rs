//! The `orderflow` binary: everything lives in the library; see `orderflow::cli`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow::cli::run().await
}
