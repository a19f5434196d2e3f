//! An incremental reader of one tool-call object, `{"name": "...", "arguments": {...}}`, in
//! text that may still be growing. It only follows JSON's structure (strings, brackets), so
//! that a stream can report a call's name as soon as it is written and its arguments byte by
//! byte; whether the arguments are valid JSON is the model's (or the grammar's) business, as
//! with OpenAI's own answers.

/// Where a call's arguments are in the text.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgsSpan {
    /// Not seen yet (the object is still open).
    Pending,
    /// The raw JSON value from `start`: up to `end` once it is complete, else to the end of
    /// the text so far.
    Raw { start: usize, end: Option<usize> },
    /// The model wrote the arguments as a JSON string: its decoded content, once complete.
    Text(String),
    /// The object closed without arguments.
    Missing,
}

/// How far one object got.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectEnd {
    /// Closed; the object's last byte is before this offset.
    Complete(usize),
    /// The text ends inside it.
    Incomplete,
    /// Not a JSON object.
    Invalid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallObject {
    /// The `name` field, once its string is complete.
    pub name: Option<String>,
    pub args: ArgsSpan,
    pub end: ObjectEnd,
}

/// Result of reading one JSON value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueEnd {
    Complete(usize),
    Incomplete,
    Invalid,
}

pub fn skip_ws(text: &str, mut pos: usize) -> usize {
    let bytes = text.as_bytes();
    while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

/// The JSON string starting at `pos` (its opening quote): the offset after its closing quote.
fn string_end(bytes: &[u8], pos: usize) -> ValueEnd {
    let mut i = pos + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return ValueEnd::Complete(i + 1),
            _ => i += 1,
        }
    }
    ValueEnd::Incomplete
}

/// The JSON value starting at `pos` (no leading whitespace): the offset after it.
pub fn value_end(text: &str, pos: usize) -> ValueEnd {
    let bytes = text.as_bytes();
    let Some(&first) = bytes.get(pos) else {
        return ValueEnd::Incomplete;
    };
    match first {
        b'"' => string_end(bytes, pos),
        b'{' | b'[' => {
            let mut stack = Vec::with_capacity(8);
            let mut i = pos;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => match string_end(bytes, i) {
                        ValueEnd::Complete(e) => {
                            i = e;
                            continue;
                        }
                        other => return other,
                    },
                    b'{' => stack.push(b'}'),
                    b'[' => stack.push(b']'),
                    c @ (b'}' | b']') => {
                        if stack.pop() != Some(c) {
                            return ValueEnd::Invalid;
                        }
                        if stack.is_empty() {
                            return ValueEnd::Complete(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            ValueEnd::Incomplete
        }
        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
            let len = bytes[pos..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.'))
                .count();
            if pos + len == bytes.len() {
                // A number or literal can go on while the text grows.
                ValueEnd::Incomplete
            } else {
                ValueEnd::Complete(pos + len)
            }
        }
        _ => ValueEnd::Invalid,
    }
}

/// Reads the call object that starts at `pos` (after optional whitespace). `arguments` and
/// `parameters` (Llama's name) are the arguments; other fields are skipped.
pub fn call_object(text: &str, pos: usize) -> CallObject {
    let bytes = text.as_bytes();
    let mut call = CallObject {
        name: None,
        args: ArgsSpan::Pending,
        end: ObjectEnd::Incomplete,
    };
    let mut i = skip_ws(text, pos);
    match bytes.get(i) {
        None => return call,
        Some(b'{') => i += 1,
        Some(_) => {
            call.end = ObjectEnd::Invalid;
            return call;
        }
    }
    loop {
        i = skip_ws(text, i);
        match bytes.get(i) {
            None => return call,
            Some(b'}') => break,
            Some(b'"') => {}
            Some(_) => {
                call.end = ObjectEnd::Invalid;
                return call;
            }
        }
        let key_end = match string_end(bytes, i) {
            ValueEnd::Complete(e) => e,
            _ => return call,
        };
        let key: Option<String> = serde_json::from_str(&text[i..key_end]).ok();
        i = skip_ws(text, key_end);
        match bytes.get(i) {
            None => return call,
            Some(b':') => i = skip_ws(text, i + 1),
            Some(_) => {
                call.end = ObjectEnd::Invalid;
                return call;
            }
        }
        let start = i;
        let end = value_end(text, start);
        match key.as_deref() {
            Some("name") => match end {
                ValueEnd::Complete(e) => {
                    match serde_json::from_str::<serde_json::Value>(&text[start..e]) {
                        Ok(serde_json::Value::String(s)) => call.name = Some(s),
                        _ => {
                            call.end = ObjectEnd::Invalid;
                            return call;
                        }
                    }
                }
                ValueEnd::Incomplete => return call,
                ValueEnd::Invalid => {
                    call.end = ObjectEnd::Invalid;
                    return call;
                }
            },
            Some("arguments" | "parameters") => {
                let is_string = bytes.get(start) == Some(&b'"');
                match (end, is_string) {
                    (ValueEnd::Complete(e), true) => {
                        call.args = match serde_json::from_str::<String>(&text[start..e]) {
                            Ok(s) => ArgsSpan::Text(s),
                            Err(_) => ArgsSpan::Raw {
                                start,
                                end: Some(e),
                            },
                        }
                    }
                    (ValueEnd::Incomplete, true) => return call,
                    (ValueEnd::Complete(e), false) => {
                        call.args = ArgsSpan::Raw {
                            start,
                            end: Some(e),
                        }
                    }
                    // Unclosed or mismatched: everything from here on is the arguments.
                    (ValueEnd::Incomplete | ValueEnd::Invalid, false) => {
                        call.args = ArgsSpan::Raw { start, end: None };
                        if end == ValueEnd::Invalid {
                            call.end = ObjectEnd::Invalid;
                        }
                        return call;
                    }
                    (ValueEnd::Invalid, true) => unreachable!("a quote starts a string"),
                }
            }
            _ => match end {
                ValueEnd::Complete(_) => {}
                ValueEnd::Incomplete => return call,
                ValueEnd::Invalid => {
                    call.end = ObjectEnd::Invalid;
                    return call;
                }
            },
        }
        let ValueEnd::Complete(e) = end else {
            unreachable!("incomplete and invalid values returned above")
        };
        i = skip_ws(text, e);
        match bytes.get(i) {
            None => return call,
            Some(b',') => i += 1,
            Some(b'}') => break,
            Some(_) => {
                call.end = ObjectEnd::Invalid;
                return call;
            }
        }
    }
    if call.args == ArgsSpan::Pending {
        call.args = ArgsSpan::Missing;
    }
    call.end = ObjectEnd::Complete(i + 1);
    call
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_end_where_json_says() {
        assert_eq!(value_end(r#""a\"b" x"#, 0), ValueEnd::Complete(6));
        assert_eq!(
            value_end(r#"{"a": [1, "}"], "b": {}} tail"#, 0),
            ValueEnd::Complete(24)
        );
        assert_eq!(value_end(r#"{"a": [1"#, 0), ValueEnd::Incomplete);
        assert_eq!(value_end(r#"{"a": ]"#, 0), ValueEnd::Invalid);
        assert_eq!(value_end("12", 0), ValueEnd::Incomplete);
        assert_eq!(value_end("12,", 0), ValueEnd::Complete(2));
        assert_eq!(value_end("<x", 0), ValueEnd::Invalid);
    }

    #[test]
    fn a_call_is_read_as_it_grows() {
        let full = r#"{"name": "get_weather", "arguments": {"city": "Paris"}} rest"#;
        let args_start = full.find("{\"city").unwrap();
        let mut last_name = None;
        for end in 0..=full.len() {
            let c = call_object(&full[..end], 0);
            if c.name.is_some() {
                last_name = c.name.clone();
            }
            if end >= full.find(", \"arguments").unwrap() {
                assert_eq!(c.name.as_deref(), Some("get_weather"), "at {end}");
            } else {
                assert_eq!(c.name, None, "at {end}");
            }
            assert_ne!(c.end, ObjectEnd::Invalid, "at {end}");
        }
        assert_eq!(last_name.as_deref(), Some("get_weather"));
        let c = call_object(full, 0);
        assert_eq!(c.end, ObjectEnd::Complete(full.find(" rest").unwrap()));
        assert_eq!(
            c.args,
            ArgsSpan::Raw {
                start: args_start,
                end: Some(args_start + r#"{"city": "Paris"}"#.len())
            }
        );
        let partial = &full[..args_start + 5];
        assert_eq!(
            call_object(partial, 0).args,
            ArgsSpan::Raw {
                start: args_start,
                end: None
            }
        );
    }

    #[test]
    fn other_shapes() {
        let c = call_object(r#"{"parameters": {"x": 1}, "name": "f"}"#, 0);
        assert_eq!(c.name.as_deref(), Some("f"));
        assert!(matches!(c.args, ArgsSpan::Raw { end: Some(_), .. }));
        let c = call_object(r#"{"name": "f", "arguments": "{\"x\": 1}"}"#, 0);
        assert_eq!(c.args, ArgsSpan::Text(r#"{"x": 1}"#.into()));
        let c = call_object(r#"{"name": "f"}"#, 0);
        assert_eq!(c.args, ArgsSpan::Missing);
        assert_eq!(call_object("hello", 0).end, ObjectEnd::Invalid);
        assert_eq!(call_object(r#"{"name": 3}"#, 0).end, ObjectEnd::Invalid);
        assert_eq!(call_object("  ", 0).end, ObjectEnd::Incomplete);
    }
}
