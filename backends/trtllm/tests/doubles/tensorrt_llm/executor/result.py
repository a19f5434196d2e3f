"""!!! TEST DOUBLE — NOT TensorRT-LLM !!! `tensorrt_llm.executor.result`: what a request's
result looks like to the caller (`tensorrt_llm/executor/result.py`, commit 005bc848893f):

- `CompletionOutput.token_ids` holds every generated token so far and `logprobs` one entry per
  token so far, a `{token_id: Logprob}` dict (`LogprobResults`); both grow as steps arrive
  (`_handle_sequence` extends token_ids and assigns the whole logprobs list);
- `finish_reason` is None until the end, then 'stop' (END_ID or STOP_WORDS, `stop_reason` the
  stop token id for the latter), 'length', 'timeout' or 'cancelled';
- with STOP_WORDS the stop tokens are cut from `token_ids` unless `include_stop_str_in_output`;
- `GenerationResult` is iterated with `async for` (`__anext__` awaits one step) or waited on
  with `result()`; `finished` says whether the last step came; `abort()` asks the executor to
  cancel it (`abort_request`), after which it ends 'cancelled';
- an error from the executor reaches whoever awaits the result as an exception (the
  background error handler `_handle_response` calls);
- `context_logits` is None until a response carries them, then kept (`_handle_response`: `if
  response_result.context_logits is not None: self._context_logits = ...`);
- `CompletionOutput.request_perf_metrics` is the executor's `RequestPerfMetrics` of the request
  when `SamplingParams(return_perf_metrics=True)` (`_handle_sequence`: `if
  response_tensors.request_perf_metrics is not None: output.request_perf_metrics = ...`; the
  file at a later commit than the one above).
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    request_perf_metrics: object | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class Step:
    """One executor response for a request, as the double's simulation hands it over."""

    tokens: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    error: str | None = None
    context_logits: object | None = None
    request_perf_metrics: object | None = None


class GenerationResult:
    def __init__(self, request_id: int, prompt_token_ids: list[int], sampling_params, abort):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self._abort = abort
        self._aborted = False
        self._done = False
        self._outputs = [CompletionOutput(0)]
        self._context_logits = None
        # has_event_loop(): an asyncio queue when created inside a running loop, else a plain one.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aqueue: asyncio.Queue | None = asyncio.Queue()
            self._queue: queue.Queue | None = None
        except RuntimeError:
            self._loop = None
            self._aqueue = None
            self._queue = queue.Queue()

    # -- fed by the simulation's thread ---------------------------------------------------------

    def _put(self, step: Step) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, step)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
        else:
            self._queue.put(step)

    # -- the real API ---------------------------------------------------------------------------

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs[:1]

    @property
    def context_logits(self):
        return self._context_logits

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self._abort(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def _handle(self, step: Step) -> None:
        if step.error is not None:
            self._done = True
            raise RuntimeError(step.error)
        if step.context_logits is not None:
            self._context_logits = step.context_logits
        out = self._outputs[0]
        out.token_ids.extend(step.tokens)
        if step.request_perf_metrics is not None:
            out.request_perf_metrics = step.request_perf_metrics
        if step.logprobs is not None:
            out.logprobs = out.logprobs + [
                {t: Logprob(lp, 1)} for t, lp in zip(step.tokens, step.logprobs, strict=True)
            ]
        if step.finish_reason is not None:
            self._done = True
            out.finish_reason = step.finish_reason
            out.stop_reason = step.stop_reason
            sp = self.sampling_params
            if step.stop_reason is not None and not sp.include_stop_str_in_output:
                out.token_ids = out.token_ids[:-1]  # one-token stop words
                out.logprobs = out.logprobs[: len(out.token_ids)]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        self._handle(await self._aqueue.get())
        return self

    def result(self, timeout: float | None = None):
        while not self._done:
            self._handle(self._queue.get(timeout=timeout))
        return self
