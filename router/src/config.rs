//! All router settings in one struct, parsed from the command line or the environment.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::executors::endpoint::ExecutorAddress;
use crate::executors::routing::policy::RoutingKind;
use crate::generation::tool_parsers::ToolCallParser;

#[derive(Parser, Debug, Clone)]
#[command(name = "tensorgate-router", version, about = "tensorgate HTTP router")]
pub struct Config {
    /// Address to bind. 0.0.0.0 (all interfaces) as in TGI, so that `docker run -p` works.
    #[arg(long, env = "TENSORGATE_HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: IpAddr,

    /// HTTP port.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Unix socket of the executor's gRPC server (one executor; the same as
    /// `--executor unix://PATH`).
    #[arg(
        long,
        env = "TENSORGATE_EXECUTOR_SOCKET",
        required_unless_present = "executor"
    )]
    pub executor_socket: Option<PathBuf>,

    /// An executor of the pool: `unix:///path/to/socket`, or `https://host:port` (TLS and the
    /// shared secret; a DNS name is re-resolved every --discovery-interval-s and each of its
    /// addresses is a worker). Repeatable.
    #[arg(long = "executor", value_name = "URL")]
    pub executor: Vec<ExecutorAddress>,

    /// PEM file of the CA that signed the https executors' certificates.
    #[arg(long)]
    pub executor_tls_ca: Option<PathBuf>,

    /// The name the executors' certificates carry, when it is not the URL's host.
    #[arg(long)]
    pub executor_tls_domain: Option<String>,

    /// The secret shared with https executors (sent as `authorization: Bearer …`). By
    /// environment only, never on a command line.
    #[arg(skip = std::env::var("TENSORGATE_EXECUTOR_SECRET").ok())]
    pub executor_secret: Option<String>,

    /// How requests are spread over the executors: kv-aware (the worker that holds most of the
    /// prompt's prefix, weighed against its load), least-load or round-robin.
    #[arg(long, value_enum, default_value_t = RoutingKind::KvAware)]
    pub routing: RoutingKind,

    /// kv-aware: how much a token of a worker's load weighs against a token of prefill.
    #[arg(long, default_value_t = 1.0)]
    pub routing_load_weight: f64,

    /// Times a request may move to another executor after losing its own (0: never; such a
    /// request then ends with an error event).
    #[arg(long, default_value_t = 3)]
    pub migration_limit: u32,

    /// How long to wait at start for an executor to answer (one loading a large model, or
    /// started alongside the router, as on Kubernetes).
    #[arg(long, default_value_t = 600)]
    pub executor_startup_timeout_s: u64,

    /// How often https executor names are resolved again (workers join and leave).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub discovery_interval_s: u64,

    /// Directory holding tokenizer.json (and tokenizer_config.json), or a tokenizer.json file.
    #[arg(long, env = "TENSORGATE_TOKENIZER")]
    pub tokenizer: PathBuf,

    /// Model name reported by /info; defaults to what the executor reports.
    #[arg(long)]
    pub model_id: Option<String>,

    /// Lower the executor's prompt limit (never raise it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_input_tokens: Option<u32>,

    /// Lower the executor's prompt + generation limit (never raise it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_total_tokens: Option<u32>,

    /// Most stop sequences one request may carry.
    #[arg(long, default_value_t = 4)]
    pub max_stop_sequences: usize,

    /// Most sequences one TGI `best_of` request may sample (1 turns `best_of` off), as TGI's
    /// launcher flag; each reserves its own prompt + max_new_tokens.
    #[arg(long, env = "MAX_BEST_OF", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_best_of: u32,

    /// Longest stop sequence, in bytes.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub max_stop_sequence_bytes: usize,

    /// Requests in flight beyond which new ones are refused with 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128, value_parser = at_least_one)]
    pub max_concurrent_requests: usize,

    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 2_000_000, value_parser = at_least_one)]
    pub payload_limit: usize,

    /// How `inputs` of the TGI routes become a prompt: `raw` (TGI's behaviour) or `chat`
    /// (as one user message through the model's chat template, for instruct models that
    /// end at once on raw text).
    #[arg(long, value_enum, default_value_t = PromptFormat::Raw)]
    pub prompt_format: PromptFormat,

    /// How the model writes tool calls (`tools` on /v1/chat/completions): `hermes`
    /// (`<tool_call>` JSON: Hermes, Qwen), `llama3_json` (Llama 3.x), `mistral`
    /// (`[TOOL_CALLS]`), or `auto`: detected from the chat template (hermes when it shows none).
    #[arg(long, value_enum, default_value_t = ToolCallParser::Auto)]
    pub tool_call_parser: ToolCallParser,

    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,

    /// Tokens (prompt + max_new_tokens) that running requests may reserve together; requests
    /// beyond it wait in the admission queue. Default: the executor's KV cache capacity.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_total_tokens: Option<u64>,

    /// Longest a request may wait for admission before it is refused with 503.
    #[arg(long, default_value_t = 60_000)]
    pub max_queue_wait_ms: u64,

    /// On SIGTERM/SIGINT: new requests get 503 while those in flight get this long to finish.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "TENSORGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Origins allowed by CORS (repeatable; `*` for any). CORS is off when none is given.
    #[arg(
        long = "cors-allow-origin",
        env = "TENSORGATE_CORS_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,

    /// How often the executor's Stats are read into the metrics.
    #[arg(long, default_value_t = 1000)]
    pub stats_interval_ms: u64,

    /// Serve the rollout-control routes (/release_memory, /update_weights, /pause_generation,
    /// ...: docs/api.md, "Rollout control"). Off: those routes do not exist (404).
    #[arg(long)]
    pub enable_rl_control: bool,

    /// The key the rollout-control routes require (`Authorization: Bearer KEY`), never the
    /// --api-key. Required with --enable-rl-control.
    #[arg(long, env = "TENSORGATE_RL_CONTROL_KEY", hide_env_values = true)]
    pub rl_control_key: Option<String>,

    /// Largest body of a rollout-control route, in bytes (weight payloads; 413 beyond). The
    /// executor calls that carry them get the same message limit.
    #[arg(long, default_value_t = 1 << 30, value_parser = at_least_one)]
    pub rl_max_payload_bytes: usize,
}

/// The rollout-control settings in force, when the routes are on.
#[derive(Debug, Clone)]
pub struct RlControl {
    pub key: String,
    pub max_payload_bytes: usize,
}

impl Config {
    /// The executors: every --executor, then --executor-socket.
    pub fn executors(&self) -> Vec<ExecutorAddress> {
        let mut all = self.executor.clone();
        if let Some(socket) = &self.executor_socket {
            all.push(ExecutorAddress::Unix(socket.clone()));
        }
        all
    }

    /// None when the control routes are off; an error naming the flag when they are on
    /// without a usable key.
    pub fn rl_control(&self) -> Result<Option<RlControl>, String> {
        if !self.enable_rl_control {
            if self.rl_control_key.is_some() {
                tracing::warn!(
                    "--rl-control-key is set but --enable-rl-control is not: no control route is served"
                );
            }
            return Ok(None);
        }
        let key = match self.rl_control_key.as_deref().map(str::trim) {
            None | Some("") => {
                return Err(
                    "--enable-rl-control needs --rl-control-key KEY (or the environment \
                     variable TENSORGATE_RL_CONTROL_KEY): the control routes change the served \
                     weights and must not be open"
                        .into(),
                )
            }
            Some(k) => k.to_string(),
        };
        if self.api_key.as_deref().map(str::trim) == Some(key.as_str()) {
            return Err(
                "--rl-control-key must differ from --api-key: whoever may generate \
                 must not thereby be able to replace the weights"
                    .into(),
            );
        }
        Ok(Some(RlControl {
            key,
            max_payload_bytes: self.rl_max_payload_bytes,
        }))
    }
}

/// A size flag that 0 would break (no body, no request in flight, no stop sequence).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Raw,
    Chat,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec![
            "tensorgate-router",
            "--executor-socket",
            "/tmp/x.sock",
            "--tokenizer",
            "/tmp/t",
        ];
        argv.extend_from_slice(extra);
        Config::try_parse_from(argv)
    }

    #[test]
    fn sizes_of_zero_are_refused_naming_the_flag() {
        for flag in [
            "--max-input-tokens",
            "--max-total-tokens",
            "--max-stop-sequence-bytes",
            "--max-concurrent-requests",
            "--payload-limit",
            "--max-batch-total-tokens",
            "--rl-max-payload-bytes",
        ] {
            let e = parse(&[flag, "0"]).expect_err(flag).to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
        let c = parse(&["--max-input-tokens", "7", "--payload-limit", "10"]).expect("valid");
        assert_eq!((c.max_input_tokens, c.payload_limit), (Some(7), 10));
    }

    #[test]
    fn rl_control_needs_its_own_key() {
        let off = parse(&[]).expect("valid");
        assert!(off.rl_control().expect("off is fine").is_none());
        assert_eq!(off.rl_max_payload_bytes, 1 << 30);
        for extra in [
            &["--enable-rl-control"][..],
            &["--enable-rl-control", "--rl-control-key", " "][..],
        ] {
            let e = parse(extra)
                .expect("parses")
                .rl_control()
                .expect_err("no key");
            assert!(e.contains("--rl-control-key"), "{e}");
            assert!(e.contains("TENSORGATE_RL_CONTROL_KEY"), "{e}");
        }
        let same = parse(&[
            "--enable-rl-control",
            "--rl-control-key",
            "k1",
            "--api-key",
            "k1",
        ])
        .expect("parses");
        assert!(same
            .rl_control()
            .expect_err("same key")
            .contains("--api-key"));
        let on = parse(&[
            "--enable-rl-control",
            "--rl-control-key",
            "k2",
            "--rl-max-payload-bytes",
            "4096",
        ])
        .expect("parses")
        .rl_control()
        .expect("valid")
        .expect("on");
        assert_eq!((on.key.as_str(), on.max_payload_bytes), ("k2", 4096));
    }
}
