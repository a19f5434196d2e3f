//! Startup: parse the configuration, load the tokenizer and template, connect to the
//! executor, wire the scheduler and the HTTP app, serve until drained.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Config};
use crate::errors::StartupError;
use crate::executors::control::ControlRpc;
use crate::executors::endpoint::Credentials;
use crate::executors::pool::{ExecutorHandle, PoolConfig};
use crate::executors::scheduler;
use crate::generation::{chat_template, control, guided, infer, tokenizer, validation};
use crate::http::{self, tgi::schemas};
use crate::{lifecycle, metrics, pb};

/// Runs the router to completion and returns the process exit code.
/// `argv[0]` is the program name, as in `std::env::args`.
pub fn run_main(argv: Vec<String>) -> i32 {
    let config = match Config::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_tracing(config.json_output);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tensorgate-router: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tensorgate-router: {e}");
            1
        }
    }
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

async fn run(config: Config) -> Result<(), StartupError> {
    // Refused before anything starts: a control plane without its key must not come up.
    let rl = config.rl_control().map_err(StartupError::Config)?;
    // First: everything after it (the executor client included) records metrics.
    let metrics_handle = metrics::install().map_err(StartupError::Metrics)?;
    {
        // install_recorder leaves upkeep to us: without it, histogram samples pile up between
        // scrapes (one per token for ITL), and an unscraped router grows without bound.
        let handle = metrics_handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
    let tokenizer =
        tokenizer::TextTokenizer::load(&config.tokenizer).map_err(StartupError::Tokenizer)?;
    let template_dir = if config.tokenizer.is_dir() {
        config.tokenizer.clone()
    } else {
        config
            .tokenizer
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default()
    };
    let chat_template = chat_template::ChatTemplate::load(&template_dir)
        .map_err(StartupError::Template)?
        .map(|t| t.with_tool_call_parser(config.tool_call_parser));
    if let Some(t) = &chat_template {
        tracing::info!(tool_call_parser = t.tool_call_format().name(), "tool calls");
    }
    if config.prompt_format == config::PromptFormat::Chat && chat_template.is_none() {
        return Err(StartupError::Config(format!(
            "--prompt-format chat needs a chat template, and {} has none",
            template_dir.display()
        )));
    }
    let credentials = Credentials::new(
        config.executor_tls_ca.as_deref(),
        config.executor_secret.as_deref(),
        config.executor_tls_domain.clone(),
    )
    .map_err(|e| StartupError::Config(e.to_string()))?;
    let executor = ExecutorHandle::start(PoolConfig {
        addresses: config.executors(),
        credentials,
        routing: config.routing,
        load_weight: config.routing_load_weight,
        migration_limit: config.migration_limit,
        discovery_interval: Duration::from_secs(config.discovery_interval_s),
        health_interval: Duration::from_millis(config.stats_interval_ms.max(50)),
    })
    .map_err(|e| StartupError::Config(e.to_string()))?;
    let info = fetch_info(
        &executor,
        Duration::from_secs(config.executor_startup_timeout_s),
    )
    .await?;
    executor.set_reference(&info);

    let limits = info.limits.unwrap_or_default();
    let max_total_tokens = lower(limits.max_total_tokens, config.max_total_tokens);
    let max_input_tokens = lower(limits.max_input_tokens, config.max_input_tokens)
        .min(max_total_tokens.saturating_sub(1));
    if max_input_tokens == 0 {
        return Err(StartupError::Executor(format!(
            "the executor reports max_total_tokens={max_total_tokens}: no room for a prompt"
        )));
    }
    let limits = validation::Limits {
        max_input_tokens,
        max_total_tokens,
        max_top_n_tokens: limits.max_top_n_tokens,
        max_stop_sequences: config.max_stop_sequences,
        max_stop_sequence_bytes: config.max_stop_sequence_bytes,
        max_best_of: config.max_best_of,
        vocab_size: info.vocab_size,
        features: info.features.unwrap_or_default(),
    };
    let public_info = schemas::Info {
        model_id: config.model_id.clone().unwrap_or(info.model_id.clone()),
        engine: info.engine.clone(),
        model_dtype: info.dtype.clone(),
        model_device_type: info.device.clone(),
        max_concurrent_requests: config.max_concurrent_requests,
        max_best_of: config.max_best_of,
        max_stop_sequences: config.max_stop_sequences,
        max_input_tokens,
        max_total_tokens,
        max_batch_size: info.limits.map(|l| l.max_batch_size).unwrap_or(0),
        max_top_n_tokens: limits.max_top_n_tokens,
        kv_capacity_tokens: info.kv_capacity_tokens,
        prompt_format: config.prompt_format,
        router: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        weight_version: info.weight_version.clone(),
        released_memory_tags: info.released_memory_tags.clone(),
        rl_control: {
            let c = info.control.clone().unwrap_or_default();
            schemas::RlControlInfo {
                enabled: rl.is_some(),
                memory_tags: c.memory_tags,
                update_from_disk: c.update_from_disk,
                update_from_tensors: c.update_from_tensors,
                update_from_cuda_ipc: c.update_from_cuda_ipc,
                flush_cache: c.flush_cache,
                pause_in_place: c.pause_in_place,
            }
        },
        routing: executor.routing(),
        workers: Vec::new(),
    };
    let token_budget = token_budget(config.max_batch_total_tokens, info.kv_capacity_tokens)?;
    let scheduler = scheduler::Scheduler::spawn(
        executor.clone(),
        scheduler::SchedulerConfig {
            token_budget,
            max_batch_size: public_info.max_batch_size as usize,
            max_queue_wait: Duration::from_millis(config.max_queue_wait_ms),
        },
    );
    // Admission is sized by the fleet: each healthy worker adds its budget and batch size.
    scheduler.follow_pool(
        executor.healthy_workers(),
        token_budget,
        public_info.max_batch_size as usize,
    );
    let grammar = if limits.features.guided_decoding {
        Some(grammar_compiler(&config.tokenizer, &info)?)
    } else {
        None
    };
    let control = Arc::new(control::Control::new(
        ControlRpc::new(
            executor.clone(),
            rl.as_ref().map_or(0, |r| r.max_payload_bytes),
            info.engine.clone(),
        ),
        executor.clone(),
        scheduler.clone(),
        &info,
    ));
    control.follow_reconnects();
    if let Some(why) = control.sleeping() {
        tracing::warn!("{why}");
    }
    let infer = infer::Infer::new(
        executor,
        scheduler,
        tokenizer,
        chat_template,
        config.prompt_format == config::PromptFormat::Chat,
        limits,
        config.max_concurrent_requests,
        control,
    );
    let infer = Arc::new(match grammar {
        Some(g) => infer.with_grammar(g),
        None => infer,
    });
    let lifecycle = lifecycle::Lifecycle::default();
    let state = http::AppState {
        infer: infer.clone(),
        info: Arc::new(public_info),
        metrics: metrics_handle,
        lifecycle: lifecycle.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let app = http::router(
        state,
        &http::HttpOptions {
            payload_limit: config.payload_limit,
            api_key: config.api_key.clone(),
            cors_allow_origins: config.cors_allow_origins.clone(),
            rl: rl.clone(),
        },
    )?;
    let addr = std::net::SocketAddr::new(config.hostname, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })?;
    tracing::info!(%addr, engine = %info.engine, model = %info.model_id, max_input_tokens, max_total_tokens, token_budget, rl_control = rl.is_some(), "serving");
    let timeout = Duration::from_secs(config.shutdown_timeout);
    let drained = Arc::new(tokio::sync::Notify::new());
    let drain = {
        let drained = drained.clone();
        async move {
            lifecycle::drain_on_signal(lifecycle, infer, timeout).await;
            drained.notify_one();
        }
    };
    // Token streams are many small writes: without TCP_NODELAY, Nagle's algorithm and the
    // client's delayed ACK hold the first event of a request on a reused connection ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let serve = axum::serve(listener, app).with_graceful_shutdown(drain);
    tokio::select! {
        r = serve => r.map_err(StartupError::Serve),
        // Connections still open after the drain (idle keep-alives, a stream past the
        // timeout) get a moment, then the process ends regardless.
        _ = async {
            drained.notified().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    }
}

fn lower(executor: u32, flag: Option<u32>) -> u32 {
    flag.map_or(executor, |f| f.min(executor))
}

/// The grammar compiler of the served tokenizer (llguidance reads tokenizer.json itself).
fn grammar_compiler(
    tokenizer: &std::path::Path,
    info: &pb::InfoResponse,
) -> Result<guided::GrammarCompiler, StartupError> {
    let file = if tokenizer.is_dir() {
        tokenizer.join("tokenizer.json")
    } else {
        tokenizer.to_path_buf()
    };
    let json: serde_json::Value = std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| StartupError::Tokenizer(format!("{}: {e}", file.display())))?;
    let eos = info.eos_token_ids.first().copied().unwrap_or(0);
    guided::GrammarCompiler::from_tokenizer_json(&json, eos).map_err(StartupError::Tokenizer)
}

/// The token budget of admission: the flag, or the engine's KV capacity. An engine that
/// reports none leaves no budget to enforce, and the router will not run without one.
fn token_budget(flag: Option<u64>, kv_capacity_tokens: u64) -> Result<u64, StartupError> {
    match (flag, kv_capacity_tokens) {
        (Some(0), _) => Err(StartupError::Config(
            "--max-batch-total-tokens must be at least 1".into(),
        )),
        (Some(budget), _) => Ok(budget),
        (None, 0) => Err(StartupError::Executor(
            "the executor reports no KV cache capacity (kv_capacity_tokens = 0), so admission \
             control has no token budget: pass --max-batch-total-tokens"
                .into(),
        )),
        (None, capacity) => Ok(capacity),
    }
}

async fn fetch_info(
    executor: &ExecutorHandle,
    wait: Duration,
) -> Result<pb::InfoResponse, StartupError> {
    let start = Instant::now();
    loop {
        let error = match executor.client().await {
            Ok(mut client) => match client.info(pb::InfoRequest {}).await {
                Ok(info) => return Ok(info.into_inner()),
                // Not something waiting mends: said at once.
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    return Err(StartupError::Executor(format!(
                        "the executor refused the router's shared secret \
                         (TENSORGATE_EXECUTOR_SECRET): {}",
                        status.message()
                    )))
                }
                Err(status) => status.message().to_string(),
            },
            Err(e) => e,
        };
        if start.elapsed() > wait {
            return Err(StartupError::Executor(format!(
                "no executor answered Info within {wait:?} (--executor-startup-timeout-s): {error}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_kv_capacity_needs_the_flag() {
        let e = token_budget(None, 0).expect_err("no budget");
        assert!(e.to_string().contains("--max-batch-total-tokens"), "{e}");
        assert_eq!(token_budget(Some(4096), 0).ok(), Some(4096));
        assert_eq!(token_budget(None, 8192).ok(), Some(8192));
        assert_eq!(token_budget(Some(100), 8192).ok(), Some(100));
        assert!(token_budget(Some(0), 8192).is_err());
    }
}
