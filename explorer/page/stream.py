"""Streaming a run: the answer's text as it is generated, then the finished `RunResult`. No gradio here.

Usage::

    for step in stream_run(session, RawRequest("Reverse the word: apple", library="lib")):
        if isinstance(step, str):
            print("so far:", step)         # the whole answer so far (not a delta), once per new token
        else:
            result = step                  # a RunResult: the trace, notices, or the error

The model runs on the registry's model thread, holding `registry.lock` for the whole run (one run at a time on the
shared model, see `explorer.page.session`); this generator only reads the run's queue, so a visitor waiting for
the model sees nothing until it is their turn, and two streams never share a queue.
"""
from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import replace

from explorer.page.request import RawRequest
from explorer.page.session import RunResult, Session

log = logging.getLogger(__name__)
_END = object()


class TextQueue:
    """A `generate(streamer=...)` streamer: the first `put` is the prompt (skipped), each later one a new token;
    every new token puts the decoded answer so far on the queue. Iterating stops at `end()`."""

    def __init__(self, tokenizer, timeout: float = 600.0):
        self.tokenizer, self.timeout = tokenizer, timeout
        self.ids: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        ids = [int(i) for i in value.reshape(-1).tolist()]
        if not self._prompt_seen:  # generate hands the prompt over first
            self._prompt_seen = True
            return
        self.ids.extend(ids)
        self._queue.put(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        self._queue.put(_END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is _END:
                return
            yield item


def stream_run(session: Session, raw: RawRequest) -> Iterator[str | RunResult]:
    """The answer so far after each generated token (str), then the RunResult (see module docstring)."""
    result = session.check(raw)
    if result.error:
        yield result
        return
    req = result.request
    stream = TextQueue(session.registry.base.tokenizer)
    box: dict = {}

    def work():
        try:
            box["result"] = session.route(result, streamer=stream)
        except Exception as exc:  # the generator reports it; the worker must always end the stream
            log.exception("streamed run failed")
            box["result"] = replace(result, error=f"This run failed: {type(exc).__name__}: {exc}")
        finally:
            stream.end()

    worker = session.registry.model_thread.submit(work)  # not a thread of its own: explorer/page/model_thread.py
    last = ""
    for text in stream:
        if text != last:  # a special token decodes to nothing new: no empty update
            last = text
            yield text
    worker.result()
    done = box["result"]
    if done.trace is not None and req.max_new_tokens and done.trace.text != last:
        yield done.trace.text  # the trace's own decoding has the last word
    yield done
