"""TEST DOUBLE of the `tensorrt_llm` package: NOT TensorRT-LLM, no GPU code.

Only `tensorrt_llm.bindings.executor` is reproduced (see that module's docstring). The tests
install this package into `sys.modules`; production code never imports it.
"""

__version__ = "1.0.0+tensorgate.test-double"
IS_TEST_DOUBLE = True
