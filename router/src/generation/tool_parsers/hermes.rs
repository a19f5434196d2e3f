//! Hermes / Qwen: each call is a JSON object between `<tool_call>` and `</tool_call>`, one
//! block per call; text before the first block is the answer's content. Qwen2.5 and Qwen3
//! write `{"name": ..., "arguments": {...}}`, Hermes 2 Pro `{"arguments": ..., "name": ...}`.

use super::Framing;

pub const FRAMING: Framing = Framing {
    marker: "<tool_call>",
    bare_at_start: false,
    open: &[],
    separator: &["</tool_call>", "<tool_call>"],
};

/// The template teaches this format.
pub fn detect(template: &str) -> bool {
    template.contains("<tool_call>")
}

#[cfg(test)]
mod tests {
    use super::super::tests::check;
    use super::super::ToolCallFormat::Hermes;

    const WEATHER: (&str, &str) = ("get_weather", r#"{"city": "Paris", "unit": "celsius"}"#);

    #[test]
    fn qwen_single_call() {
        // Qwen2.5-7B-Instruct's answer to "What is the weather in Paris?" with a weather tool.
        check(
            Hermes,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
            None,
            &[WEATHER],
        );
    }

    #[test]
    fn qwen_parallel_calls_with_text_before() {
        check(
            Hermes,
            "I'll look both up.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>",
            Some("I'll look both up."),
            &[WEATHER, ("get_time", r#"{"timezone": "Europe/Paris"}"#)],
        );
    }

    #[test]
    fn qwen3_after_thinking() {
        check(
            Hermes,
            "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
            Some("<think>\nThe user wants the weather.\n</think>"),
            &[WEATHER],
        );
    }

    #[test]
    fn hermes_2_pro_arguments_first() {
        check(
            Hermes,
            "<tool_call>\n{\"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}, \"name\": \"get_weather\"}\n</tool_call>",
            None,
            &[WEATHER],
        );
    }

    #[test]
    fn arguments_as_a_json_string_and_none() {
        check(
            Hermes,
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\", \\\"unit\\\": \\\"celsius\\\"}\"}</tool_call>",
            None,
            &[WEATHER],
        );
        check(
            Hermes,
            "<tool_call>{\"name\": \"get_time\"}</tool_call>",
            None,
            &[("get_time", "{}")],
        );
    }

    #[test]
    fn what_is_not_a_call_stays_text() {
        // No block, a block that is not JSON, a function that was not offered.
        for text in [
            "The weather in Paris is mild.",
            "Use <tool_call> tags to call tools.",
            "<tool_call>\n{\"name\": \"launch_rocket\", \"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        ] {
            check(Hermes, text, Some(text), &[]);
        }
    }

    #[test]
    fn an_unfinished_call_keeps_what_was_written() {
        // max_tokens ran out inside the arguments: the stream already sent them.
        check(
            Hermes,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
            None,
            &[("get_weather", "{\"city\": \"Par")],
        );
    }

    #[test]
    fn text_after_the_calls_is_dropped() {
        check(
            Hermes,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\nDone!",
            None,
            &[("get_time", "{}")],
        );
    }
}
