//! Arbitrary request bodies through the router's parsing and validation, as the HTTP routes
//! run them: TGI's `GenerateRequest` → `validate_parameters` → `validate_length`, and the
//! OpenAI `ChatCompletionRequest` / `CompletionRequest` → TGI parameters → the same
//! validator, with chat messages rendered by the real chat templates of
//! router/tests/data/chat_templates. Nothing may panic, and what passes validation must
//! respect the limits it was checked against.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tensorgate_router::generation::chat_template::ChatTemplate;
use tensorgate_router::generation::validation::{validate_length, validate_parameters, Limits};
use tensorgate_router::http::openai::mapping as openai;
use tensorgate_router::http::openai::schemas::{ChatCompletionRequest, CompletionRequest};
use tensorgate_router::http::openai::tools;
use tensorgate_router::http::tgi::schemas::{GenerateParameters, GenerateRequest};
use tensorgate_router::pb;

/// A server with every feature on and the default flags, and a bare engine with small limits.
fn limits() -> &'static [Limits; 2] {
    static LIMITS: OnceLock<[Limits; 2]> = OnceLock::new();
    LIMITS.get_or_init(|| {
        [
            Limits {
                max_input_tokens: 8191,
                max_total_tokens: 8192,
                max_top_n_tokens: 5,
                max_stop_sequences: 4,
                max_stop_sequence_bytes: 256,
                max_best_of: 2,
                vocab_size: 49152,
                features: pb::Features {
                    logprobs: true,
                    seed: true,
                    top_k: true,
                    top_p: true,
                    typical_p: true,
                    repetition_penalty: true,
                    frequency_penalty: true,
                    presence_penalty: true,
                    guided_decoding: true,
                    prompt_logprobs: true,
                    ..Default::default()
                },
            },
            Limits {
                max_input_tokens: 3,
                max_total_tokens: 4,
                max_top_n_tokens: 0,
                max_stop_sequences: 1,
                max_stop_sequence_bytes: 2,
                max_best_of: 1,
                vocab_size: 100,
                features: pb::Features::default(),
            },
        ]
    })
}

const TEMPLATE_FILES: [&str; 8] = [
    include_str!("../../tests/data/chat_templates/smollm2.json"),
    include_str!("../../tests/data/chat_templates/llama-3.1.json"),
    include_str!("../../tests/data/chat_templates/llama-3.2.json"),
    include_str!("../../tests/data/chat_templates/mistral-v0.3.json"),
    include_str!("../../tests/data/chat_templates/mistral-nemo.json"),
    include_str!("../../tests/data/chat_templates/qwen2.5.json"),
    include_str!("../../tests/data/chat_templates/gemma-2.json"),
    include_str!("../../tests/data/chat_templates/phi-3.5.json"),
];

fn templates() -> &'static [ChatTemplate] {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        TEMPLATE_FILES
            .iter()
            .map(|text| {
                let v: Value = serde_json::from_str(text).expect("golden file is JSON");
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                ChatTemplate::new(s("chat_template"), s("bos_token"), s("eos_token"))
                    .expect("golden template parses")
            })
            .collect()
    })
}

/// Validates `p` against both limit sets and checks what an accepted request promises.
fn check(p: &GenerateParameters, prompt_len: usize) {
    for limits in limits() {
        let Ok(v) = validate_parameters(p, limits, || 42) else {
            continue;
        };
        let s = &v.sampling;
        assert!(s.temperature.is_finite() && s.temperature > 0.0, "{v:?}");
        assert!(s.top_p > 0.0 && s.top_p <= 1.0, "{v:?}");
        assert!(s.typical_p > 0.0 && s.typical_p <= 1.0, "{v:?}");
        assert!(
            s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0,
            "{v:?}"
        );
        assert!((-2.0..=2.0).contains(&s.frequency_penalty), "{v:?}");
        assert!((-2.0..=2.0).contains(&s.presence_penalty), "{v:?}");
        assert_eq!(
            s.do_sample,
            s.seed.is_some(),
            "a seed exactly when sampling: {v:?}"
        );
        if let Some(n) = v.max_new_tokens {
            assert!(n >= 1 && n <= limits.max_total_tokens, "{v:?}");
        }
        assert!(v.stop_sequences.len() <= limits.max_stop_sequences, "{v:?}");
        for stop in &v.stop_sequences {
            assert!(!stop.is_empty() && stop.len() <= limits.max_stop_sequence_bytes);
        }
        if let Some(t) = v.truncate {
            assert!(t >= 1 && t <= limits.max_input_tokens as usize, "{v:?}");
        }
        assert!(v.top_n_tokens <= limits.max_top_n_tokens, "{v:?}");
        assert!(v.best_of >= 1 && v.best_of <= limits.max_best_of, "{v:?}");
        assert!(v.best_of == 1 || s.do_sample, "best_of samples: {v:?}");
        assert!(
            !v.prompt_logprobs || limits.features.prompt_logprobs,
            "{v:?}"
        );

        // The prompt's token count is whatever the tokenizer made of it; any length will do.
        let ids: Vec<u32> = (0..prompt_len as u32).collect();
        if let Ok((kept, max_new)) = validate_length(ids, &v, limits) {
            assert!(!kept.is_empty() && kept.len() <= limits.max_input_tokens as usize);
            assert!(max_new >= 1, "{v:?}");
            assert!(kept.len() + max_new as usize <= limits.max_total_tokens as usize);
            if let Some(n) = v.max_new_tokens {
                assert_eq!(n, max_new);
            }
            if let Some(t) = v.truncate {
                assert!(kept.len() <= t);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Prompt lengths around the limits, from the body itself so that a crash reproduces.
    let prompt_len = data.len() % 9000;

    if let Ok(req) = serde_json::from_slice::<GenerateRequest>(data) {
        let given =
            req.inputs.as_ref().map_or(0, String::len) + req.input_ids.as_ref().map_or(0, Vec::len);
        check(&req.parameters, prompt_len.min(given * 4));
    }

    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        if let Some(p) =
            openai::to_generate_parameters(&req.common, req.max_tokens.or(Some(16))).ok()
        {
            check(&p, prompt_len);
        }
    }

    if let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        let max_tokens = req.max_completion_tokens.or(req.max_tokens);
        if let Some(p) = openai::to_generate_parameters(&req.common, max_tokens).ok() {
            check(&p, prompt_len);
        }
        if let Ok(messages) = tools::chat_messages(&req) {
            for template in templates() {
                // Tool fields are checked (and tool answers read) by the template's family.
                let Ok(setup) = tools::tool_setup(&req, template.tool_call_format()) else {
                    continue;
                };
                if let Some(reader) = &setup.reader {
                    let text = String::from_utf8_lossy(data);
                    let _ = reader.parse(&text);
                    let mut stream = reader.stream();
                    for piece in text.split_inclusive(['}', '>', ' ']) {
                        let _ = stream.push(piece);
                    }
                    let _ = stream.finish();
                }
                // Templates may refuse (raise_exception); they must not panic.
                let tools = setup.template_tools.as_ref();
                let _ = template.render_with_tools(&messages, tools, true);
                let _ = template.render_with_tools(&messages, tools, false);
            }
        }
    }

    // Bodies the router sees as JSON values first (grammar, tools, logit_bias are Values).
    let _ = serde_json::from_slice::<Value>(data);
});
