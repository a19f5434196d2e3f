"""tensorgate: LLM inference server (Rust router, gRPC, Python executor)."""

__version__ = "0.1.0"
