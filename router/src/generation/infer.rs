//! One generation from a validated request to its stream: prompt preparation (template,
//! tokenization, validation), the concurrency limit, admission by the scheduler.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::errors::RouterError;
use crate::executors::pool::ExecutorHandle;
use crate::executors::scheduler::{AdmissionError, Scheduler};
use crate::generation::chat_template::{ChatMessage, ChatTemplate};
use crate::generation::control::Control;
use crate::generation::guided::{GrammarCompiler, GrammarSpec};
use crate::generation::parameters::GenerateParameters;
use crate::generation::requests::RequestId;
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
    /// Rollout control: sleeping, the live requests by id, weight_version.
    control: Arc<Control>,
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
    /// The request's `x-request-id` (/abort_request names it); None: one is made up.
    pub request_id: Option<RequestId>,
}

impl Infer {
    // Each argument is a distinct part that Infer owns; a struct around them would only move
    // the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        executor: ExecutorHandle,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        chat_template: Option<ChatTemplate>,
        wrap_inputs: bool,
        limits: Limits,
        max_concurrent_requests: usize,
        control: Arc<Control>,
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
            control,
        }
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
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
            request_id: None,
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
    /// (503 past --max-queue-wait-ms; while rollout control holds admission the wait does not
    /// count), and returns the generation's events. Refused at once (503) while engine memory
    /// is released.
    pub async fn start(&self, prepared: Prepared) -> Result<GenerationStream, RouterError> {
        self.start_group(vec![prepared])
            .await?
            .pop()
            .ok_or_else(|| RouterError::Generation("the scheduler admitted nothing".into()))
    }

    /// Starts several generations admitted together (TGI `best_of`): one slot each, and one
    /// reservation of their summed tokens, so either all run or none does yet. All are
    /// listed under the first's request id: an abort of that id ends them all.
    pub async fn start_group(
        &self,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<GenerationStream>, RouterError> {
        if let Some(why) = self.control.sleeping() {
            return Err(RouterError::Sleeping(why));
        }
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
        let id = prepared
            .first()
            .and_then(|p| p.request_id.clone())
            .unwrap_or_else(RequestId::generate);
        let (mut signals, registrations): (Vec<_>, Vec<_>) = prepared
            .iter()
            .map(|_| self.control.registry().register(id.clone()))
            .unzip();
        // The version the request starts under; the executor's stamp on the last output
        // replaces it (see GenerationStream).
        let weight_version = self.control.weight_version();
        let requests = prepared.iter().map(|p| self.request(p)).collect();
        let admit = self.scheduler.admit_group(requests, priority);
        // An abort of the id (or of everything) fires every signal: watching one is enough.
        let abort = async {
            match signals.first_mut() {
                Some(signal) => signal.aborted().await,
                None => std::future::pending().await,
            }
        };
        let admissions = tokio::select! {
            admitted = admit => admitted.map_err(|e| match e {
                AdmissionError::TooLarge { .. }
                | AdmissionError::GroupTooLarge { .. }
                | AdmissionError::GroupTooWide { .. } => {
                    RouterError::Validation(validation::ValidationError::Admission(e.to_string()))
                }
                AdmissionError::QueueTimeout { .. } | AdmissionError::Stopped => {
                    RouterError::Unavailable(e.to_string())
                }
                AdmissionError::Sleeping(why) => RouterError::Sleeping(why),
            })?,
            // Queued or held: leaving the queue is all there is to do.
            reason = abort => return Err(RouterError::Aborted(reason)),
        };
        for (registration, admission) in registrations.iter().zip(&admissions) {
            if !registration.admitted(admission.guard.id()) {
                // Aborted as it was admitted: dropping the admissions cancels them in the
                // executor.
                let reason = signals
                    .iter_mut()
                    .find_map(|s| s.try_aborted())
                    .unwrap_or_else(|| "aborted".into());
                return Err(RouterError::Aborted(reason));
            }
        }
        let count = prepared.len();
        let mut slots = Some(permit);
        let mut streams = Vec::with_capacity(count);
        let parts = prepared.into_iter().zip(admissions).zip(registrations);
        for (i, ((p, admission), registration)) in parts.enumerate() {
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
                    registration,
                },
                self.tokenizer.clone(),
                StreamSetup {
                    input_ids: p.input_ids,
                    max_new_tokens: p.max_new_tokens,
                    stop_sequences: p.params.stop_sequences,
                    seed: p.params.sampling.seed,
                    prompt_logprobs: p.params.prompt_logprobs,
                    weight_version: weight_version.clone(),
                },
            ));
        }
        Ok(streams)
    }

    /// The request as it is sent to the executor.
    fn request(&self, p: &Prepared) -> pb::GenerateRequest {
        pb::GenerateRequest {
            id: 0,
            resumed_tokens: 0,
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
