"""Engine implementations; `load_engine` picks one by name without importing the others."""

from __future__ import annotations

import argparse

from tensorgate.executor.engine import Engine


def load_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "synthetic":
        from tensorgate.executor.engines.synthetic import SyntheticEngine

        return SyntheticEngine.from_args(args)
    if args.engine == "transformers":
        from tensorgate.executor.engines.transformers_engine import TransformersEngine

        return TransformersEngine.from_args(args)
    if args.engine == "trtllm":
        # Imports tensorrt_llm only when it starts: a missing TensorRT-LLM is an EngineError
        # that names the container image to use, not a traceback.
        from tensorgate.executor.engines.trtllm_engine import TrtllmEngine

        return TrtllmEngine.from_args(args)
    raise ValueError(f"unknown engine {args.engine!r}")
