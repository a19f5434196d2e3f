"""!!! TEST DOUBLE — NOT TensorRT-LLM !!! (see executor/result.py)."""
