//! All router settings in one struct, parsed from the command line or the environment.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(name = "tensorgate-router", version, about = "tensorgate HTTP router")]
pub struct Config {
    /// Address to bind. 0.0.0.0 (all interfaces) as in TGI, so that `docker run -p` works.
    #[arg(long, env = "TENSORGATE_HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: IpAddr,

    /// HTTP port.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Unix socket of the executor's gRPC server.
    #[arg(long, env = "TENSORGATE_EXECUTOR_SOCKET")]
    pub executor_socket: PathBuf,

    /// Directory holding tokenizer.json (and tokenizer_config.json), or a tokenizer.json file.
    #[arg(long, env = "TENSORGATE_TOKENIZER")]
    pub tokenizer: PathBuf,

    /// Model name reported by /info; defaults to what the executor reports.
    #[arg(long)]
    pub model_id: Option<String>,

    /// Lower the executor's prompt limit (never raise it).
    #[arg(long)]
    pub max_input_tokens: Option<u32>,

    /// Lower the executor's prompt + generation limit (never raise it).
    #[arg(long)]
    pub max_total_tokens: Option<u32>,

    /// Most stop sequences one request may carry.
    #[arg(long, default_value_t = 4)]
    pub max_stop_sequences: usize,

    /// Longest stop sequence, in bytes.
    #[arg(long, default_value_t = 256)]
    pub max_stop_sequence_bytes: usize,

    /// Requests in flight beyond which new ones are refused with 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,

    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 2_000_000)]
    pub payload_limit: usize,

    /// How `inputs` of the TGI routes become a prompt: `raw` (TGI's behaviour) or `chat`
    /// (as one user message through the model's chat template, for instruct models that
    /// end at once on raw text).
    #[arg(long, value_enum, default_value_t = PromptFormat::Raw)]
    pub prompt_format: PromptFormat,

    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Raw,
    Chat,
}
