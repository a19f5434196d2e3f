"""!!! TEST DOUBLE — NOT TensorRT-LLM !!! `tensorrt_llm.llmapi.llm_args.KvCacheConfig`: the
fields tensorgate sets (`free_gpu_memory_fraction`, `enable_block_reuse`,
`event_buffer_max_size` default 0: "If set to 0, the event buffer will not be used"). The real
one is a pydantic model that refuses unknown fields (StrictBaseModel, `extra = "forbid"`)."""

from __future__ import annotations


class KvCacheConfig:
    _FIELDS = (
        "enable_block_reuse",
        "free_gpu_memory_fraction",
        "event_buffer_max_size",
        "max_tokens",
    )

    def __init__(self, **kwargs: object) -> None:
        unknown = set(kwargs) - set(self._FIELDS)
        if unknown:
            raise ValueError(f"KvCacheConfig: extra fields not permitted: {sorted(unknown)}")
        self.enable_block_reuse = bool(kwargs.get("enable_block_reuse", True))
        self.free_gpu_memory_fraction = kwargs.get("free_gpu_memory_fraction")
        self.event_buffer_max_size = int(kwargs.get("event_buffer_max_size", 0))
        self.max_tokens = kwargs.get("max_tokens")
