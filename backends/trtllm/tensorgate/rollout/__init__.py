"""tensorgate as the rollout engine of an RL trainer: an async client for token-exact generation
and the rollout-control routes (weights, memory, pause/abort). See docs/rl.md.

    from tensorgate.rollout import RolloutClient, SamplingParams

    async with RolloutClient("http://127.0.0.1:3000", control_key="...") as client:
        groups = await client.generate([prompt_ids], SamplingParams(max_new_tokens=32), n=8)
        await client.update_weights_from_state_dict(model.state_dict(), weight_version="1")

Needs aiohttp (`pip install 'tensorgate[rollout]'`).
"""

from tensorgate.rollout.client import DEFAULT_BUCKET_BYTES, RolloutClient
from tensorgate.rollout.errors import (
    AbortedError,
    AuthenticationError,
    ConflictError,
    GenerationError,
    NotSupportedError,
    OverloadedError,
    PayloadTooLargeError,
    RolloutConnectionError,
    RolloutError,
    RouteNotFoundError,
    ServerError,
    SleepingError,
    UnavailableError,
    ValidationError,
)
from tensorgate.rollout.types import ControlResult, Sample, SamplingParams, UpdateResult

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "AbortedError",
    "AuthenticationError",
    "ConflictError",
    "ControlResult",
    "GenerationError",
    "NotSupportedError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RolloutClient",
    "RolloutConnectionError",
    "RolloutError",
    "RouteNotFoundError",
    "Sample",
    "SamplingParams",
    "ServerError",
    "SleepingError",
    "UnavailableError",
    "UpdateResult",
    "ValidationError",
]
