//! Llama 3.1 / 3.2 / 3.3 JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole
//! answer, after the special token `<|python_tag|>` (which the detokenized text does not
//! show) or alone; several calls separated by `;`. Content before `<|python_tag|>` is kept
//! where the tag is in the text.

use super::Framing;

pub const FRAMING: Framing = Framing {
    marker: "<|python_tag|>",
    bare_at_start: true,
    open: &[],
    separator: &[";"],
};

/// The template teaches this format: Llama's header tokens with a `parameters` object.
pub fn detect(template: &str) -> bool {
    template.contains("<|python_tag|>")
        || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
}

#[cfg(test)]
mod tests {
    use super::super::tests::check;
    use super::super::ToolCallFormat::Llama3Json;

    #[test]
    fn llama_3_2_call() {
        // Llama-3.2-3B-Instruct's answer with the weather tool (no python tag).
        check(
            Llama3Json,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            None,
            &[("get_weather", r#"{"city": "Paris"}"#)],
        );
    }

    #[test]
    fn llama_3_1_with_the_python_tag_in_the_text() {
        check(
            Llama3Json,
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            None,
            &[("get_weather", r#"{"city": "Paris"}"#)],
        );
        check(
            Llama3Json,
            "Checking.<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}",
            Some("Checking."),
            &[("get_time", "{}")],
        );
    }

    #[test]
    fn llama_3_3_type_field_and_several_calls() {
        check(
            Llama3Json,
            "{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"type\": \"function\", \"name\": \"get_time\", \"parameters\": {\"timezone\": \"CET\"}}",
            None,
            &[
                ("get_weather", r#"{"city": "Paris"}"#),
                ("get_time", r#"{"timezone": "CET"}"#),
            ],
        );
    }

    #[test]
    fn arguments_key_and_leading_whitespace() {
        check(
            Llama3Json,
            "\n\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            None,
            &[("get_weather", r#"{"city": "Paris"}"#)],
        );
    }

    #[test]
    fn json_that_is_not_a_call_is_text() {
        for text in [
            "{\"name\": \"Ada\", \"age\": 36}",
            "{\"city\": \"Paris\"}",
            "The answer is {\"name\": \"get_weather\"}",
            "[1, 2, 3]",
        ] {
            check(Llama3Json, text, Some(text), &[]);
        }
    }
}
