//! Standalone router binary (the Python package runs the same code through tensorgate._router).

fn main() {
    std::process::exit(tensorgate_router::run_main(std::env::args().collect()));
}
