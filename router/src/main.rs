//! Standalone router binary (the Python package runs the same code through tensorgate._router).

// mimalloc: the router allocates per token (events, texts, frames) from many threads;
// glibc's malloc was ~11 % of its CPU at 256 streams (docs/benchmarks.md, section 1c).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(tensorgate_router::run_main(std::env::args().collect()));
}
