//! Mistral (v0.3, Nemo): the special token `[TOOL_CALLS]` and then a JSON list of calls,
//! `[{"name": ..., "arguments": {...}}, ...]` (Nemo adds an `"id"`). The token is not in the
//! detokenized text, so the list is also read alone at the start of the answer.

use super::Framing;

pub const FRAMING: Framing = Framing {
    marker: "[TOOL_CALLS]",
    bare_at_start: true,
    open: &["["],
    separator: &[","],
};

/// The template teaches this format.
pub fn detect(template: &str) -> bool {
    template.contains("[TOOL_CALLS]")
}

#[cfg(test)]
mod tests {
    use super::super::tests::check;
    use super::super::ToolCallFormat::Mistral;

    #[test]
    fn v0_3_call_without_the_special_token() {
        // Mistral-7B-Instruct-v0.3: `[TOOL_CALLS]` is a control token, dropped from the text.
        check(
            Mistral,
            " [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}]",
            None,
            &[("get_weather", r#"{"city": "Paris", "unit": "celsius"}"#)],
        );
    }

    #[test]
    fn marker_in_the_text_and_two_calls_with_ids() {
        check(
            Mistral,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"a1b2c3d4e\"}, {\"name\": \"get_time\", \"arguments\": {\"timezone\": \"CET\"}, \"id\": \"f5g6h7i8j\"}]",
            None,
            &[
                ("get_weather", r#"{"city": "Paris"}"#),
                ("get_time", r#"{"timezone": "CET"}"#),
            ],
        );
        check(
            Mistral,
            "Let me check. [TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}]",
            Some("Let me check."),
            &[("get_time", "{}")],
        );
    }

    #[test]
    fn lists_that_are_not_calls_are_text() {
        for text in [
            "[1, 2, 3]",
            "[{\"city\": \"Paris\"}]",
            "[{\"name\": \"unknown_tool\", \"arguments\": {}}]",
            "Paris is [citation needed] nice.",
        ] {
            check(Mistral, text, Some(text), &[]);
        }
    }
}
