"""Engine implementations; `load_engine` picks one by name without importing the others."""

from __future__ import annotations

import argparse

from tensorgate.executor.engine import Engine, EngineError


def load_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "synthetic":
        from tensorgate.executor.engines.synthetic import SyntheticEngine

        return SyntheticEngine.from_args(args)
    if args.engine == "transformers":
        from tensorgate.executor.engines.transformers_engine import TransformersEngine

        return TransformersEngine.from_args(args)
    if args.engine == "trtllm":
        raise EngineError(
            "the trtllm engine is not part of this build yet; serve a Hugging Face checkpoint "
            "with --engine transformers"
        )
    raise ValueError(f"unknown engine {args.engine!r}")
