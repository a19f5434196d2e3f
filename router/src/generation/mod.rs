//! From a request's text to its generation: parameters and their validation, tokenization,
//! chat templates, the admitted generation's stream (detokenization, stop sequences), and
//! rollout control ordered against it (`control`, `requests`).

pub mod byte_level;
pub mod chat_template;
pub mod control;
pub mod detokenizer;
pub mod guided;
pub mod infer;
pub mod parameters;
pub mod requests;
pub mod stop;
pub mod stream;
pub mod tokenizer;
pub mod tool_parsers;
pub mod validation;
