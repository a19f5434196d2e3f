//! From a request's text to its generation: parameters and their validation, tokenization,
//! chat templates, the admitted generation's stream (detokenization, stop sequences).

pub mod chat_template;
pub mod detokenizer;
pub mod guided;
pub mod infer;
pub mod parameters;
pub mod stop;
pub mod stream;
pub mod tokenizer;
pub mod tool_parsers;
pub mod validation;
