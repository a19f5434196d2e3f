"""Engine implementations; `load_engine` picks one by name without importing the others."""

from __future__ import annotations

from tensorgate.executor.control import WeightVersions
from tensorgate.executor.engine import Engine
from tensorgate.executor.settings import EngineConfig
from tensorgate.executor.versions import require_supported


def load_engine(config: EngineConfig) -> Engine:
    engine = _build(config)
    engine.versions = WeightVersions(config.settings.weight_version)
    return engine


def _build(config: EngineConfig) -> Engine:
    if config.engine == "synthetic":
        from tensorgate.executor.engines.synthetic import SyntheticEngine

        return SyntheticEngine.from_config(config)
    if config.engine == "transformers":
        # Before the import, which an unsupported transformers may already fail.
        require_supported("torch", "transformers")
        from tensorgate.executor.engines.transformers_engine import TransformersEngine

        return TransformersEngine.from_config(config)
    if config.engine == "trtllm":
        # Imports tensorrt_llm only when it starts: a missing TensorRT-LLM is an EngineError
        # that names the container image to use, not a traceback. An engine directory runs on
        # the executor API, a Hugging Face checkpoint on the LLM API (model_source decides).
        from tensorgate.launcher.model_source import TRTLLM_LLMAPI, trtllm_flavour

        if config.model_dir is not None and trtllm_flavour(config.model_dir) == TRTLLM_LLMAPI:
            from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine

            return TrtllmLlmApiEngine.from_config(config)
        from tensorgate.executor.engines.trtllm_engine import TrtllmEngine

        return TrtllmEngine.from_config(config)
    raise ValueError(f"unknown engine {config.engine!r}")
