//! Golden tests: the router renders real chat templates exactly as transformers'
//! `apply_chat_template(..., tokenize=False)` does.
//!
//! Each tests/data/chat_templates/*.json holds a model's chat template, its bos/eos tokens and
//! cases (messages, with tool calls and tool results where the template knows them, and
//! optionally "tools", passed as `apply_chat_template(..., tools=...)` takes them) with the
//! string transformers renders ("expected") or the message of the exception the template
//! raises ("expected_error"). scripts/gen-chat-template-goldens regenerates
//! them with transformers; backends/trtllm/tests/test_chat_template_goldens.py checks that
//! they still match it.
//!
//! A template that calls `strftime_now` was rendered by transformers with its clock pinned to
//! the file's "clock"."now"; "clock"."strftime" maps each format to its text at that instant.
//! The router reads the real clock, so here that text is replaced by today's in the
//! expected string.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tensorgate_router::generation::chat_template::{ChatMessage, ChatTemplate};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_templates")
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/data/chat_templates")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn text<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: \"{key}\" must be a string"))
}

/// Loads the template the way the server does: from a tokenizer_config.json in a directory
/// (bos/eos as strings, or null as Qwen2.5's bos_token is).
fn load(golden: &Value, name: &str) -> ChatTemplate {
    let dir = std::env::temp_dir().join(format!(
        "tensorgate-chat-golden-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = serde_json::json!({
        "chat_template": golden["chat_template"],
        "bos_token": golden["bos_token"],
        "eos_token": golden["eos_token"],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write config");
    let template = ChatTemplate::load(&dir)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: no chat template found"));
    let _ = std::fs::remove_dir_all(&dir);
    template
}

/// `strftime_now(format)` as the router evaluates it now (or why it cannot).
fn strftime_now(format: &str) -> String {
    let src = format!(
        "{{{{ strftime_now({}) }}}}",
        serde_json::to_string(format).unwrap()
    );
    ChatTemplate::new(src, String::new(), String::new())
        .and_then(|t| t.render(&[], false))
        .unwrap_or_else(|e| format!("<strftime_now failed: {e}>"))
}

/// The pinned (format, text) pairs of a golden file, with today's text for each.
fn clock_substitutions(golden: &Value) -> Vec<(String, String)> {
    let Some(map) = golden.pointer("/clock/strftime").and_then(Value::as_object) else {
        return Vec::new();
    };
    map.iter()
        .map(|(format, pinned)| {
            let pinned = pinned.as_str().expect("clock.strftime values are strings");
            (pinned.to_string(), strftime_now(format))
        })
        .collect()
}

fn messages(case: &Value, what: &str) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: \"messages\" must be a list"))
        .iter()
        .map(|m| ChatMessage {
            role: text(m, "role", what).to_string(),
            content: text(m, "content", what).to_string(),
            name: None,
            tool_calls: m.get("tool_calls").map(|c| {
                c.as_array()
                    .unwrap_or_else(|| panic!("{what}: \"tool_calls\" must be a list"))
                    .clone()
            }),
            tool_call_id: m
                .get("tool_call_id")
                .map(|_| text(m, "tool_call_id", what).to_string()),
        })
        .collect()
}

#[test]
fn rust_renders_real_chat_templates_as_transformers_does() {
    let files = golden_files();
    assert!(
        files.len() >= 5,
        "expected at least five golden templates, found {files:?}"
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}")),
        )
        .unwrap_or_else(|e| panic!("{path:?} is not JSON: {e}"));
        let template = load(&golden, &name);
        let cases = golden["cases"].as_array().expect("\"cases\" list");
        assert!(!cases.is_empty(), "{name}: no cases");
        for (i, case) in cases.iter().enumerate() {
            let what = format!(
                "{name} case {i} ({})",
                case["note"].as_str().unwrap_or("no note")
            );
            let msgs = messages(case, &what);
            let add_generation_prompt = case["add_generation_prompt"]
                .as_bool()
                .unwrap_or_else(|| panic!("{what}: add_generation_prompt must be a bool"));
            // Renders with the date read before and after agreeing (not across midnight).
            let (rendered, dates) = loop {
                let before = clock_substitutions(&golden);
                let rendered =
                    template.render_with_tools(&msgs, case.get("tools"), add_generation_prompt);
                if clock_substitutions(&golden) == before {
                    break (rendered, before);
                }
            };
            match (case.get("expected"), case.get("expected_error")) {
                (Some(expected), None) => {
                    let mut expected = expected.as_str().expect("expected string").to_string();
                    for (pinned, today) in &dates {
                        expected = expected.replace(pinned, today);
                    }
                    match rendered {
                        Ok(got) if got == expected => {}
                        Ok(got) => failures.push(format!(
                            "{what}: rendering differs\n  transformers: {expected:?}\n  router:       {got:?}"
                        )),
                        Err(e) => failures.push(format!(
                            "{what}: the router failed ({e}) where transformers rendered {expected:?}"
                        )),
                    }
                }
                (None, Some(error)) => {
                    let error = error.as_str().expect("expected_error string");
                    match rendered {
                        Err(e) if e.contains(error) => {}
                        Err(e) => failures.push(format!(
                            "{what}: error {e:?} does not contain transformers' {error:?}"
                        )),
                        Ok(got) => failures.push(format!(
                            "{what}: rendered {got:?} where transformers raised {error:?}"
                        )),
                    }
                }
                _ => panic!("{what}: needs exactly one of \"expected\" and \"expected_error\""),
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_pinned_clock_is_replaced_by_todays_date() {
    // The substitution above must not hide a router that ignores strftime_now: today's date
    // is what Llama 3.2's template renders, not its fallback "26 Jul 2024".
    let path = golden_dir().join("llama-3.2.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let template = load(&golden, "llama-3.2-clock");
    let user = ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
        ..Default::default()
    };
    let before = strftime_now("%d %b %Y");
    let out = template.render(&[user], true).expect("render");
    let after = strftime_now("%d %b %Y");
    assert!(
        [before, after]
            .iter()
            .any(|today| out.contains(&format!("Today Date: {today}\n"))),
        "today's date not in {out:?}"
    );
}
