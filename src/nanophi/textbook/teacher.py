"""The teacher: the model that writes (and judges) data. One interface, two real implementations.

    local    any model reference nanophi loads (`smollm2-135m-instruct` by default, a run directory, a GGUF or
             Hugging Face folder), run by nanophi's own batched `Engine`, prompts rendered with its chat template
    openai   any OpenAI-compatible endpoint: `openai:http://host:port/v1` with `--teacher-model NAME` (OpenAI,
             vLLM, Ollama, llama.cpp's server and `nanophi serve` all speak it); API key from $OPENAI_API_KEY

    teacher = make_teacher("openai:http://127.0.0.1:8000/v1", model="tiny")
    teacher.chat(["Write a haiku about lists."], max_tokens=64, temperature=0.7)
    teacher.usage   # requests, prompt/completion tokens, retries, seconds

`complete` continues raw text (the LLM judge's "Rating:" prompt); `chat` sends each prompt as one user message.
The remote client runs requests on a thread pool (the server batches them) and retries 429, 5xx, timeouts and
dropped connections with exponential backoff; a bad request, a wrong key or an unknown model fails at once,
and an endpoint that cannot be reached at all is a `UserError` on the first request rather than minutes of
retries.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from nanophi.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m-instruct"
SMOLLM2_LICENCE = "Apache-2.0 (teacher: SmolLM2-135M-Instruct)"
OPENAI_PREFIX = "openai:"
API_KEY_ENV = "OPENAI_API_KEY"
# Local servers (vLLM, Ollama, llama.cpp, nanophi serve) ignore the key, but the openai client insists on one.
PLACEHOLDER_KEY = "not-needed"
DEFAULT_CONCURRENCY = 8  # Jina's generator ran 40 parallel requests against OpenAI; a local server wants fewer
DEFAULT_BATCH = 8  # local engine rows per batch: a 135M model on 2 cores gains little beyond this
MAX_RETRIES = 6
BACKOFF_BASE_S = 0.5  # 0.5, 1, 2, 4, 8, 16 s: a rate limit window is usually a minute or less
BACKOFF_CAP_S = 30.0
REQUEST_TIMEOUT_S = 120.0
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
CHARS_PER_TOKEN = 4  # token estimate when an endpoint does not report usage
TOP_P = 0.95


STOP_TAIL_TOKENS = 8  # a stop string is looked for in the last this many tokens of a row
# One seed for a call (prompt i gets seed + i, as the engine seeds batch rows), or one seed per prompt (best-of-n
# gives each (prompt, sample) its own, so a sample does not depend on which other prompts share its call).
Seeds = int | Sequence[int] | None


def prompt_seeds(seed: Seeds, n: int) -> list[int | None]:
    """The seed of each of n prompts."""
    if seed is None or isinstance(seed, int):
        return [None if seed is None else seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to its first stop string, as an OpenAI-compatible server returns it."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


class Teacher(Protocol):
    """What the pipeline asks of a teacher. `name` goes into every record's provenance."""

    name: str

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None
                 ) -> list[str]: ...

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None
             ) -> list[str]: ...


@dataclass
class Usage:
    """Token accounting for one teacher, summed over its lifetime (thread-safe updates via `add`)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    estimated: bool = False  # some counts were estimated from characters (the endpoint did not report usage)
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt_tokens: int, completion_tokens: int, retries: int = 0, estimated: bool = False,
            seconds: float = 0.0) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.retries += retries
            self.estimated |= estimated
            self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        with self._lock:  # (not dataclasses.asdict: it would try to deep-copy the lock)
            d: dict[str, Any] = {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                                 "completion_tokens": self.completion_tokens, "retries": self.retries,
                                 "estimated": self.estimated, "seconds": round(self.seconds, 3)}
        d["completion_tokens_per_s"] = round(self.completion_tokens / self.seconds, 1) if self.seconds else None
        return d


# --------------------------------------------------------------------------------------------- local model

class LocalTeacher:
    """A model nanophi loads, generating through `nanophi.engine.Engine` in batches of `batch_size` rows.

    The model loads on first use, so a rerun whose work is already done never pays for it."""

    def __init__(self, ref: str = DEFAULT_TEACHER, device: str = "cpu", dtype: str = "float32",
                 quantize: str | None = None, batch_size: int = DEFAULT_BATCH,
                 system: str | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"teacher batch size must be >= 1, got {batch_size}")
        self.ref, self.device, self.dtype, self.quantize, self.batch_size = ref, device, dtype, quantize, batch_size
        self.system = system
        self.name = f"local:{ref}" + (f"+{quantize}" if quantize else "")
        # SmolLM2's weights are Apache-2.0; for other references the user knows the terms, nanophi does not.
        self.licence = SMOLLM2_LICENCE if ref == DEFAULT_TEACHER else None
        self.usage = Usage()
        self._engine: Any = None

    @classmethod
    def from_engine(cls, engine: Any, name: str = "in-memory", batch_size: int = DEFAULT_BATCH) -> "LocalTeacher":
        """A teacher over a model already in memory (a model being trained, a test's tiny model)."""
        teacher = cls(name, batch_size=batch_size)
        teacher._engine = engine
        return teacher

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from nanophi.device import pick_device
            from nanophi.engine import Engine, load_model_for_inference, parse_dtype

            t0 = time.perf_counter()
            device = pick_device(self.device)
            model, tokenizer = load_model_for_inference(self.ref, device)
            self._engine = Engine(model, tokenizer, device, parse_dtype(self.dtype), self.quantize)
            log.info("teacher: loaded %s in %.1f s", self.ref, time.perf_counter() - t0)
        return self._engine

    def render(self, prompt: str) -> str:
        """A user message as the model's chat template renders it (plain "user: ..." when it has none)."""
        from nanophi.chat_template import apply_chat_template

        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        return apply_chat_template(self.engine.tokenizer, messages + [{"role": "user", "content": prompt}],
                                   add_generation_prompt=True)

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None,
                 stop: Sequence[str] = ()) -> list[str]:
        return self._generate(list(prompts), max_tokens, temperature, seed, stop)

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None,
             stop: Sequence[str] = ()) -> list[str]:
        return self._generate([self.render(p) for p in prompts], max_tokens, temperature, seed, stop)

    def _generate(self, texts: list[str], max_tokens: int, temperature: float, seed: Seeds,
                  stop: Sequence[str] = ()) -> list[str]:
        from nanophi.sampling import Sampling

        engine = self.engine
        tok = engine.tokenizer
        seeds = prompt_seeds(seed, len(texts))
        stops = [s for s in stop if s]
        # A prompt longer than the context would leave no room to answer: keep its tail, like a chat session.
        room = max(1, engine.block_size - max_tokens)
        out: list[str] = []

        def should_stop(row: int, new_ids: list[int]) -> bool:
            # only the last few tokens can complete a stop string; decoding the whole row each step would cost
            tail = tok.decode(new_ids[-STOP_TAIL_TOKENS:])
            return any(s in tail for s in stops)

        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            ids = [tok.encode(t)[-room:] for t in batch]
            sampling = [Sampling(temperature, None, TOP_P if temperature else None, s)
                        for s in seeds[start:start + len(batch)]]
            t0 = time.perf_counter()
            new = engine.generate_ids(ids, max_tokens, sampling=sampling, stop_ids=engine.stop_ids(),
                                      should_stop=should_stop if stops else None)
            dt = time.perf_counter() - t0
            for row_ids, row_new in zip(ids, new):
                self.usage.add(len(row_ids), len(row_new), seconds=dt / len(batch))
            out.extend(_cut_at_stop(tok.decode(r), stops) for r in new)
        return out


# ------------------------------------------------------------------------------------ OpenAI-compatible API

class OpenAITeacher:
    """Any OpenAI-compatible endpoint through the official `openai` client, with our own retry loop.

    The client's built-in retries are turned off so that the policy (which errors, how long to wait, how many
    times) is explicit here, counted in `usage.retries`, and the same for every server."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 max_retries: int = MAX_RETRIES, timeout: float = REQUEST_TIMEOUT_S,
                 backoff_base: float = BACKOFF_BASE_S, system: str | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise UserError("an OpenAI-compatible teacher needs the openai package: pip install openai") from None
        if not model:
            raise UserError(f"teacher {OPENAI_PREFIX}{base_url} needs a model name: pass --teacher-model NAME")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise UserError("teacher concurrency must be >= 1, retries >= 0 and the timeout > 0")
        self.base_url, self.model, self.system = base_url.rstrip("/"), model, system
        self.concurrency, self.max_retries, self.backoff_base = concurrency, max_retries, backoff_base
        self.name = f"openai:{self.model}@{self.base_url}"
        self.usage = Usage()
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get(API_KEY_ENV)
                                     or PLACEHOLDER_KEY, max_retries=0, timeout=timeout)
        self._reached = threading.Event()  # set after the first answer: later connection errors are retried

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None,
                 stop: Sequence[str] = ()) -> list[str]:
        return self._map("completions", prompts, max_tokens, temperature, seed, stop)

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: Seeds = None,
             stop: Sequence[str] = ()) -> list[str]:
        return self._map("chat", prompts, max_tokens, temperature, seed, stop)

    def _map(self, kind: str, prompts: Sequence[str], max_tokens: int, temperature: float, seed: Seeds,
             stop: Sequence[str] = ()) -> list[str]:
        seeds = prompt_seeds(seed, len(prompts))
        stops = [s for s in stop if s]

        def one(i: int) -> str:
            return self._request(kind, prompts[i], max_tokens, temperature, seeds[i], stops)

        if not prompts:
            return []
        if not self._reached.is_set():  # fail fast (one clear error) before flooding a dead address
            first = [one(0)]
            rest = range(1, len(prompts))
        else:
            first, rest = [], range(len(prompts))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(rest)))) as pool:
            return first + list(pool.map(one, rest))  # map keeps the order and re-raises the first failure

    def _request(self, kind: str, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str] = ()) -> str:
        extra: dict[str, Any] = {"stop": list(stop)} if stop else {}  # servers cut before the stop string
        openai = self._openai
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            try:
                if kind == "chat":
                    messages = ([{"role": "system", "content": self.system}] if self.system else [])
                    resp = self._client.chat.completions.create(
                        model=self.model, messages=messages + [{"role": "user", "content": prompt}],
                        max_tokens=max_tokens, temperature=temperature, seed=seed, **extra)
                    text = resp.choices[0].message.content or ""
                else:
                    resp = self._client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=temperature, seed=seed, **extra)
                    text = resp.choices[0].text or ""
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS:
                    raise UserError(f"teacher {self.base_url} refused the request: HTTP {e.status_code} "
                                    f"{_short(e)}; check --teacher-model and ${API_KEY_ENV}") from None
                self._wait(attempt, f"HTTP {e.status_code}", e.response.headers.get("retry-after"))
            except openai.APITimeoutError:
                self._wait(attempt, "timeout", None)
            except openai.APIConnectionError as e:
                if not self._reached.is_set():
                    raise UserError(f"cannot reach the teacher endpoint {self.base_url} ({_short(e)}); is the "
                                    f"server running and the URL right (it usually ends in /v1)?") from None
                self._wait(attempt, "connection error", None)
            else:
                self._reached.set()
                usage = getattr(resp, "usage", None)
                estimated = usage is None
                pt = usage.prompt_tokens if usage else len(prompt) // CHARS_PER_TOKEN
                ct = usage.completion_tokens if usage else len(text) // CHARS_PER_TOKEN
                self.usage.add(pt, ct, retries=attempt, estimated=estimated, seconds=time.perf_counter() - t0)
                return text
        raise AssertionError("unreachable: _wait raises after the last attempt")

    def _wait(self, attempt: int, why: str, retry_after: str | None) -> None:
        if attempt >= self.max_retries:
            raise UserError(f"teacher {self.base_url} still failing after {self.max_retries} retries ({why}); "
                            f"try again later, or lower --teacher-concurrency")
        delay = min(BACKOFF_CAP_S, self.backoff_base * 2 ** attempt)
        if retry_after is not None:  # a server that says when to come back knows better than our schedule
            try:
                delay = min(BACKOFF_CAP_S, max(delay, float(retry_after)))
            except ValueError:
                pass
        delay *= 1 + 0.1 * random.random()  # jitter, so threads that failed together do not retry together
        log.warning("teacher: %s, retry %d/%d in %.1f s", why, attempt + 1, self.max_retries, delay)
        time.sleep(delay)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


# ------------------------------------------------------------------------------------------------ factory

def make_teacher(ref: str = DEFAULT_TEACHER, *, model: str | None = None, device: str = "cpu",
                 dtype: str = "float32", quantize: str | None = None, batch_size: int = DEFAULT_BATCH,
                 concurrency: int = DEFAULT_CONCURRENCY, max_retries: int = MAX_RETRIES,
                 timeout: float = REQUEST_TIMEOUT_S) -> LocalTeacher | OpenAITeacher:
    """`openai:URL` -> an `OpenAITeacher` for `model`; anything else -> a `LocalTeacher` on that reference."""
    if ref.startswith(OPENAI_PREFIX):
        url = ref[len(OPENAI_PREFIX):]
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--teacher {ref!r}: expected openai:http://host:port/v1")
        return OpenAITeacher(url, model or "", concurrency=concurrency, max_retries=max_retries, timeout=timeout)
    if model:
        raise UserError("--teacher-model names the model of an openai: endpoint; a local teacher is --teacher REF")
    return LocalTeacher(ref, device=device, dtype=dtype, quantize=quantize, batch_size=batch_size)


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help=f"local model reference (default {DEFAULT_TEACHER}) or openai:http://host:port/v1")
    parser.add_argument("--teacher-model", default=None, help="model name at an openai: endpoint")
    parser.add_argument("--teacher-device", default="cpu", help="local teacher: cpu, cuda or mps")
    parser.add_argument("--teacher-dtype", default="float32", help="local teacher: float32 or bfloat16")
    parser.add_argument("--teacher-quantize", choices=["int8", "int4"], default=None,
                        help="local teacher on a CPU: int8 (~2x faster batched decoding, ~8%% higher loss) or int4 "
                             "(4-bit weights: a Q4_1 GGUF's own codes, fp32's loss; fastest for one stream)")
    parser.add_argument("--teacher-batch", type=int, default=DEFAULT_BATCH, help="local teacher: rows per batch")
    parser.add_argument("--teacher-concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="openai: endpoint: requests in flight")
    parser.add_argument("--teacher-retries", type=int, default=MAX_RETRIES,
                        help="openai: endpoint: retries on 429/5xx/timeouts (exponential backoff)")


def teacher_from_args(args: argparse.Namespace) -> LocalTeacher | OpenAITeacher:
    return make_teacher(args.teacher, model=args.teacher_model, device=args.teacher_device, dtype=args.teacher_dtype,
                        quantize=args.teacher_quantize, batch_size=args.teacher_batch,
                        concurrency=args.teacher_concurrency, max_retries=args.teacher_retries)
