"""!!! TEST DOUBLE — NOT TensorRT-LLM !!! `tensorrt_llm.llmapi`'s exports that tensorgate uses."""

from tensorrt_llm.llmapi.llm import LLM
from tensorrt_llm.llmapi.llm_args import KvCacheConfig
from tensorrt_llm.sampling_params import GuidedDecodingParams, SamplingParams

__all__ = ["LLM", "GuidedDecodingParams", "KvCacheConfig", "SamplingParams"]
