//! One generation from a validated request to its stream: prompt preparation (template,
//! tokenization, validation), the concurrency limit, admission by the scheduler.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::errors::RouterError;
use crate::executors::client::ExecutorHandle;
use crate::executors::scheduler::{AdmissionError, Scheduler};
use crate::generation::chat_template::{ChatMessage, ChatTemplate};
use crate::generation::guided::{GrammarCompiler, GrammarSpec};
use crate::generation::parameters::GenerateParameters;
use crate::generation::stream::{GenerationStream, Held, StreamSetup};
use crate::generation::tokenizer::TextTokenizer;
use crate::generation::validation::{self, Limits, ValidParameters};
use crate::pb;

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
    /// Present when the engine enforces grammars (Info.features.guided_decoding).
    grammar: Option<GrammarCompiler>,
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
    /// The compiled grammar the engine enforces.
    pub grammar: Option<pb::Grammar>,
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
            grammar: None,
        }
    }

    /// Grammars are compiled with `compiler` (only when the engine enforces them).
    pub fn with_grammar(mut self, compiler: GrammarCompiler) -> Self {
        self.grammar = Some(compiler);
        self
    }

    /// Compiles a request's grammar off the async threads (a JSON schema takes milliseconds),
    /// refusing with 422 what cannot be enforced.
    pub async fn compile_grammar(
        &self,
        spec: GrammarSpec,
        field: &'static str,
    ) -> Result<pb::Grammar, RouterError> {
        let compiler = self.grammar.clone().ok_or_else(|| {
            validation::ValidationError::Unsupported(
                field,
                "no grammar backend to enforce it".into(),
            )
        })?;
        tokio::task::spawn_blocking(move || compiler.compile(&spec))
            .await
            .map_err(|e| RouterError::Generation(format!("the grammar compiler failed: {e}")))?
            .map_err(|reason| validation::ValidationError::Grammar { field, reason }.into())
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
                    ..Default::default()
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
        // Compiled before tokenizing: a bad grammar is refused without spending the encode.
        let grammar = self.grammar_of(&params).await?;
        let ids = self.tokenizer.encode(prompt, add_special_tokens).await?;
        self.finish(ids, params, grammar)
    }

    async fn grammar_of(
        &self,
        params: &ValidParameters,
    ) -> Result<Option<pb::Grammar>, RouterError> {
        match params.grammar.clone() {
            Some((spec, field)) => Ok(Some(self.compile_grammar(spec, field).await?)),
            None => Ok(None),
        }
    }

    /// The prompt's length checks, and the request as it will be sent.
    fn finish(
        &self,
        ids: Vec<u32>,
        params: ValidParameters,
        grammar: Option<pb::Grammar>,
    ) -> Result<Prepared, RouterError> {
        let (input_ids, max_new_tokens) = validation::validate_length(ids, &params, &self.limits)?;
        Ok(Prepared {
            want_logprobs: params.top_n_tokens > 0,
            input_ids,
            max_new_tokens,
            params,
            grammar,
        })
    }

    /// A prompt given as token ids: sent to the engine exactly as given (token-exact, no
    /// detokenize/re-tokenize), after the same checks as a text prompt.
    pub async fn prepare_ids(
        &self,
        ids: Vec<u32>,
        parameters: &GenerateParameters,
        field: &'static str,
    ) -> Result<Prepared, RouterError> {
        let params = validation::validate_parameters(parameters, &self.limits, rand::random)?;
        if ids.is_empty() {
            return Err(validation::ValidationError::OutOfRange {
                name: field,
                bounds: "a non-empty list of token ids",
                value: "[]".into(),
            }
            .into());
        }
        let vocab_size = self.limits.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id >= vocab_size) {
            return Err(validation::ValidationError::TokenId {
                field,
                id: bad.to_string(),
                vocab_size,
            }
            .into());
        }
        let grammar = self.grammar_of(&params).await?;
        self.finish(ids, params, grammar)
    }

    /// Ends every request still queued or running with 503 / an error event saying why (the
    /// shutdown timeout ran out), rather than cutting their connections.
    pub fn fail_in_flight(&self, reason: &str) {
        self.scheduler.stop();
        self.executor.fail_all(reason.to_string());
    }

    /// Requests in the router now (queued or running).
    pub fn in_flight(&self) -> usize {
        self.max_concurrent_requests - self.permits.available_permits()
    }

    /// Takes a slot (or refuses with 429 at once), waits for admission by the scheduler
    /// (503 past --max-queue-wait-ms), and returns the generation's events.
    pub async fn start(&self, prepared: Prepared) -> Result<GenerationStream, RouterError> {
        self.start_group(vec![prepared])
            .await?
            .pop()
            .ok_or_else(|| RouterError::Generation("the scheduler admitted nothing".into()))
    }

    /// Starts several generations admitted together (TGI `best_of`): one slot each, and one
    /// reservation of their summed tokens, so either all run or none does yet.
    pub async fn start_group(
        &self,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<GenerationStream>, RouterError> {
        let n = u32::try_from(prepared.len()).unwrap_or(u32::MAX);
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                RouterError::Overloaded(format!(
                    "{} requests are in flight, the limit set by --max-concurrent-requests{}",
                    self.max_concurrent_requests,
                    if n > 1 {
                        format!(" (this one needs {n} slots, one per best_of sequence)")
                    } else {
                        String::new()
                    },
                ))
            })?;
        if !self.executor.is_connected() {
            return Err(RouterError::Unavailable(
                "the executor is not connected (starting or restarting)".into(),
            ));
        }
        let priority = prepared.first().map_or(0, |p| p.params.priority);
        let requests = prepared.iter().map(|p| self.request(p)).collect();
        let admissions = self
            .scheduler
            .admit_group(requests, priority)
            .await
            .map_err(|e| match e {
                AdmissionError::TooLarge { .. }
                | AdmissionError::GroupTooLarge { .. }
                | AdmissionError::GroupTooWide { .. } => {
                    RouterError::Validation(validation::ValidationError::Admission(e.to_string()))
                }
                AdmissionError::QueueTimeout { .. } | AdmissionError::Stopped => {
                    RouterError::Unavailable(e.to_string())
                }
            })?;
        let count = prepared.len();
        let mut slots = Some(permit);
        let mut streams = Vec::with_capacity(count);
        for (i, (p, admission)) in prepared.into_iter().zip(admissions).enumerate() {
            // One slot each; the last takes what is left.
            let one = if i + 1 == count {
                slots.take()
            } else {
                slots.as_mut().and_then(|s| s.split(1))
            }
            .ok_or_else(|| RouterError::Generation("a concurrency slot went missing".into()))?;
            streams.push(GenerationStream::new(
                admission.rx,
                Held {
                    guard: admission.guard,
                    reservation: admission.reservation,
                    permit: one,
                },
                self.tokenizer.clone(),
                StreamSetup {
                    input_ids: p.input_ids,
                    max_new_tokens: p.max_new_tokens,
                    stop_sequences: p.params.stop_sequences,
                    seed: p.params.sampling.seed,
                    prompt_logprobs: p.params.prompt_logprobs,
                },
            ));
        }
        Ok(streams)
    }

    /// The request as it is sent to the executor.
    fn request(&self, p: &Prepared) -> pb::GenerateRequest {
        pb::GenerateRequest {
            id: 0,
            input_ids: p.input_ids.clone(),
            max_new_tokens: p.max_new_tokens,
            sampling: Some(p.params.sampling.to_proto()),
            stop_token_ids: p.params.stop_token_ids.clone(),
            ignore_eos: p.params.ignore_eos,
            return_logprobs: p.want_logprobs && self.limits.features.logprobs,
            top_n_tokens: p.params.top_n_tokens,
            priority: p.params.priority,
            grammar: p.grammar.clone(),
            min_new_tokens: p.params.min_new_tokens,
            logit_bias: p.params.logit_bias.iter().copied().collect(),
            return_prompt_logprobs: p.params.prompt_logprobs,
        }
    }
}
