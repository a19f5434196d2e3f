"""TEST DOUBLE of `tensorrt_llm.bindings`: only the `executor` submodule exists here."""
