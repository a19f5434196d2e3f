//! TGI's routes: `/generate`, `/generate_stream`, `/`, `/tokenize`, `/chat_tokenize`,
//! `/info`, `/health`, `/health_generate`, `/metrics`.

pub mod handlers;
pub mod schemas;
pub mod sse;
