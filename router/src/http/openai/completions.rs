//! `POST /v1/completions` (the legacy text completions).

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};

use crate::errors::OpenAiError;
use crate::generation::requests::RequestId;
use crate::generation::validation::ValidationError;
use crate::http::extract::OpenAiJson;
use crate::http::openai::choices::{self, Family, FinishedChoice, Meta};
use crate::http::openai::logprobs::{self, TokenLogprob};
use crate::http::openai::mapping::{
    check_n, record_user, to_generate_parameters, unsupported, MAX_N,
};
use crate::http::openai::schemas::{CompletionRequest, Prompt};
use crate::http::responses::OpenAiErrors;
use crate::http::state::AppState;

/// Completions render each choice as `text`; `echo` puts the prompt before it.
struct Completions {
    /// The echoed prompt of each choice, by choice index (empty without `echo`).
    echoes: Vec<String>,
}

impl Family for Completions {
    const OBJECT: &'static str = "text_completion";
    const CHUNK_OBJECT: &'static str = "text_completion";

    fn full_choice(&self, c: FinishedChoice) -> Value {
        let echo = self.echoes.get(c.index as usize).map_or("", String::as_str);
        json!({"index": c.index, "text": format!("{echo}{}", c.text), "logprobs": c.logprobs.as_deref().map(logprobs::completion), "finish_reason": c.finish})
    }

    fn chunk_choice(
        &self,
        index: u32,
        text: &str,
        lp: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value {
        json!({"index": index, "text": text, "logprobs": lp.map(logprobs::completion), "finish_reason": finish})
    }

    fn write_text_choice(&self, out: &mut Vec<u8>, index: u32, text: &str) {
        out.extend_from_slice(b"{\"index\":");
        out.extend_from_slice(itoa::Buffer::new().format(index).as_bytes());
        out.extend_from_slice(b",\"text\":");
        choices::write_json_str(out, text);
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}");
    }

    fn prelude(&self, _n: u32) -> Vec<Value> {
        self.echoes
            .iter()
            .enumerate()
            .filter(|(_, echo)| !echo.is_empty())
            .map(|(index, echo)| json!([{"index": index, "text": echo, "logprobs": null, "finish_reason": null}]))
            .collect()
    }
}

#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest, responses((status = 200, description = "text_completion, or events when stream is true", body = Object), OpenAiErrors))]
pub async fn completions(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    // Legacy `logprobs: N`: the chosen token's logprob and the N most likely (0 = only it).
    let want_logprobs = req.logprobs.is_some();
    if want_logprobs && !state.infer.features().logprobs {
        return Err(unsupported(
            "logprobs",
            "the engine does not return log probabilities",
        ));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(unsupported(
            "best_of",
            "only best_of = 1 is served on /v1/completions (TGI's /generate serves best_of)",
        ));
    }
    // `echo` with `logprobs`: the prompt's tokens come first in `logprobs`, the first with null
    // (as OpenAI and vLLM answer), which needs the engine to score the prompt.
    let prompt_logprobs = req.echo && want_logprobs;
    if prompt_logprobs && !state.infer.features().prompt_logprobs {
        return Err(unsupported(
            "echo",
            "`echo` with `logprobs` needs the prompt's log probabilities, which the engine does \
             not return",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "no fill-in-the-middle"));
    }
    let n = check_n(req.common.n)?;
    let prompts = req.prompt.into_prompts();
    if prompts.is_empty() || prompts.len() > MAX_N as usize {
        return Err(ValidationError::OutOfRange {
            name: "prompt",
            bounds: "one string or a list of 1 to 8 strings",
            value: format!("{} prompts", prompts.len()),
        }
        .into());
    }
    if prompts.len() as u32 * n > MAX_N {
        return Err(ValidationError::OutOfRange {
            name: "n",
            bounds: "such that prompts × n <= 8",
            value: format!("{} × {n}", prompts.len()),
        }
        .into());
    }
    let mut params = to_generate_parameters(&req.common, req.max_tokens.or(Some(16)))?;
    params.top_n_tokens = req.logprobs.filter(|n| *n > 0);
    params.decoder_input_details = prompt_logprobs;
    // Every prompt is validated before any starts, so a bad one refuses the whole request.
    let mut prepared = Vec::with_capacity(prompts.len());
    for p in &prompts {
        prepared.push(match p {
            Prompt::Text(text) => {
                state
                    .infer
                    .prepare_prompt(text.clone(), true, &params)
                    .await?
            }
            Prompt::Ids(ids) => {
                state
                    .infer
                    .prepare_ids(ids.clone(), &params, "prompt")
                    .await?
            }
        });
    }
    record_user("/v1/completions", &req.common);
    let stops = prepared[0].params.stop_sequences.clone();
    let prompt_tokens: u32 = prepared.iter().map(|p| p.input_ids.len() as u32).sum();
    let mut all = Vec::new();
    let mut echoes = Vec::new();
    for (pi, mut p) in prepared.into_iter().enumerate() {
        p.request_id = Some(rid.clone());
        let echo = match (&prompts[pi], req.echo) {
            (_, false) => String::new(),
            (Prompt::Text(text), true) => text.clone(),
            (Prompt::Ids(ids), true) => state.infer.tokenizer().decode(ids.clone()).await?,
        };
        for mut c in choices::start(&state, p, n, pi as u32 * n, want_logprobs).await? {
            c.offset = echo.chars().count();
            c.prompt_logprobs = prompt_logprobs;
            if prompt_logprobs && req.common.stream {
                // Streamed, the echo waits for the first token, which brings its logprobs.
                c.lead = echo.clone();
                echoes.push(String::new());
            } else {
                echoes.push(echo.clone());
            }
            all.push(c);
        }
    }
    let meta = Meta::new(&state, "cmpl", prompt_tokens);
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    choices::respond(
        Completions { echoes },
        meta,
        all,
        stops,
        req.common.stream,
        include_usage,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::choices::tests::{text_chunk_both_ways, TRICKY};
    use proptest::prelude::*;

    #[test]
    fn text_chunks_render_as_the_json_tree() {
        let family = Completions { echoes: vec![] };
        for (i, text) in TRICKY.iter().enumerate() {
            let (fast, tree) = text_chunk_both_ways(&family, i as u32, text);
            assert_eq!(fast, tree);
        }
    }

    proptest! {
        #[test]
        fn any_text_chunk_renders_as_the_json_tree(text in any::<String>(), index in any::<u32>()) {
            let (fast, tree) = text_chunk_both_ways(&Completions { echoes: vec![] }, index, &text);
            prop_assert_eq!(fast, tree);
        }
    }
}
