"""TEST DOUBLE of the `tensorrt_llm` package: NOT TensorRT-LLM, no GPU code.

Reproduced: `tensorrt_llm.bindings.executor` (the executor API, see that module's docstring) and
the LLM API's `tensorrt_llm.LLM` / `SamplingParams` (`tensorrt_llm/llmapi/llm.py` here, see its
docstring). The tests install this package into `sys.modules`; production code never imports it.
"""

__version__ = "1.2.1+tensorgate.test-double"
IS_TEST_DOUBLE = True


def __getattr__(name: str):
    # The real package exports these at the top (`from tensorrt_llm import LLM, SamplingParams`,
    # tensorrt_llm/__init__.py); imported lazily here so that the bindings double alone stays
    # light.
    if name == "LLM":
        from tensorrt_llm.llmapi.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tensorrt_llm.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
