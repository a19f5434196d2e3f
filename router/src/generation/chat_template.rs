//! Chat templates from the model's tokenizer_config.json, rendered with minijinja the way
//! transformers renders them (trim_blocks, lstrip_blocks, Python string methods, and the
//! helpers transformers' chat template environment adds: `raise_exception`, `strftime_now`
//! and a `tojson` filter that writes what Python's `json.dumps` writes).
//! router/tests/chat_template_goldens.rs checks real templates against transformers' output.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{from_args, Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::generation::tool_parsers::{ToolCallFormat, ToolCallParser};

/// A message as transformers hands it to a template. Absent fields are left out, not null:
/// templates test `'tool_calls' in message` and `message.tool_call_id is defined`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// OpenAI's participant name; templates that know `message.name` render it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant's calls: `{"id", "type": "function", "function": {"name", "arguments"}}`
    /// with the arguments as an object, as transformers documents them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the model writes tool calls: detected from the template's text unless
    /// `--tool-call-parser` names it.
    tool_call_format: ToolCallFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// A special token is a plain string or an `{"content": ...}` object in tokenizer_config.json.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads the template of a tokenizer directory: `chat_template` in tokenizer_config.json
    /// (a string, or a list of named templates of which "default" is taken), else
    /// chat_template.jinja. `Ok(None)` when the model has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{} is not valid JSON: {e}", config_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let Some(template) = template else {
            return Ok(None);
        };
        Self::new(
            template,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )
        .map(Some)
    }

    pub fn new(template: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // Llama 3.2's template asks for today's date this way, falling back to a fixed date
        // when the function is not there.
        env.add_function("strftime_now", |format: String| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            strftime(now, &format)
        });
        // minijinja's own tojson writes compact JSON with <, >, & and ' escaped for HTML;
        // transformers replaces Jinja's with json.dumps, as tool-calling templates expect.
        env.add_filter("tojson", py_tojson);
        let tool_call_format = ToolCallFormat::detect(&template);
        env.add_template_owned("chat", template)
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            tool_call_format,
        })
    }

    /// `--tool-call-parser`: a named family overrides what the template's text suggests.
    pub fn with_tool_call_parser(mut self, parser: ToolCallParser) -> Self {
        if parser != ToolCallParser::Auto {
            self.tool_call_format = ToolCallFormat::resolve(parser, None);
        }
        self
    }

    /// The tool-call format the model writes (the parser of its answers and the shape of
    /// the grammar that forces a call).
    pub fn tool_call_format(&self) -> ToolCallFormat {
        self.tool_call_format
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// As transformers' `apply_chat_template(messages, tools=tools)`: `tools` is the list of
    /// function definitions (OpenAI's `tools`, passed as they are), `none` without tools.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template missing: {e}"))?;
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                documents => (),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| format!("chat template failed: {e}"))
    }
}

/// Python's `datetime.strftime` for the C directives chat templates use, of a UTC time
/// given in seconds since the epoch. transformers' `strftime_now` formats a naive local
/// `datetime.now()`; servers run in UTC, and a naive time has empty `%z` and `%Z`. glibc's
/// `-` flag (no padding, `%-d`) is understood; other unknown directives are kept as written.
fn strftime(epoch_secs: i64, format: &str) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // 1970-01-01 was a Thursday; index 0 is Monday.
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match chars.next() {
            Some('Y') => num(&mut out, year, 4),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month.into(), 2),
            Some('d') => num(&mut out, day.into(), 2),
            Some('e') if !unpadded => {
                let _ = write!(out, "{day:>2}");
            }
            Some('e') => num(&mut out, day.into(), 1),
            Some('j') => num(&mut out, yday, 3),
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('u') => num(&mut out, weekday as i64 + 1, 1),
            Some('w') => num(&mut out, (weekday as i64 + 1) % 7, 1),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('B') => out.push_str(month_name),
            Some('b' | 'h') => out.push_str(&month_name[..3]),
            Some('F') => {
                let _ = write!(out, "{year:04}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('z' | 'Z') => {}
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The `tojson` filter of transformers' chat template environment:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// arguments by position or by name.
fn py_tojson(value: &Value, args: Rest<Value>) -> Result<Value, minijinja::Error> {
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut opts: [Option<Value>; 4] = Default::default();
    for (i, name) in NAMES.iter().enumerate() {
        let by_name: Option<Value> = kwargs.get(name)?;
        opts[i] = match (positional.get(i), by_name) {
            (Some(_), Some(_)) => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ))
            }
            (Some(v), None) => Some(v.clone()),
            (None, v) => v,
        };
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let some = |v: Option<Value>| v.filter(|v| !v.is_none() && !v.is_undefined());
    let indent = match some(indent) {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) if v.is_integer() => Some(" ".repeat(usize::try_from(v).unwrap_or(0))),
        Some(v) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: indent must be an integer or a string, not {}",
                    v.kind()
                ),
            ))
        }
    };
    let (item_sep, key_sep) = match some(separators) {
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let dumper = JsonDumper {
        ensure_ascii: some(ensure_ascii).is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: some(sort_keys).is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` (allow_nan, with the given options) over minijinja values.
struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonDumper {
    fn dump(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => {
                let _ = write!(out, "{v}");
            }
            ValueKind::Number => out.push_str(&py_float_repr(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(('[', ']'), items.len(), depth, out, |i, out| {
                    self.dump(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((self.key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(('{', '}'), entries.len(), depth, out, |i, out| {
                    self.string(&entries[i].0, out);
                    out.push_str(&self.key_sep);
                    self.dump(&entries[i].1, depth + 1, out)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// A dict key as json.dumps writes it: strings as they are, numbers, bools and None
    /// as their JSON text.
    fn key(&self, key: &Value) -> Result<String, minijinja::Error> {
        Ok(match key.kind() {
            ValueKind::String => key.as_str().unwrap_or_default().to_string(),
            ValueKind::None | ValueKind::Bool | ValueKind::Number => {
                let mut s = String::new();
                self.dump(key, 0, &mut s)?;
                s
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("keys must be str, int, float, bool or None, not {kind}"),
                ))
            }
        })
    }

    fn container(
        &self,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(indent);
                }
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, depth + 1);
            item(i, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents
/// from -4 to 15, else `1e+16` style; NaN and the infinities as json.dumps writes them.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e-7", "-1e20", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let (int_part, frac_part) = if point <= 0 {
            (
                "0".to_string(),
                format!("{}{digits}", "0".repeat((-point) as usize)),
            )
        } else if point as usize >= digits.len() {
            (
                format!("{digits}{}", "0".repeat(point as usize - digits.len())),
                "0".to_string(),
            )
        } else {
            (
                digits[..point as usize].to_string(),
                digits[point as usize..].to_string(),
            )
        };
        format!("{sign}{int_part}.{frac_part}")
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
            ..Default::default()
        }]
    }

    #[test]
    fn a_message_name_reaches_templates_that_use_it() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}: {{ m.content }}\n{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .expect("template");
        let mut messages = user("Hi");
        messages[0].name = Some("ada".into());
        assert_eq!(
            t.render(&messages, false).expect("render"),
            "user(ada): Hi\n"
        );
        assert_eq!(t.render(&user("Hi"), false).expect("render"), "user: Hi\n");
    }

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML.into(), "<|im_start|>".into(), "<|im_end|>".into())
            .expect("template");
        let out = t.render(&user("Hi"), true).expect("render");
        assert_eq!(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['content'].strip() == '' %}{{ raise_exception('empty message') }}{% endif %}{{ bos_token }}{{ messages[0]['content'].upper() }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).expect("template");
        assert_eq!(t.render(&user(" hi "), false).expect("render"), "<s> HI ");
        let e = t.render(&user("  "), false).unwrap_err();
        assert!(e.contains("empty message"), "{e}");
    }

    fn render_src(src: &str) -> Result<String, String> {
        ChatTemplate::new(src.into(), String::new(), String::new())?.render(&[], false)
    }

    #[test]
    fn strftime_writes_what_python_writes() {
        // Expected strings from Python:
        // datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).strftime(fmt)
        let fmt = "%d %b %Y|%B %-d, %Y|%a %A %j %u %w|%H:%M:%S %I%p %y %m %e|%F %T|%%|%z%Z|%Q";
        let cases = [
            (0, "01 Jan 1970|January 1, 1970|Thu Thursday 001 4 4|00:00:00 12AM 70 01  1|1970-01-01 00:00:00|%||%Q"),
            (1_722_000_000, "26 Jul 2024|July 26, 2024|Fri Friday 208 5 5|13:20:00 01PM 24 07 26|2024-07-26 13:20:00|%||%Q"),
            (951_868_799, "29 Feb 2000|February 29, 2000|Tue Tuesday 060 2 2|23:59:59 11PM 00 02 29|2000-02-29 23:59:59|%||%Q"),
            (1_735_603_200, "31 Dec 2024|December 31, 2024|Tue Tuesday 366 2 2|00:00:00 12AM 24 12 31|2024-12-31 00:00:00|%||%Q"),
            (-86_400, "31 Dec 1969|December 31, 1969|Wed Wednesday 365 3 3|00:00:00 12AM 69 12 31|1969-12-31 00:00:00|%||%Q"),
        ];
        for (t, want) in cases {
            assert_eq!(strftime(t, fmt), want, "t={t}");
        }
        let today = render_src("{{ strftime_now('%Y-%m-%d') }}").expect("render");
        assert_eq!(today.len(), 10, "{today}");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        // Expected strings from transformers' tojson (json.dumps) on the same values.
        let cases = [
            (
                r#"{{ {"a": "<é&'\"\n", "b": [1, 2.5, none, true]} | tojson }}"#,
                r#"{"a": "<é&'\"\n", "b": [1, 2.5, null, true]}"#,
            ),
            (
                r#"{{ {"b": 1, "a": {"c": []}} | tojson(indent=2, sort_keys=true) }}"#,
                "{\n  \"a\": {\n    \"c\": []\n  },\n  \"b\": 1\n}",
            ),
            (
                r#"{{ ["é", "😀"] | tojson(ensure_ascii=true) }}"#,
                r#"["\u00e9", "\ud83d\ude00"]"#,
            ),
            (
                r#"{{ [1, {"x": 2}] | tojson(separators=(",", ":")) }}"#,
                r#"[1,{"x":2}]"#,
            ),
            (
                "{{ [1e20, 1e-5, 0.1, 100.0, -0.0, 123456789012345.6] | tojson }}",
                "[1e+20, 1e-05, 0.1, 100.0, -0.0, 123456789012345.6]",
            ),
            ("{{ 'plain' | tojson }}", r#""plain""#),
        ];
        for (src, want) in cases {
            assert_eq!(render_src(src).expect(src), want, "{src}");
        }
        assert!(render_src("{{ 1 | tojson(bogus=1) }}").is_err());
    }

    #[test]
    fn a_broken_template_is_reported_at_load() {
        let e = ChatTemplate::new("{% for %}".into(), String::new(), String::new()).unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
    }
}
