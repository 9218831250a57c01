"""The batching worker: a queue of Jobs (one per choice) and one thread that runs them in Engine batches."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from nanophi.serve.errors import APIError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


@dataclass
class Job:
    """One choice of one request: a prompt to continue and where its text goes."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # nanophi.sampling.Sampling: this row's own temperature, top_k, top_p, seed, penalty
    stops: list[str]
    on_delta: Callable[[str], None] | None  # streaming: called from the worker thread
    on_done: Callable[[str, str, int, BaseException | None], None]  # text, finish_reason, tokens, error
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # score prompt + completion, with this many alternatives; None: do not score
    new_ids: list[int] = field(default_factory=list)  # set by the worker: the completion's tokens (its text's)
    scores: Any = None  # set by the worker when logprobs is asked: nanophi.scoring.TokenScores


class Batcher:
    """A queue of Jobs and one thread that runs them in Engine batches (rows with different sampling settings
    share a batch: the Engine samples each row with its own)."""

    def __init__(self, engine: Any, max_batch: int = 16, window_s: float = 0.01, max_queue: int = 512) -> None:
        self.engine, self.max_batch, self.window_s, self.max_queue = engine, max_batch, window_s, max_queue
        self.queue: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.accepting, self.stopped = True, False
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "queued": 0, "running": 0,
                      "completion_tokens": 0, "cancelled": 0, "refused_busy": 0}
        self.thread = threading.Thread(target=self._loop, name="nanophi-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's choices, or none (429 when the queue cannot take them all)."""
        with self.cond:
            if not self.accepting:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self.queue) + len(jobs) > self.max_queue:
                self.stats["refused_busy"] += 1
                raise APIError(429, f"the server is busy ({len(self.queue)} choices queued, at most "
                               f"{self.max_queue}); retry after {RETRY_AFTER_S} s", type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.queue.extend(jobs)
            self.stats["requests"] += 1
            self.stats["queued"] = len(self.queue)
            self.cond.notify()

    def stop_accepting(self) -> None:
        """Shutdown, first step: new requests get 503; what is queued still runs."""
        with self.cond:
            self.accepting = False

    def close(self, timeout_s: float = 10.0) -> None:
        """Shutdown, last step: cancel what is queued or running, then stop the thread (bounded: a running batch
        ends at its next token)."""
        with self.cond:
            self.accepting, self.stopped = False, True
            dropped = list(self.queue)
            self.queue.clear()
            for job in [*dropped, *self.running]:
                job.cancelled.set()
            self.cond.notify()
        gone = APIError(503, "the server shut down before this request ran", type="server_error",
                        code="shutting_down")
        for job in dropped:
            job.on_done("", "cancelled", 0, gone)
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return None
        time.sleep(self.window_s)  # let concurrent requests arrive and join this batch
        with self.cond:
            batch: list[Job] = []
            while self.queue and len(batch) < self.max_batch:
                job = self.queue.popleft()
                if job.cancelled.is_set():  # its client left while it waited: never compute it
                    self.stats["cancelled"] += 1
                    continue
                batch.append(job)
            self.running = batch
            self.stats["queued"], self.stats["running"] = len(self.queue), len(batch)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            try:
                self._run(batch)
            except BaseException as e:  # a bug or OOM: fail these requests, keep serving
                log.exception("generation failed")
                for job in batch:
                    job.on_done("", "error", 0, e)
            finally:
                with self.cond:
                    self.running = []
                    self.stats["running"] = 0

    def _run(self, batch: list[Job]) -> None:
        from nanophi.engine import TextStream

        streams = [TextStream(self.engine.tokenizer, j.stops, j.on_delta) for j in batch]

        def should_stop(i: int, ids: list[int]) -> bool:
            return streams[i].push(ids) or batch[i].cancelled.is_set()

        ids = self.engine.generate_ids([j.prompt_ids for j in batch], [j.max_tokens for j in batch],
                                       sampling=[j.sampling for j in batch], stop_ids=self.engine.stop_ids(),
                                       should_stop=should_stop)
        texts = [stream.finish(new) for stream, new in zip(streams, ids)]
        scored = [j for j in batch if j.logprobs is not None and not j.cancelled.is_set()]
        for job, new, text in zip(batch, ids, texts):
            job.new_ids = _tokens_of(self.engine.tokenizer, new, text)
        if scored:
            from nanophi.scoring import score_tokens

            rows = [j.prompt_ids + j.new_ids for j in scored]
            k = max(max(j.logprobs for j in scored), 1)  # the top 1 tells whether each token was the greedy one
            for job, scores in zip(scored, score_tokens(self.engine.prefill_model, rows, k, self.engine.dtype)):
                job.scores = scores
        for job, stream, new, text in zip(batch, streams, ids, texts):
            self.stats["completion_tokens"] += len(new)
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
            finish = "length" if len(new) >= job.max_tokens and not stream.stopped else "stop"
            job.on_done(text, finish, len(new), None)


def _tokens_of(tokenizer: Any, new: list[int], text: str) -> list[int]:
    """The fewest leading tokens of `new` whose text covers `text` (all of them unless a stop string cut it):
    the tokens a completion's logprobs report."""
    if len(tokenizer.decode(new)) <= len(text):
        return list(new)
    for k in range(len(new) + 1):
        if len(tokenizer.decode(new[:k])) >= len(text):
            return list(new[:k])
    return list(new)
