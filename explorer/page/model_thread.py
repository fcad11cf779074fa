"""The page's one model thread: every model call of the page (load, runs, comparisons, counterfactuals, library
edits) runs on the same long-lived thread. No gradio here.

Usage::

    worker = ModelThread()
    future = worker.submit(session.route, checked)   # a concurrent.futures.Future
    trace = worker.call(routed.trace, "hello")       # the result here (its exception raised here); inline when
                                                     # already on the model thread

Why: torch's CPU ops run on OpenMP (libgomp), and every thread that starts a parallel region keeps its own pool of
worker threads for as long as it lives. Once two such pools exist on a 2-core machine, libgomp counts more threads
than CPUs and stops spinning between parallel regions, so each small op waits for a sleeping worker to wake. A
decoding step is hundreds of small ops: a SmolLM2 mat-vec (1536 x 576) took 36 µs on the main thread and 140-160 µs
on a second thread, and a routed 32-token answer on demo-mbc 1.64 s on one persistent thread against 2.61 s on a
fresh thread per run while another thread's pool was alive. The page's streaming used to start a thread per run,
and gradio calls back on threads of its own pool (docs/engine.md, "One model thread for the page").
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

NAME = "explorer-model"


class ModelThread:
    """One persistent daemon thread (the page's Ctrl-C does not wait for a generation), jobs run one at a time in
    the order submitted."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=NAME, daemon=True)
        self._thread.start()

    def __del__(self):  # the thread holds the queue, not this object: it ends when its owner is gone
        self._jobs.put(None)

    @property
    def here(self) -> bool:
        """True when called on the model thread itself."""
        return threading.current_thread() is self._thread

    def submit(self, fn, *args, **kwargs) -> Future:
        """Queue fn(*args, **kwargs) on the model thread."""
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread, waited for (inline when already there, so jobs may nest)."""
        if self.here:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()


def _serve(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        future, fn, args, kwargs = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
        del future, fn, args, kwargs, job  # nothing of a finished job stays alive while waiting for the next


def in_passing(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread of its own that ends with it; its result returned (its exception raised) here.
    For torch, numba or BLAS work the page does beside the model (a library's maps, an upload's checks) from
    gradio's long-lived callback threads: the OpenMP pool such work starts then ends with the thread, where on a
    callback thread it would stay and slow the model thread from then on (a cold ΔW map of demo-mbc did: the model
    thread's mat-vec 37 -> 140 µs)."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # raised again in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="explorer-passing", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
