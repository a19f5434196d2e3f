//! Tool calls in generated text: each model family writes them its own way (`hermes.rs`,
//! `llama3_json.rs`, `mistral.rs`: one `Framing` each); one reader (`scan`) finds them, the
//! same way for a whole answer (`parse`) and for a stream (`ToolCallStream`), so that the
//! streamed deltas assemble to the answer's calls. `grammar.rs` builds the grammar that
//! forces a call in a family's format (tool_choice `required` or a named function).
//!
//! The text read here is the detokenized output, without special tokens: where a family
//! opens its calls with a special token (Llama's `<|python_tag|>`, Mistral's `[TOOL_CALLS]`)
//! the calls are also found without it, at the start of the output.

pub mod grammar;
pub mod hermes;
mod json_scan;
pub mod llama3_json;
pub mod mistral;

use std::collections::HashSet;

use json_scan::{call_object, skip_ws, ArgsSpan, ObjectEnd};

/// `--tool-call-parser`: the family whose tool-call format the served model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolCallParser {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5/3).
    Hermes,
    /// `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or alone (Llama 3.1+).
    #[value(name = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]` (Mistral v0.3, Nemo).
    Mistral,
    /// Detected from the chat template's text (Hermes when it shows none of them).
    Auto,
}

/// A tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolCallFormat {
    /// The format `flag` names, or for `auto` the one the chat template writes.
    pub fn resolve(flag: ToolCallParser, template: Option<&str>) -> Self {
        match flag {
            ToolCallParser::Hermes => Self::Hermes,
            ToolCallParser::Llama3Json => Self::Llama3Json,
            ToolCallParser::Mistral => Self::Mistral,
            ToolCallParser::Auto => template.map_or(Self::Hermes, Self::detect),
        }
    }

    /// The format a chat template teaches its model (Hermes when it shows none).
    pub fn detect(template: &str) -> Self {
        if hermes::detect(template) {
            Self::Hermes
        } else if mistral::detect(template) {
            Self::Mistral
        } else if llama3_json::detect(template) {
            Self::Llama3Json
        } else {
            Self::Hermes
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
        }
    }

    fn framing(self) -> &'static Framing {
        match self {
            Self::Hermes => &hermes::FRAMING,
            Self::Llama3Json => &llama3_json::FRAMING,
            Self::Mistral => &mistral::FRAMING,
        }
    }
}

/// How a family frames its calls; whitespace is allowed around every piece.
pub struct Framing {
    /// Opens the calls anywhere in the output; the text before it is the answer's content.
    pub marker: &'static str,
    /// The calls may also begin the output without the marker (a special token that the
    /// detokenized text does not show).
    pub bare_at_start: bool,
    /// After the marker (or at the start), before the first call object.
    pub open: &'static [&'static str],
    /// Between two call objects.
    pub separator: &'static [&'static str],
}

/// One call found in the text.
#[derive(Debug, Clone, PartialEq)]
struct ScannedCall {
    name: String,
    args: ArgsSpan,
}

/// What the text says so far.
#[derive(Debug, Default)]
struct Scan {
    /// The bytes of the text that stay content whatever follows (with calls: the content).
    settled: usize,
    calls: Vec<ScannedCall>,
}

/// Whether `text` from `pos` matches `pieces` (whitespace between them allowed).
enum Pieces {
    Matched(usize),
    /// The text ends inside them.
    Pending,
    NoMatch,
}

fn match_pieces(text: &str, mut pos: usize, pieces: &[&str]) -> Pieces {
    for piece in pieces {
        pos = skip_ws(text, pos);
        let rest = &text[pos..];
        if rest.starts_with(piece) {
            pos += piece.len();
        } else if piece.starts_with(rest) {
            return Pieces::Pending;
        } else {
            return Pieces::NoMatch;
        }
    }
    Pieces::Matched(pos)
}

/// The length of the longest end of `text` that begins `marker` (and could become it).
fn marker_prefix_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Content that can be settled: without a held-back marker prefix and trailing whitespace
/// (which would end the content if a call follows).
fn settled_before(text: &str, end: usize) -> usize {
    text[..end].trim_end().len()
}

/// The calls in `text` of functions named in `tools`, at most `max_calls`.
fn scan(f: &Framing, text: &str, tools: &HashSet<String>, max_calls: usize) -> Scan {
    let lead = skip_ws(text, 0);
    // Where the calls would begin, and the first call object's offset.
    let (start, mut pos) = if let Some(m) = text.find(f.marker) {
        match match_pieces(text, m + f.marker.len(), f.open) {
            Pieces::Matched(p) => (m, p),
            Pieces::Pending => {
                return Scan {
                    settled: settled_before(text, m),
                    ..Scan::default()
                }
            }
            Pieces::NoMatch => return all_content(text),
        }
    } else {
        let bare = if f.bare_at_start {
            match match_pieces(text, lead, f.open) {
                Pieces::Matched(p) => {
                    let p = skip_ws(text, p);
                    match text.as_bytes().get(p) {
                        Some(b'{') => Some(Ok(p)),
                        None => Some(Err(())),
                        Some(_) => None,
                    }
                }
                Pieces::Pending => Some(Err(())),
                Pieces::NoMatch => None,
            }
        } else {
            None
        };
        match bare {
            Some(Ok(p)) => (0, p),
            // The start of the output could still open calls (or the marker).
            Some(Err(())) => return Scan::default(),
            None if f.bare_at_start && f.marker.starts_with(&text[lead..]) => {
                return Scan::default()
            }
            None => {
                let held = marker_prefix_len(text, f.marker);
                return Scan {
                    settled: settled_before(text, text.len() - held),
                    ..Scan::default()
                };
            }
        }
    };
    let mut calls = Vec::new();
    loop {
        let object = call_object(text, pos);
        match object.name {
            Some(name) if tools.contains(&name) => calls.push(ScannedCall {
                name,
                args: object.args,
            }),
            // A known call may be followed by anything; before one, the text is content.
            _ if !calls.is_empty() => break,
            Some(_) => return all_content(text),
            None if object.end != ObjectEnd::Incomplete => return all_content(text),
            None => {
                return Scan {
                    settled: settled_before(text, start),
                    ..Scan::default()
                }
            }
        }
        let ObjectEnd::Complete(end) = object.end else {
            break;
        };
        if calls.len() >= max_calls {
            break;
        }
        match match_pieces(text, end, f.separator) {
            Pieces::Matched(p) => pos = p,
            Pieces::Pending | Pieces::NoMatch => break,
        }
    }
    Scan {
        settled: settled_before(text, start),
        calls,
    }
}

/// The text holds no call (of a given function, in the family's format).
fn all_content(text: &str) -> Scan {
    Scan {
        settled: text.len(),
        ..Scan::default()
    }
}

/// A call's arguments as they stand: the raw JSON text, or a string's content.
/// Unfinished raw arguments run to the end of the text, as a stream has sent them.
fn arguments<'a>(text: &'a str, args: &'a ArgsSpan) -> &'a str {
    match args {
        ArgsSpan::Pending => "",
        ArgsSpan::Raw { start, end } => &text[*start..end.unwrap_or(text.len())],
        ArgsSpan::Text(s) => s,
        ArgsSpan::Missing => "{}",
    }
}

/// How the answers of one request read tool calls.
#[derive(Debug, Clone)]
pub struct ToolCallReader {
    format: ToolCallFormat,
    /// Only calls of these functions are calls; any other text is content.
    tools: HashSet<String>,
    /// `parallel_tool_calls: false` → 1.
    max_calls: usize,
}

/// A call of the whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A whole answer read for tool calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The text before the calls (all of it when there are none); `None` when empty
    /// and there are calls.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl ToolCallReader {
    pub fn new(
        format: ToolCallFormat,
        tools: impl IntoIterator<Item = String>,
        parallel: bool,
    ) -> Self {
        Self {
            format,
            tools: tools.into_iter().collect(),
            max_calls: if parallel { usize::MAX } else { 1 },
        }
    }

    fn scan(&self, text: &str) -> Scan {
        scan(self.format.framing(), text, &self.tools, self.max_calls)
    }

    /// Reads a whole answer.
    pub fn parse(&self, text: &str) -> Parsed {
        let s = self.scan(text);
        if s.calls.is_empty() {
            return Parsed {
                content: Some(text.to_string()),
                calls: Vec::new(),
            };
        }
        let content = &text[..s.settled];
        Parsed {
            content: (!content.is_empty()).then(|| content.to_string()),
            calls: s
                .calls
                .iter()
                .map(|c| ToolCall {
                    id: new_call_id(self.format),
                    name: c.name.clone(),
                    arguments: arguments(text, &c.args).to_string(),
                })
                .collect(),
        }
    }

    /// Reads an answer as it streams.
    pub fn stream(&self) -> ToolCallStream {
        ToolCallStream {
            reader: self.clone(),
            text: String::new(),
            content_sent: 0,
            sent: Vec::new(),
        }
    }
}

/// A call id: OpenAI's shape, `call_` and 24 letters or digits; for Mistral the 9 letters or
/// digits its chat template demands when the call comes back in the next request.
pub fn new_call_id(format: ToolCallFormat) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    match format {
        ToolCallFormat::Mistral => Alphanumeric.sample_string(&mut rand::rng(), 9),
        _ => format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24)),
    }
}

/// What a stream of text adds to an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    /// A new call, in order (`index` from 0).
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of a call's arguments.
    Arguments { index: usize, fragment: String },
}

/// One choice's text and calls as they stream: content until a call may begin (held back
/// while it could), then each call's name as soon as it is whole and its arguments piece by
/// piece. What it sends assembles to what `ToolCallReader::parse` gives for the whole text.
#[derive(Debug)]
pub struct ToolCallStream {
    reader: ToolCallReader,
    text: String,
    content_sent: usize,
    /// Per call sent: the bytes of its arguments sent.
    sent: Vec<usize>,
}

/// What one piece of streamed text gives.
#[derive(Debug, Default, PartialEq)]
pub struct StreamDelta {
    pub content: String,
    pub calls: Vec<ToolDelta>,
}

impl StreamDelta {
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.calls.is_empty()
    }
}

impl ToolCallStream {
    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> StreamDelta {
        self.text.push_str(piece);
        self.advance(false)
    }

    /// The text ended: whatever was held back.
    pub fn finish(&mut self) -> StreamDelta {
        self.advance(true)
    }

    /// Whether calls were sent.
    pub fn has_calls(&self) -> bool {
        !self.sent.is_empty()
    }

    fn advance(&mut self, at_end: bool) -> StreamDelta {
        let s = self.reader.scan(&self.text);
        let mut out = StreamDelta::default();
        let content_end = if at_end && s.calls.is_empty() {
            self.text.len()
        } else {
            s.settled
        };
        if content_end > self.content_sent {
            out.content = self.text[self.content_sent..content_end].to_string();
            self.content_sent = content_end;
        }
        for (index, call) in s.calls.iter().enumerate() {
            if index == self.sent.len() {
                self.sent.push(0);
                out.calls.push(ToolDelta::Call {
                    index,
                    id: new_call_id(self.reader.format),
                    name: call.name.clone(),
                });
            }
            let args = arguments(&self.text, &call.args);
            let sent = &mut self.sent[index];
            // Arguments only grow while the text does; a string's content arrives whole.
            if args.len() > *sent {
                if let Some(fragment) = args.get(*sent..) {
                    out.calls.push(ToolDelta::Arguments {
                        index,
                        fragment: fragment.to_string(),
                    });
                }
                *sent = args.len();
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn reader(format: ToolCallFormat) -> ToolCallReader {
        ToolCallReader::new(
            format,
            ["get_weather".to_string(), "get_time".to_string()],
            true,
        )
    }

    /// Streams `text` in pieces of `step` bytes (on char boundaries) and assembles the deltas
    /// as an OpenAI client does.
    pub(crate) fn assemble(
        r: &ToolCallReader,
        text: &str,
        step: usize,
    ) -> (String, Vec<(String, String)>) {
        let mut s = r.stream();
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        let mut apply = |d: StreamDelta, content: &mut String| {
            content.push_str(&d.content);
            for c in d.calls {
                match c {
                    ToolDelta::Call { index, name, id } => {
                        assert_eq!(index, calls.len());
                        assert!(id.len() == 9 || (id.starts_with("call_") && id.len() == 29));
                        calls.push((name, String::new()));
                    }
                    ToolDelta::Arguments { index, fragment } => calls[index].1.push_str(&fragment),
                }
            }
        };
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            apply(s.push(&text[i..j]), &mut content);
            i = j;
        }
        apply(s.finish(), &mut content);
        (content, calls)
    }

    /// The whole answer and its stream, in every piece size, agree.
    pub(crate) fn check(
        format: ToolCallFormat,
        text: &str,
        content: Option<&str>,
        calls: &[(&str, &str)],
    ) {
        let r = reader(format);
        let parsed = r.parse(text);
        assert_eq!(parsed.content.as_deref(), content, "content of {text:?}");
        let got: Vec<(&str, &str)> = parsed
            .calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, calls, "calls of {text:?}");
        for step in [1, 2, 3, 7, 1000] {
            let (streamed, streamed_calls) = assemble(&r, text, step);
            assert_eq!(
                streamed,
                content.unwrap_or(""),
                "streamed content, step {step}"
            );
            let streamed_calls: Vec<(&str, &str)> = streamed_calls
                .iter()
                .map(|(n, a)| (n.as_str(), a.as_str()))
                .collect();
            assert_eq!(streamed_calls, calls, "streamed calls, step {step}");
        }
    }

    #[test]
    fn detection_from_real_templates() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_templates");
        for (file, want) in [
            ("qwen2.5.json", ToolCallFormat::Hermes),
            ("llama-3.1.json", ToolCallFormat::Llama3Json),
            ("llama-3.2.json", ToolCallFormat::Llama3Json),
            ("mistral-v0.3.json", ToolCallFormat::Mistral),
            ("mistral-nemo.json", ToolCallFormat::Mistral),
            ("smollm2.json", ToolCallFormat::Hermes),
        ] {
            let golden: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(file)).expect(file))
                    .expect("json");
            let template = golden["chat_template"].as_str().expect("template");
            assert_eq!(ToolCallFormat::detect(template), want, "{file}");
            assert_eq!(
                ToolCallFormat::resolve(ToolCallParser::Auto, Some(template)),
                want
            );
        }
        assert_eq!(
            ToolCallFormat::resolve(ToolCallParser::Mistral, None),
            ToolCallFormat::Mistral
        );
        assert_eq!(
            ToolCallFormat::resolve(ToolCallParser::Auto, None),
            ToolCallFormat::Hermes
        );
    }

    #[test]
    fn plain_text_streams_as_it_comes() {
        let r = reader(ToolCallFormat::Hermes);
        let mut s = r.stream();
        assert_eq!(s.push("Hello").content, "Hello");
        // Whitespace and a possible marker are held until they cannot open a call.
        assert_eq!(s.push(" <tool").content, "");
        assert_eq!(s.push("s> are").content, " <tools> are");
        assert_eq!(s.push(" \n").content, "");
        assert_eq!(s.finish().content, " \n");
        assert!(!s.has_calls());
    }

    #[test]
    fn parallel_false_keeps_the_first_call() {
        let r = ToolCallReader::new(ToolCallFormat::Hermes, ["f".to_string()], false);
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 2}}\n</tool_call>";
        let p = r.parse(text);
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].arguments, "{\"a\": 1}");
        let (_, streamed) = assemble(&r, text, 3);
        assert_eq!(streamed, vec![("f".to_string(), "{\"a\": 1}".to_string())]);
    }

    #[test]
    fn ids_are_openai_shaped_and_distinct() {
        let a = new_call_id(ToolCallFormat::Hermes);
        assert!(a.starts_with("call_") && a.len() == 29);
        assert!(a[5..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, new_call_id(ToolCallFormat::Hermes));
        let m = new_call_id(ToolCallFormat::Mistral);
        assert!(
            m.len() == 9 && m.chars().all(|c| c.is_ascii_alphanumeric()),
            "{m}"
        );
    }
}
