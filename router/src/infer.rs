//! One generation from validated request to events: submits to the executor, turns token
//! ids into text incrementally, applies stop sequences, and reports how it finished.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::detokenizer::IncrementalDecoder;
use crate::errors::RouterError;
use crate::executor_client::{ExecutorEvent, ExecutorHandle, RequestGuard};
use crate::metrics as m;
use crate::pb;
use crate::scheduler::{AdmissionError, Reservation, Scheduler};
use crate::schemas::{FinishReason, GenerateParameters, Token};
use crate::tokenizer::TextTokenizer;
use crate::validation::{self, Limits, ValidParameters};

pub struct Infer {
    executor: ExecutorHandle,
    scheduler: Scheduler,
    tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    /// TGI `inputs` go through the chat template as one user message (--prompt-format chat).
    wrap_inputs: bool,
    limits: Limits,
    permits: Arc<Semaphore>,
    max_concurrent_requests: usize,
}

/// A request that passed validation and tokenization.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub params: ValidParameters,
    /// Ask the engine for per-token log probabilities. Off unless the answer shows them: they
    /// cost the engine a log-softmax over the vocabulary per row and step.
    pub want_logprobs: bool,
}

#[derive(Debug, Clone)]
pub struct EndInfo {
    pub finish_reason: FinishReason,
    /// Generated text without special tokens, stop sequence included.
    pub generated_text: String,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub index: u32,
    pub token: Token,
    pub top_tokens: Vec<Token>,
    /// Set on the last token of the generation.
    pub end: Option<EndInfo>,
}

impl Infer {
    pub fn new(
        executor: ExecutorHandle,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        chat_template: Option<ChatTemplate>,
        wrap_inputs: bool,
        limits: Limits,
        max_concurrent_requests: usize,
    ) -> Self {
        Self {
            executor,
            scheduler,
            tokenizer,
            chat_template,
            wrap_inputs,
            limits,
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            max_concurrent_requests,
        }
    }

    pub fn executor(&self) -> &ExecutorHandle {
        &self.executor
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn features(&self) -> &crate::pb::Features {
        &self.limits.features
    }

    /// TGI routes: `inputs` as they are, or as one user message (--prompt-format chat).
    pub async fn prepare(
        &self,
        inputs: &str,
        parameters: &GenerateParameters,
    ) -> Result<Prepared, RouterError> {
        // Checked before templating: a template would turn "" into a non-empty prompt.
        if inputs.is_empty() {
            return Err(validation::ValidationError::EmptyInput.into());
        }
        match (&self.chat_template, self.wrap_inputs) {
            (Some(template), true) => {
                let message = ChatMessage {
                    role: "user".into(),
                    content: inputs.to_string(),
                };
                let prompt = template
                    .render(&[message], true)
                    .map_err(RouterError::Template)?;
                // The template writes the special tokens itself.
                self.prepare_prompt(prompt, false, parameters).await
            }
            _ => {
                self.prepare_prompt(inputs.to_string(), true, parameters)
                    .await
            }
        }
    }

    pub async fn prepare_prompt(
        &self,
        prompt: String,
        add_special_tokens: bool,
        parameters: &GenerateParameters,
    ) -> Result<Prepared, RouterError> {
        let params = validation::validate_parameters(parameters, &self.limits, rand::random)?;
        if prompt.is_empty() {
            return Err(validation::ValidationError::EmptyInput.into());
        }
        let ids = self.tokenizer.encode(prompt, add_special_tokens).await?;
        let (input_ids, max_new_tokens) = validation::validate_length(ids, &params, &self.limits)?;
        Ok(Prepared {
            want_logprobs: params.top_n_tokens > 0,
            input_ids,
            max_new_tokens,
            params,
        })
    }

    /// Requests in the router now (queued or running).
    pub fn in_flight(&self) -> usize {
        self.max_concurrent_requests - self.permits.available_permits()
    }

    /// Takes a slot (or refuses with 429 at once), waits for admission by the scheduler
    /// (503 past --max-queue-wait-ms), and returns the generation's events.
    pub async fn start(&self, prepared: Prepared) -> Result<GenerationStream, RouterError> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            RouterError::Overloaded(format!(
                "{} requests are in flight, the limit set by --max-concurrent-requests",
                self.max_concurrent_requests
            ))
        })?;
        if !self.executor.is_connected() {
            return Err(RouterError::Unavailable(
                "the executor is not connected (starting or restarting)".into(),
            ));
        }
        let in_flight = InFlight::new();
        let started = Instant::now();
        let request = pb::GenerateRequest {
            id: 0,
            input_ids: prepared.input_ids.clone(),
            max_new_tokens: prepared.max_new_tokens,
            sampling: Some(prepared.params.sampling.to_proto()),
            stop_token_ids: vec![],
            ignore_eos: false,
            return_logprobs: prepared.want_logprobs && self.limits.features.logprobs,
            top_n_tokens: prepared.params.top_n_tokens,
            priority: prepared.params.priority,
        };
        let admission = self
            .scheduler
            .admit(request, prepared.params.priority)
            .await
            .map_err(|e| match e {
                AdmissionError::TooLarge { .. } => {
                    RouterError::Validation(validation::ValidationError::Admission(e.to_string()))
                }
                AdmissionError::QueueTimeout { .. } | AdmissionError::Stopped => {
                    RouterError::Unavailable(e.to_string())
                }
            })?;
        let (guard, rx) = (admission.guard, admission.rx);
        let max_stop_len = prepared
            .params
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Ok(GenerationStream {
            rx,
            guard: Some(guard),
            _reservation: admission.reservation,
            _permit: permit,
            _in_flight: in_flight,
            started,
            last_token: None,
            recorded_end: false,
            tokenizer: self.tokenizer.clone(),
            decoder: IncrementalDecoder::new(&prepared.input_ids),
            stop_sequences: prepared.params.stop_sequences,
            max_stop_len,
            text: String::new(),
            stop_window_start: 0,
            generated: 0,
            seed: prepared.params.sampling.seed,
            input_length: prepared.input_ids.len() as u32,
            queue: VecDeque::new(),
            done: false,
        })
    }
}

/// Keeps the in-flight gauge right however a request ends.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        m::in_flight_inc();
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        m::in_flight_dec();
    }
}

/// The events of one generation. Dropping it before the end cancels the request.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<ExecutorEvent>,
    guard: Option<RequestGuard>,
    // Fields drop in order: the executor cancel (guard) goes out before the budget is freed.
    _reservation: Reservation,
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlight,
    started: Instant,
    last_token: Option<Instant>,
    recorded_end: bool,
    tokenizer: TextTokenizer,
    decoder: IncrementalDecoder,
    stop_sequences: Vec<String>,
    max_stop_len: usize,
    text: String,
    stop_window_start: usize,
    generated: u32,
    seed: Option<u64>,
    input_length: u32,
    queue: VecDeque<TokenEvent>,
    done: bool,
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        // Dropped before its end: the client left (or the handler gave up).
        self.record_end("cancelled");
    }
}

impl GenerationStream {
    /// Next token event; `None` after the last one. An error ends the stream.
    pub async fn next(&mut self) -> Option<Result<TokenEvent, RouterError>> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(ExecutorEvent::Output(out)) => {
                    if let Err(e) = self.absorb(out) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                Some(ExecutorEvent::Disconnected(reason)) => {
                    self.finish_guard();
                    self.record_end("error");
                    self.done = true;
                    return Some(Err(RouterError::Unavailable(reason)));
                }
                None => {
                    self.done = true;
                    return Some(Err(RouterError::Unavailable(
                        "the executor connection closed".into(),
                    )));
                }
            }
        }
    }

    fn finish_guard(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.finish();
        }
    }

    fn record_end(&mut self, reason: &'static str) {
        if !self.recorded_end {
            self.recorded_end = true;
            m::record_generation_end(
                reason,
                self.input_length,
                self.generated,
                self.started.elapsed(),
            );
        }
    }

    fn end_info(&mut self, finish_reason: FinishReason) -> EndInfo {
        self.record_end(match finish_reason {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        });
        let mut generated_text = self.text.clone();
        if finish_reason != FinishReason::StopSequence {
            generated_text.push_str(&self.decoder.flush(self.tokenizer.tokenizer()));
        }
        EndInfo {
            finish_reason,
            generated_text,
            generated_tokens: self.generated,
            seed: self.seed,
            input_length: self.input_length,
        }
    }

    fn absorb(&mut self, out: pb::RequestOutput) -> Result<(), RouterError> {
        let n = out.token_ids.len();
        if n > 0 {
            let now = Instant::now();
            match self.last_token {
                None => m::record_first_token(now.saturating_duration_since(self.started)),
                Some(prev) => {
                    // Tokens that came in one message share its interval.
                    let per = now.saturating_duration_since(prev) / n as u32;
                    for _ in 0..n {
                        m::record_inter_token(per);
                    }
                }
            }
            self.last_token = Some(now);
        }
        for (i, &id) in out.token_ids.iter().enumerate() {
            let text = self.decoder.push(self.tokenizer.tokenizer(), id);
            let special = self.tokenizer.is_special(id);
            if !special {
                self.text.push_str(&text);
            }
            self.generated += 1;
            let top_tokens = out
                .top_tokens
                .get(i)
                .map(|t| self.top_tokens(t))
                .unwrap_or_default();
            let mut event = TokenEvent {
                index: self.generated - 1,
                token: Token {
                    id,
                    text,
                    logprob: out.logprobs.get(i).copied(),
                    special,
                },
                top_tokens,
                end: None,
            };
            if self.hit_stop_sequence() {
                // Dropping the guard cancels the rest of the generation in the executor.
                self.guard = None;
                self.done = true;
                event.end = Some(self.end_info(FinishReason::StopSequence));
                self.queue.push_back(event);
                return Ok(());
            }
            if i + 1 == n {
                event.end = self.natural_end(out.finish_reason, &out.error)?;
            }
            self.queue.push_back(event);
        }
        if n == 0 && out.finish_reason != pb::FinishReason::Unspecified as i32 {
            // A finish without a token: attach it to a repeat of the last position.
            if let Some(end) = self.natural_end(out.finish_reason, &out.error)? {
                self.queue.push_back(TokenEvent {
                    index: self.generated.saturating_sub(1),
                    token: Token {
                        id: 0,
                        text: String::new(),
                        logprob: None,
                        special: true,
                    },
                    top_tokens: vec![],
                    end: Some(end),
                });
            }
        }
        Ok(())
    }

    fn natural_end(&mut self, reason: i32, error: &str) -> Result<Option<EndInfo>, RouterError> {
        let reason = pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Error);
        let finish = match reason {
            pb::FinishReason::Unspecified => return Ok(None),
            pb::FinishReason::Length => FinishReason::Length,
            pb::FinishReason::EosToken | pb::FinishReason::StopToken => FinishReason::EosToken,
            pb::FinishReason::Cancelled => {
                self.finish_guard();
                self.record_end("cancelled");
                return Err(RouterError::Generation(
                    "the executor cancelled the request".into(),
                ));
            }
            pb::FinishReason::Error => {
                self.finish_guard();
                self.record_end("error");
                return Err(RouterError::Generation(if error.is_empty() {
                    "the engine failed without a message".into()
                } else {
                    error.to_string()
                }));
            }
        };
        self.finish_guard();
        self.done = true;
        Ok(Some(self.end_info(finish)))
    }

    fn hit_stop_sequence(&mut self) -> bool {
        if self.stop_sequences.is_empty() {
            return false;
        }
        // Only the tail can hold a new match: text already searched stays searched.
        let from = self.stop_window_start;
        let hit = self
            .stop_sequences
            .iter()
            .any(|s| self.text[from..].contains(s.as_str()));
        let keep = self.text.len().saturating_sub(self.max_stop_len);
        self.stop_window_start = (0..=keep)
            .rev()
            .find(|&i| self.text.is_char_boundary(i))
            .unwrap_or(0)
            .max(from);
        hit
    }

    fn top_tokens(&self, t: &pb::TopTokens) -> Vec<Token> {
        t.ids
            .iter()
            .zip(&t.logprobs)
            .map(|(&id, &lp)| Token {
                id,
                text: self
                    .tokenizer
                    .tokenizer()
                    .decode(&[id], false)
                    .unwrap_or_default(),
                logprob: Some(lp),
                special: self.tokenizer.is_special(id),
            })
            .collect()
    }
}
