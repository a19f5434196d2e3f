//! OpenAI's routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`. Requests are
//! mapped onto the generation parameters and validated by the same code as TGI's; anything
//! the engine cannot honour is refused with 422, never ignored.

pub mod chat;
pub mod choices;
pub mod completions;
pub mod logprobs;
pub mod mapping;
pub mod models;
pub mod schemas;
pub mod tools;
