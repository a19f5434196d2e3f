//! sse-probe: a lean streaming load client for tensorgate's stack-overhead benchmark.
//!
//! aiperf is the harness's load generator. On a 2-core machine a Python client cannot read
//! 256 streams at 50 tokens/s each without becoming the bottleneck, which hides what the
//! server adds to time to first token. This client does the same measurement (TTFT, ITL
//! between SSE events, output tokens) on one thread, closed-loop at a fixed concurrency or
//! open-loop with Poisson arrivals, and prints one JSON object.

mod load;
mod sse;
mod stats;

use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Route {
    /// POST /v1/chat/completions with stream: true
    Chat,
    /// POST /generate_stream (TGI)
    Generate,
}

#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    #[arg(long, value_enum, default_value = "chat")]
    pub route: Route,
    /// Closed loop: this many requests in flight at all times.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests to complete (measured).
    #[arg(long, default_value_t = 256)]
    pub requests: usize,
    /// Requests sent first and not measured (connections, caches).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Prompt length in words ("hello" repeated: about one token each).
    #[arg(long, default_value_t = 32)]
    pub input_words: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Model name sent on the chat route.
    #[arg(long, default_value = "tensorgate")]
    pub model: String,
    /// Tokio worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.concurrency.is_none() && args.rate.is_none() {
        eprintln!("sse-probe: give --concurrency N (closed loop) or --rate R (Poisson arrivals)");
        return std::process::ExitCode::from(2);
    }
    if args.concurrency == Some(0) || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        eprintln!("sse-probe: --concurrency must be at least 1 and --rate a positive number");
        return std::process::ExitCode::from(2);
    }
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sse-probe: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(load::run(&args, Duration::from_secs(args.timeout_s))) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sse-probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
