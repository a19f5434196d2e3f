//! Prometheus metrics: names, help texts and buckets in one place. The recorder is installed
//! once per process; recording before that (unit tests) is a no-op.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "tensorgate_requests_total";
pub const REQUEST_DURATION: &str = "tensorgate_request_duration_seconds";
pub const QUEUE_DURATION: &str = "tensorgate_queue_duration_seconds";
pub const QUEUE_TIMEOUTS: &str = "tensorgate_queue_timeouts_total";
pub const TTFT: &str = "tensorgate_time_to_first_token_seconds";
pub const ITL: &str = "tensorgate_inter_token_latency_seconds";
pub const GENERATION_DURATION: &str = "tensorgate_generation_duration_seconds";
pub const INPUT_TOKENS: &str = "tensorgate_input_tokens";
pub const OUTPUT_TOKENS: &str = "tensorgate_output_tokens";
pub const FINISHED: &str = "tensorgate_generations_total";
pub const IN_FLIGHT: &str = "tensorgate_requests_in_flight";
pub const QUEUED: &str = "tensorgate_requests_queued";
pub const RUNNING: &str = "tensorgate_requests_running";
pub const RESERVED_TOKENS: &str = "tensorgate_reserved_tokens";
pub const TOKEN_BUDGET: &str = "tensorgate_token_budget";
pub const ADMITTED_BATCH: &str = "tensorgate_admitted_batch_size";
pub const EXECUTOR_BATCH: &str = "tensorgate_executor_batch_size";
pub const EXECUTOR_QUEUED: &str = "tensorgate_executor_queued_requests";
pub const KV_USAGE: &str = "tensorgate_kv_cache_usage_ratio";
pub const EXECUTOR_ITERATION: &str = "tensorgate_executor_iteration_seconds";
pub const EXECUTOR_CONNECTED: &str = "tensorgate_executor_connected";
pub const WORKER_HEALTHY: &str = "tensorgate_worker_healthy";
pub const WORKER_IN_FLIGHT: &str = "tensorgate_worker_requests_in_flight";
pub const WORKER_ROUTED: &str = "tensorgate_worker_requests_routed_total";
pub const WORKER_PROMPT_TOKENS: &str = "tensorgate_worker_prompt_tokens_total";
pub const WORKER_CACHED_TOKENS: &str = "tensorgate_worker_cached_prompt_tokens_total";
pub const MIGRATIONS: &str = "tensorgate_migrations_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder (idempotent) and returns the handle `/metrics` renders.
pub fn install() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ADMITTED_BATCH.into()), BATCH_BUCKETS))
        .map_err(|e| format!("metrics buckets: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    let _ = HANDLE.set(handle.clone());
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

fn describe() {
    describe_counter!(REQUESTS, "HTTP requests answered, by route and status code");
    describe_histogram!(
        REQUEST_DURATION,
        "Time from request to response headers, by route (streams: to the first byte)"
    );
    describe_histogram!(
        QUEUE_DURATION,
        "Time a request waited for admission in the router"
    );
    describe_counter!(
        QUEUE_TIMEOUTS,
        "Requests refused with 503 after --max-queue-wait-ms"
    );
    describe_histogram!(
        TTFT,
        "Time from admission request to the first generated token"
    );
    describe_histogram!(
        ITL,
        "Time between consecutive generated tokens of one request"
    );
    describe_histogram!(
        GENERATION_DURATION,
        "Time from admission request to the last token"
    );
    describe_histogram!(INPUT_TOKENS, "Prompt tokens per generation");
    describe_histogram!(OUTPUT_TOKENS, "Generated tokens per generation");
    describe_counter!(
        FINISHED,
        "Generations ended, by finish reason (length, eos_token, stop_sequence, cancelled, error)"
    );
    describe_gauge!(
        IN_FLIGHT,
        "Generation requests in the router (queued or running)"
    );
    describe_gauge!(QUEUED, "Requests waiting for admission");
    describe_gauge!(RUNNING, "Requests admitted to the executor");
    describe_gauge!(
        RESERVED_TOKENS,
        "Tokens reserved by running requests (prompt + max_new_tokens)"
    );
    describe_gauge!(
        TOKEN_BUDGET,
        "Tokens running requests may reserve together (--max-batch-total-tokens)"
    );
    describe_histogram!(
        ADMITTED_BATCH,
        "Requests admitted together in one scheduling tick (one executor message)"
    );
    describe_gauge!(
        EXECUTOR_BATCH,
        "Requests active in the executor's batch (from Stats)"
    );
    describe_gauge!(
        EXECUTOR_QUEUED,
        "Requests queued inside the executor (from Stats)"
    );
    describe_gauge!(
        KV_USAGE,
        "Fraction of the KV cache blocks in use (from Stats)"
    );
    describe_gauge!(
        EXECUTOR_ITERATION,
        "Duration of the executor's last iteration (from Stats)"
    );
    describe_gauge!(
        EXECUTOR_CONNECTED,
        "1 while the router holds a Generate stream to the executor (per worker)"
    );
    describe_gauge!(
        WORKER_HEALTHY,
        "1 while the worker is connected and passes its health checks (routed to)"
    );
    describe_gauge!(
        WORKER_IN_FLIGHT,
        "Requests sent to the worker and not finished"
    );
    describe_counter!(
        WORKER_ROUTED,
        "Requests the routing policy sent to the worker"
    );
    describe_counter!(WORKER_PROMPT_TOKENS, "Prompt tokens sent to the worker");
    describe_counter!(
        WORKER_CACHED_TOKENS,
        "Prompt tokens the worker served from its prefix cache (RequestOutput.cached_tokens)"
    );
    describe_counter!(
        MIGRATIONS,
        "Requests a lost worker left unfinished, by outcome (moved, refused, no_worker)"
    );
}

pub fn record_request(route: &str, status: u16, elapsed: Duration) {
    let route = route.to_string();
    counter!(REQUESTS, "route" => route.clone(), "status" => status.to_string()).increment(1);
    histogram!(REQUEST_DURATION, "route" => route).record(elapsed.as_secs_f64());
}

pub fn record_queue_time(d: Duration) {
    histogram!(QUEUE_DURATION).record(d.as_secs_f64());
}

pub fn record_queue_timeout() {
    counter!(QUEUE_TIMEOUTS).increment(1);
}

pub fn record_admitted_batch(n: usize) {
    histogram!(ADMITTED_BATCH).record(n as f64);
}

pub fn set_scheduler_state(queued: usize, running: usize, reserved: u64) {
    gauge!(QUEUED).set(queued as f64);
    gauge!(RUNNING).set(running as f64);
    gauge!(RESERVED_TOKENS).set(reserved as f64);
}

pub fn set_token_budget(budget: u64) {
    gauge!(TOKEN_BUDGET).set(budget as f64);
}

pub fn in_flight_inc() {
    gauge!(IN_FLIGHT).increment(1.0);
}

pub fn in_flight_dec() {
    gauge!(IN_FLIGHT).decrement(1.0);
}

pub fn record_first_token(d: Duration) {
    histogram!(TTFT).record(d.as_secs_f64());
}

pub fn record_inter_token(d: Duration) {
    histogram!(ITL).record(d.as_secs_f64());
}

pub fn record_generation_end(
    reason: &'static str,
    input_tokens: u32,
    output_tokens: u32,
    d: Duration,
) {
    counter!(FINISHED, "reason" => reason).increment(1);
    histogram!(INPUT_TOKENS).record(f64::from(input_tokens));
    histogram!(OUTPUT_TOKENS).record(f64::from(output_tokens));
    histogram!(GENERATION_DURATION).record(d.as_secs_f64());
}

pub fn set_executor_connected(worker: &str, connected: bool) {
    gauge!(EXECUTOR_CONNECTED, "worker" => worker.to_string()).set(if connected {
        1.0
    } else {
        0.0
    });
}

pub fn set_worker_healthy(worker: &str, healthy: bool) {
    gauge!(WORKER_HEALTHY, "worker" => worker.to_string()).set(if healthy { 1.0 } else { 0.0 });
}

/// The pool's own counts of a worker (absolute: counters are set, not incremented, from the
/// atomics the request path keeps, so that no label lookup happens per request).
pub fn set_worker_load(worker: &str, in_flight: u32, prompt_tokens: u64, cached_tokens: u64) {
    gauge!(WORKER_IN_FLIGHT, "worker" => worker.to_string()).set(f64::from(in_flight));
    counter!(WORKER_PROMPT_TOKENS, "worker" => worker.to_string()).absolute(prompt_tokens);
    counter!(WORKER_CACHED_TOKENS, "worker" => worker.to_string()).absolute(cached_tokens);
}

pub fn record_routed(worker: &str, n: usize) {
    counter!(WORKER_ROUTED, "worker" => worker.to_string()).increment(n as u64);
}

pub fn record_migration(outcome: &'static str) {
    counter!(MIGRATIONS, "outcome" => outcome).increment(1);
}

pub fn set_executor_stats(worker: &str, s: &crate::pb::StatsResponse) {
    let worker = worker.to_string();
    gauge!(EXECUTOR_BATCH, "worker" => worker.clone()).set(f64::from(s.active_requests));
    gauge!(EXECUTOR_QUEUED, "worker" => worker.clone()).set(f64::from(s.queued_requests));
    let total = s.kv_blocks_used + s.kv_blocks_free;
    let usage = if total == 0 {
        0.0
    } else {
        s.kv_blocks_used as f64 / total as f64
    };
    gauge!(KV_USAGE, "worker" => worker.clone()).set(usage);
    gauge!(EXECUTOR_ITERATION, "worker" => worker).set(f64::from(s.last_iteration_ms) / 1000.0);
}
