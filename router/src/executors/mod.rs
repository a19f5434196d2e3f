//! The executor side: the gRPC client of one executor and the admission scheduler that
//! decides what enters it.

pub mod client;
pub mod scheduler;
