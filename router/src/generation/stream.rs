//! The events of one generation: token ids from the executor become text incrementally,
//! stop sequences end it, and the last event says how it finished. Every route (TGI and
//! OpenAI, streaming or not) reads generations through this one type.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::errors::RouterError;
use crate::executors::client::{ExecutorEvent, RequestGuard};
use crate::executors::scheduler::Reservation;
use crate::generation::detokenizer::IncrementalDecoder;
use crate::generation::requests::Registration;
use crate::generation::stop::StopSequences;
use crate::generation::tokenizer::TextTokenizer;
use crate::metrics as m;
use crate::pb;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
    pub special: bool,
}

/// One prompt token as the engine scored it: TGI's `details.prefill`, OpenAI's echoed
/// log probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptToken {
    pub id: u32,
    /// Decoded in sequence, so the texts concatenate to the prompt's (special tokens included).
    pub text: String,
    /// None for the first token (nothing before it predicts it), or a value JSON cannot carry.
    pub logprob: Option<f32>,
    /// The most likely tokens at its position, when alternatives were asked (never the first's).
    pub top: Vec<Token>,
}

#[derive(Debug, Clone)]
pub struct EndInfo {
    pub finish_reason: FinishReason,
    /// Generated text without special tokens, stop sequence included (as TGI answers).
    pub generated_text: String,
    /// Where the stop sequence begins in `generated_text` (OpenAI answers end before it).
    pub stop_at: Option<usize>,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    /// The label of the weights that produced the last token (RequestOutput.weight_version).
    pub weight_version: String,
}

impl EndInfo {
    /// The answer as OpenAI routes give it: without the stop sequence and what followed.
    pub fn text_before_stop(&self) -> &str {
        &self.generated_text[..self.stop_at.unwrap_or(self.generated_text.len())]
    }
}

#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub index: u32,
    /// None only on a closing event: the engine reported the finish after its last token,
    /// and nothing is invented to carry it.
    pub token: Option<Token>,
    pub top_tokens: Vec<Token>,
    /// Set on the last event of the generation.
    pub end: Option<EndInfo>,
}

/// What a generation holds while it runs; dropped with it, in this order.
pub(crate) struct Held {
    pub guard: RequestGuard,
    pub reservation: Arc<Reservation>,
    pub permit: OwnedSemaphorePermit,
    /// Lists the generation for /abort_request while it lives.
    pub registration: Registration,
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

/// Fixed facts of one generation, given at its start.
pub(crate) struct StreamSetup {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub seed: Option<u64>,
    /// The engine was asked for the prompt's log probabilities (on its first output).
    pub prompt_logprobs: bool,
    /// The weight_version current when the request started: reported if the executor
    /// stamps none (an update cannot come between, since updates wait for or abort every
    /// request in flight).
    pub weight_version: String,
}

/// The events of one generation. Dropping it before the end cancels the request.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<ExecutorEvent>,
    guard: Option<RequestGuard>,
    // Fields drop in order: the executor cancel (guard) goes out before the budget is freed.
    // (None only in tests, which drive a stream without an executor.)
    _reservation: Option<Arc<Reservation>>,
    _permit: Option<OwnedSemaphorePermit>,
    _registration: Option<Registration>,
    _in_flight: InFlight,
    started: Instant,
    last_token: Option<Instant>,
    recorded_end: bool,
    tokenizer: TextTokenizer,
    decoder: IncrementalDecoder,
    stops: StopSequences,
    text: String,
    generated: u32,
    max_new_tokens: u32,
    last_id: Option<u32>,
    seed: Option<u64>,
    input_length: u32,
    /// The prompt, until its log probabilities arrive (only when they were asked for).
    prompt_ids: Option<Vec<u32>>,
    prefill: Option<Vec<PromptToken>>,
    weight_version: String,
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
    pub(crate) fn new(
        rx: mpsc::UnboundedReceiver<ExecutorEvent>,
        held: Held,
        tokenizer: TextTokenizer,
        setup: StreamSetup,
    ) -> Self {
        Self::with(rx, Some(held), tokenizer, setup)
    }

    fn with(
        rx: mpsc::UnboundedReceiver<ExecutorEvent>,
        held: Option<Held>,
        tokenizer: TextTokenizer,
        setup: StreamSetup,
    ) -> Self {
        let (guard, reservation, permit, registration) = match held {
            Some(h) => (
                Some(h.guard),
                Some(h.reservation),
                Some(h.permit),
                Some(h.registration),
            ),
            None => (None, None, None, None),
        };
        Self {
            rx,
            guard,
            _reservation: reservation,
            _permit: permit,
            _registration: registration,
            _in_flight: InFlight::new(),
            started: Instant::now(),
            last_token: None,
            recorded_end: false,
            decoder: IncrementalDecoder::new(&setup.input_ids),
            tokenizer,
            stops: StopSequences::new(setup.stop_sequences),
            text: String::new(),
            generated: 0,
            max_new_tokens: setup.max_new_tokens,
            last_id: None,
            seed: setup.seed,
            input_length: setup.input_ids.len() as u32,
            prompt_ids: setup.prompt_logprobs.then(|| setup.input_ids.clone()),
            prefill: None,
            weight_version: setup.weight_version,
            queue: VecDeque::new(),
            done: false,
        }
    }

    /// Next event; `None` after the last one. An error ends the stream.
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
                Some(ExecutorEvent::Aborted(reason)) => {
                    // Already cancelled in the executor by whoever aborted it.
                    self.finish_guard();
                    self.record_end("cancelled");
                    self.done = true;
                    return Some(Err(RouterError::Aborted(reason)));
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

    fn end_info(&mut self, finish_reason: FinishReason, stop_at: Option<usize>) -> EndInfo {
        self.record_end(match finish_reason {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        });
        self.done = true;
        let mut generated_text = self.text.clone();
        if finish_reason != FinishReason::StopSequence {
            generated_text.push_str(&self.decoder.flush(&self.tokenizer));
        }
        EndInfo {
            finish_reason,
            generated_text,
            stop_at,
            generated_tokens: self.generated,
            seed: self.seed,
            input_length: self.input_length,
            weight_version: self.weight_version.clone(),
        }
    }

    fn record_timing(&mut self, n: usize) {
        if n == 0 {
            return;
        }
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

    fn absorb(&mut self, out: pb::RequestOutput) -> Result<(), RouterError> {
        if !out.weight_version.is_empty() {
            self.weight_version.clone_from(&out.weight_version);
        }
        let failed = matches!(
            pb::FinishReason::try_from(out.finish_reason),
            Ok(pb::FinishReason::Error | pb::FinishReason::Cancelled) | Err(_)
        );
        if !failed {
            if let Some(ids) = self.prompt_ids.take() {
                // The first output carries them (a failure's own message goes first, below).
                match self.prompt_tokens(ids, &out) {
                    Ok(prefill) => self.prefill = Some(prefill),
                    Err(e) => {
                        self.finish_guard();
                        self.record_end("error");
                        return Err(e);
                    }
                }
            }
        }
        let n = out.token_ids.len();
        self.record_timing(n);
        for (i, &id) in out.token_ids.iter().enumerate() {
            let text = self.decoder.push(&self.tokenizer, id);
            let special = self.tokenizer.is_special(id);
            if !special {
                self.text.push_str(&text);
            }
            self.generated += 1;
            self.last_id = Some(id);
            let top_tokens = out
                .top_tokens
                .get(i)
                .map(|t| self.top_tokens(t))
                .unwrap_or_default();
            let mut event = TokenEvent {
                index: self.generated - 1,
                token: Some(Token {
                    id,
                    text,
                    logprob: out.logprobs.get(i).copied(),
                    special,
                }),
                top_tokens,
                end: None,
            };
            if let Some(at) = self.stops.scan(&self.text) {
                // Dropping the guard cancels the rest of the generation in the executor.
                self.guard = None;
                event.end = Some(self.end_info(FinishReason::StopSequence, Some(at)));
                self.queue.push_back(event);
                return Ok(());
            }
            if i + 1 == n {
                event.end = self.natural_end(out.finish_reason, &out.error)?;
                if event.end.is_none() && self.generated >= self.max_new_tokens {
                    // The budget is spent, so this token is the last whatever the engine's
                    // finish says later: the end rides on it rather than on a closing event.
                    self.finish_guard();
                    event.end = Some(self.end_info(FinishReason::Length, None));
                }
            }
            self.queue.push_back(event);
        }
        if n == 0 {
            if let Some(end) = self.natural_end(out.finish_reason, &out.error)? {
                // A finish after the last token: a closing event with no token of its own.
                self.queue.push_back(TokenEvent {
                    index: self.generated.saturating_sub(1),
                    token: None,
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
        Ok(Some(self.end_info(finish, None)))
    }

    /// The prompt's tokens with the log probabilities the engine sent on its first output.
    fn prompt_tokens(
        &self,
        ids: Vec<u32>,
        out: &pb::RequestOutput,
    ) -> Result<Vec<PromptToken>, RouterError> {
        let scored = ids.len().saturating_sub(1);
        let tops = out.prompt_top_tokens.len();
        if out.prompt_logprobs.len() != scored || (tops != 0 && tops != scored) {
            return Err(RouterError::Generation(format!(
                "the engine returned {} prompt log probabilities and {tops} sets of \
                 alternatives for a prompt of {} tokens (expected {scored})",
                out.prompt_logprobs.len(),
                ids.len(),
            )));
        }
        let tokenizer = self.tokenizer.tokenizer();
        let mut decoder = IncrementalDecoder::new(&[]);
        let mut texts: Vec<String> = ids.iter().map(|&id| decoder.push(tokenizer, id)).collect();
        if let Some(last) = texts.last_mut() {
            last.push_str(&decoder.flush(tokenizer));
        }
        Ok(ids
            .into_iter()
            .zip(texts)
            .enumerate()
            .map(|(i, (id, text))| {
                let at = i.checked_sub(1);
                PromptToken {
                    id,
                    text,
                    logprob: at
                        .and_then(|j| out.prompt_logprobs.get(j).copied())
                        .filter(|l| l.is_finite()),
                    top: at
                        .and_then(|j| out.prompt_top_tokens.get(j))
                        .map(|t| self.top_tokens(t))
                        .unwrap_or_default(),
                }
            })
            .collect())
    }

    /// The prompt's tokens and log probabilities, once the first output brought them (only
    /// when they were asked for).
    pub fn prefill(&self) -> Option<&[PromptToken]> {
        self.prefill.as_deref()
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

    /// The id of the last token generated so far.
    pub fn last_token_id(&self) -> Option<u32> {
        self.last_id
    }
}

/// A generation run to its end: every token (in order) and how it finished.
#[derive(Debug, Clone)]
pub struct Completed {
    pub tokens: Vec<Token>,
    /// One list per token when alternatives were asked for; empty otherwise.
    pub top_tokens: Vec<Vec<Token>>,
    pub end: EndInfo,
    /// The prompt's tokens and log probabilities, when they were asked for.
    pub prefill: Option<Vec<PromptToken>>,
}

/// Runs a generation to its end. The one assembly path of every non-streaming answer.
pub async fn collect(mut stream: GenerationStream) -> Result<Completed, RouterError> {
    let mut tokens = Vec::new();
    let mut top_tokens = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        if let Some(token) = ev.token {
            tokens.push(token);
            if !ev.top_tokens.is_empty() {
                top_tokens.push(ev.top_tokens);
            }
        }
        if let Some(end) = ev.end {
            return Ok(Completed {
                tokens,
                top_tokens,
                end,
                prefill: stream.prefill.take(),
            });
        }
    }
    Err(RouterError::Generation(
        "the generation ended without a final event".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::detokenizer::tests::byte_level_tokenizer;

    fn ids(tokenizer: &TextTokenizer, text: &str) -> Vec<u32> {
        tokenizer
            .tokenizer()
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    fn output(ids: Vec<u32>, finish: pb::FinishReason) -> ExecutorEvent {
        ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            token_ids: ids,
            finish_reason: finish as i32,
            ..Default::default()
        })
    }

    /// A stream fed by hand: the executor's messages go in through the returned sender.
    fn stream(
        max_new_tokens: u32,
        stops: &[&str],
    ) -> (
        GenerationStream,
        mpsc::UnboundedSender<ExecutorEvent>,
        TextTokenizer,
    ) {
        let tokenizer = TextTokenizer::from_tokenizer(byte_level_tokenizer());
        let (tx, rx) = mpsc::unbounded_channel();
        let s = GenerationStream::with(
            rx,
            None,
            tokenizer.clone(),
            StreamSetup {
                input_ids: vec![1, 2, 3],
                max_new_tokens,
                stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
                seed: None,
                prompt_logprobs: false,
                weight_version: "0".into(),
            },
        );
        (s, tx, tokenizer)
    }

    #[tokio::test]
    async fn a_finish_after_the_last_token_invents_no_token() {
        let (s, tx, tok) = stream(10, &[]);
        let hi = ids(&tok, "hi");
        tx.send(output(hi.clone(), pb::FinishReason::Unspecified))
            .expect("send");
        tx.send(output(vec![], pb::FinishReason::EosToken))
            .expect("send");
        let done = collect(s).await.expect("completes");
        assert_eq!(done.end.finish_reason, FinishReason::EosToken);
        assert_eq!(done.end.generated_tokens, 2);
        assert_eq!(done.tokens.len(), 2, "one entry per generated token");
        assert_eq!(
            done.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            hi,
            "only the engine's own tokens"
        );
        assert_eq!(done.end.generated_text, "hi");
    }

    #[tokio::test]
    async fn the_closing_event_carries_no_token() {
        let (mut s, tx, tok) = stream(10, &[]);
        tx.send(output(ids(&tok, "a"), pb::FinishReason::Unspecified))
            .expect("send");
        tx.send(output(vec![], pb::FinishReason::EosToken))
            .expect("send");
        let first = s.next().await.expect("event").expect("ok");
        assert!(first.token.is_some() && first.end.is_none());
        let last = s.next().await.expect("event").expect("ok");
        assert!(last.token.is_none());
        assert_eq!(last.index, 0, "the last token's position, not a new one");
        assert!(last.end.is_some());
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_spent_budget_ends_on_the_last_token() {
        let (mut s, tx, tok) = stream(2, &[]);
        tx.send(output(ids(&tok, "ok"), pb::FinishReason::Unspecified))
            .expect("send");
        let first = s.next().await.expect("event").expect("ok");
        assert!(first.end.is_none());
        let second = s.next().await.expect("event").expect("ok");
        let end = second.end.expect("ends on the second token");
        assert_eq!(end.finish_reason, FinishReason::Length);
        assert_eq!(second.token.map(|t| t.text), Some("k".into()));
        assert!(
            s.next().await.is_none(),
            "the engine's own finish is not awaited"
        );
    }

    #[tokio::test]
    async fn a_stop_sequence_reports_where_it_begins() {
        let (s, tx, tok) = stream(20, &["END"]);
        tx.send(output(ids(&tok, "abEN"), pb::FinishReason::Unspecified))
            .expect("send");
        tx.send(output(ids(&tok, "Dzz"), pb::FinishReason::Unspecified))
            .expect("send");
        let done = collect(s).await.expect("completes");
        assert_eq!(done.end.finish_reason, FinishReason::StopSequence);
        assert_eq!(done.end.generated_text, "abEND");
        assert_eq!(done.end.text_before_stop(), "ab");
        assert_eq!(
            done.tokens.len(),
            5,
            "tokens after the stop are not reported"
        );
    }

    fn stream_with_prompt(
        prompt: Vec<u32>,
    ) -> (GenerationStream, mpsc::UnboundedSender<ExecutorEvent>) {
        let tokenizer = TextTokenizer::from_tokenizer(byte_level_tokenizer());
        let (tx, rx) = mpsc::unbounded_channel();
        let s = GenerationStream::with(
            rx,
            None,
            tokenizer,
            StreamSetup {
                input_ids: prompt,
                max_new_tokens: 5,
                stop_sequences: vec![],
                seed: None,
                prompt_logprobs: true,
                weight_version: "0".into(),
            },
        );
        (s, tx)
    }

    #[tokio::test]
    async fn the_first_output_brings_the_prompt_tokens() {
        let tok = TextTokenizer::from_tokenizer(byte_level_tokenizer());
        let prompt = ids(&tok, "aé!"); // "é" spans two byte tokens
        assert_eq!(prompt.len(), 4);
        let (s, tx) = stream_with_prompt(prompt.clone());
        tx.send(ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            token_ids: ids(&tok, "z"),
            prompt_logprobs: vec![-1.0, f32::NEG_INFINITY, -3.0],
            prompt_top_tokens: (0..3)
                .map(|_| pb::TopTokens {
                    ids: vec![prompt[1]],
                    logprobs: vec![-0.5],
                })
                .collect(),
            finish_reason: pb::FinishReason::Length as i32,
            ..Default::default()
        }))
        .expect("send");
        let done = collect(s).await.expect("completes");
        let prefill = done.prefill.expect("asked for");
        assert_eq!(prefill.iter().map(|p| p.id).collect::<Vec<_>>(), prompt);
        let texts: Vec<&str> = prefill.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(
            texts,
            ["a", "", "é", "!"],
            "texts concatenate to the prompt"
        );
        let lps: Vec<Option<f32>> = prefill.iter().map(|p| p.logprob).collect();
        assert_eq!(
            lps,
            [None, Some(-1.0), None, Some(-3.0)],
            "none first; -inf has no JSON"
        );
        assert!(prefill[0].top.is_empty());
        assert_eq!(prefill[1].top.len(), 1);
        assert_eq!(prefill[1].top[0].logprob, Some(-0.5));
    }

    #[tokio::test]
    async fn prompt_log_probabilities_of_the_wrong_length_fail_the_stream() {
        let (s, tx) = stream_with_prompt(vec![1, 2, 3]);
        tx.send(ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            token_ids: vec![4],
            prompt_logprobs: vec![-1.0],
            ..Default::default()
        }))
        .expect("send");
        let e = collect(s).await.expect_err("fails");
        assert!(
            e.to_string().contains("1 prompt log probabilities")
                && e.to_string().contains("prompt of 3 tokens (expected 2)"),
            "{e}"
        );
        // An engine failure keeps its own message.
        let (s, tx) = stream_with_prompt(vec![1, 2, 3]);
        tx.send(ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            finish_reason: pb::FinishReason::Error as i32,
            error: "boom".into(),
            ..Default::default()
        }))
        .expect("send");
        let e = collect(s).await.expect_err("fails");
        assert!(
            matches!(e, RouterError::Generation(ref m) if m == "boom"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_executors_stamp_names_the_weights_else_the_version_at_the_start() {
        let (s, tx, tok) = stream(10, &[]);
        tx.send(output(ids(&tok, "a"), pb::FinishReason::Unspecified))
            .expect("send");
        tx.send(ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            token_ids: ids(&tok, "b"),
            finish_reason: pb::FinishReason::Length as i32,
            weight_version: "step-7".into(),
            ..Default::default()
        }))
        .expect("send");
        assert_eq!(collect(s).await.expect("ends").end.weight_version, "step-7");
        // The budget is spent before the executor's final (stamped) output arrives.
        let (s, tx, tok) = stream(1, &[]);
        tx.send(output(ids(&tok, "a"), pb::FinishReason::Unspecified))
            .expect("send");
        assert_eq!(collect(s).await.expect("ends").end.weight_version, "0");
    }

    #[tokio::test]
    async fn an_abort_ends_the_stream_as_aborted() {
        let (s, tx, tok) = stream(10, &[]);
        tx.send(output(ids(&tok, "a"), pb::FinishReason::Unspecified))
            .expect("send");
        tx.send(ExecutorEvent::Aborted("paused".into()))
            .expect("send");
        let e = collect(s).await.expect_err("aborted");
        assert!(
            matches!(e, RouterError::Aborted(ref m) if m == "paused"),
            "{e}"
        );
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn an_engine_error_fails_the_stream() {
        let (s, tx, _) = stream(5, &[]);
        tx.send(ExecutorEvent::Output(pb::RequestOutput {
            request_id: 1,
            finish_reason: pb::FinishReason::Error as i32,
            error: "boom".into(),
            ..Default::default()
        }))
        .expect("send");
        let e = collect(s).await.expect_err("fails");
        assert!(
            matches!(e, RouterError::Generation(ref m) if m == "boom"),
            "{e}"
        );
    }
}
