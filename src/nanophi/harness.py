"""lm-evaluation-harness on nanophi's own model: `nanophi eval RUN --tasks T1,T2 [--limit N] [--include-path DIR]`.

`NanophiLM` is an `lm_eval.api.model.LM` (through lm-eval's `TemplateLM`, which splits context from
continuation the way its `hf` model does): loglikelihood and loglikelihood_rolling score token batches with one
forward pass each (`nanophi.scoring.score_tokens`), generate_until runs batches through the Engine's KV cache.
Inputs are truncated exactly as lm-eval's `hf` model truncates them (the last block_size + 1 tokens; a prompt to
continue keeps its last block_size - max_gen_toks), so a nanophi run and its `nanophi export --format hf` get the
same scores from lm-eval.

Offline, a task's data must be on disk: lm-eval's standard tasks read Hugging Face datasets from the local cache
(`HF_DATASETS_CACHE`), and any task can be defined locally as a YAML file over JSON data (`--include-path DIR`;
see tests/test_harness.py). This module needs the `eval` extra (`pip install 'nanophi[eval]'`): importing it
without lm-eval raises ModuleNotFoundError, which `nanophi eval` turns into one line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM

from nanophi.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that do not say


class NanophiLM(TemplateLM):
    """nanophi's GPT and tokenizer as an lm-eval model."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, dtype: Any = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        import torch

        from nanophi.engine import Engine

        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.dtype = dtype or torch.float32
        self.engine = Engine(model, tokenizer, dtype=self.dtype)
        self._batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = model.config.block_size

    # --- tokens ---------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int | None:
        tok = self.tokenizer
        eos = getattr(tok, "eos_id", None)
        return eos if eos is not None else getattr(tok, "eot_id", None)

    @property
    def prefix_token_id(self) -> int | None:
        """What an empty context is conditioned on: BOS, else EOS (as lm-eval's hf model picks)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # nanophi's tokenizers never add a start token (nor does the HF export)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- scoring --------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        from nanophi.scoring import score_tokens

        if self.prefix_token_id is None and any(not ctx for _, ctx, _ in requests):
            raise UserError("this task scores text without a context, which needs a tokenizer with a start or end "
                            "token; a char tokenizer has none (train with --tokenizer bpe)")
        # hf's rule: the last max_length + 1 tokens, the first of them only as context
        rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for b in range(0, len(order), self._batch_size):
            chunk = order[b:b + self._batch_size]
            for i, scores in zip(chunk, score_tokens(self.model, [rows[i] for i in chunk], dtype=self.dtype)):
                n = len(requests[i][2])
                out[i] = (sum(scores.logprobs[-n:]), all(scores.greedy[-n:]))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in lm-eval's disjoint windows of the context."""
        from lm_eval import utils

        if self.prefix_token_id is None:
            raise UserError("perplexity tasks need a tokenizer with a start or end token; a char tokenizer has none")
        windows, owners = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations through the Engine's batched KV cache, cut
        before the first stop string."""
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

        from nanophi.engine import TextStream
        from nanophi.sampling import Sampling

        eos = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
        collator = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        out = []
        for chunk in collator.get_batched(n=self._batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise UserError(f"the task asks for {max_gen} new tokens; this model's context holds "
                                f"{self.max_length}, so at most {self.max_length - 1}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sampling = Sampling(temperature, kwargs.get("top_k"), kwargs.get("top_p"), kwargs.get("seed"))
            prompts = [self.engine.encode_prompts([c])[0][-(self.max_length - max_gen):] for c in contexts]
            streams = [TextStream(self.tokenizer, until) for _ in prompts]
            ids = self.engine.generate_ids(prompts, max_gen, sampling=[sampling] * len(prompts),
                                           stop_ids=self.engine.stop_ids(),
                                           should_stop=lambda i, new: streams[i].push(new))
            for context, stream, new in zip(contexts, streams, ids):
                text = stream.finish(new)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return collator.get_original(out)


def evaluate_tasks(model_ref: str, tasks: list[str], limit: float | None = None, include_path: str | None = None,
                   device: str = "cpu", batch_size: int = 16, num_fewshot: int | None = None) -> dict[str, Any]:
    """Run lm-eval's `tasks` on the model behind `model_ref`; lm-eval's results dict."""
    # Never reach for the Hugging Face hub: a dataset is on disk or the task cannot run (setdefault: a user who
    # has a mirror can still say otherwise). Set before lm-eval first imports `datasets`.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nanophi.device import pick_device
    from nanophi.refs import load_model

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a directory of task YAML files")
    # indexing lm-eval's own ~10k task files takes ~16 s on 2 cores: skip it when --include-path has every task
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists them, and "
                        "--include-path DIR adds your own YAML tasks")
    model, tokenizer = load_model(model_ref, pick_device(device))
    lm = NanophiLM(model, tokenizer, batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                          num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0)
    except Exception as e:  # noqa: BLE001 - only the missing-data case becomes a UserError; the rest re-raises
        if _is_missing_data(e):
            raise UserError(f"a task's dataset is not on disk and nanophi evaluates offline ({_first_line(e)}); "
                            "put the Hugging Face dataset in the cache (HF_DATASETS_CACHE), or define the task over "
                            "local JSON files with --include-path DIR") from None
        raise
    return results


def _is_missing_data(e: BaseException) -> bool:
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    text = str(e).lower()
    return bool(names & {"DatasetNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "FileNotFoundError",
                         "LocalEntryNotFoundError", "EmptyDatasetError", "DataFilesNotFoundError"}) or \
        "offline" in text or "couldn't reach" in text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """lm-eval's results as JSON (its own encoder for numpy values and the like), samples included."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose a writable --output") from None
    return path


def table(results: dict[str, Any]) -> str:
    """lm-eval's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
