"""An OpenAI-compatible HTTP server: `nanophi serve MODEL --port 8000`.

    GET  /v1/models             the one model served (its name: --model-name, default the reference's name)
    POST /v1/completions        prompt (string, token ids, or a list of either) -> continuation
    POST /v1/chat/completions   messages -> reply, through the tokenizer's chat template
    POST /tokenize              {"prompt": text} -> {"tokens": ids}        (vLLM's; lm-eval's remote tokenizer)
    POST /detokenize            {"tokens": ids} -> {"prompt": text}
    GET  /tokenizer_info        eos/bos tokens, chat template, context length
    GET  /health                liveness, and the batcher's counters (never needs the API key)

Completions take OpenAI's legacy `logprobs: K` (the K most likely tokens at each position, and always the chosen
one) and `echo: true` (the prompt's tokens come back first, scored, the first one `null`), with `max_tokens: 0`
to score a prompt without generating: what lm-evaluation-harness's `local-completions` sends for loglikelihood
tasks. Chat completions take `logprobs: true` and `top_logprobs: K` in the chat shape. Log-probabilities are the
model's own (before temperature or top-p), from one forward pass over prompt and completion
(`nanophi.scoring.score_tokens`); a prompt scored with `max_tokens: 0` may be longer than the context.

`"stream": true` answers with server-sent events (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`). Errors are 4xx/5xx
with OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Requests are queued; one worker thread takes up to --max-batch waiting choices (after waiting --batch-window-ms
for company) and runs them as one Engine batch: each row keeps its own temperature, top_p, top_k and seed, so
concurrent clients share each forward pass whatever they ask for. A choice whose client has gone (streaming or
not) is cancelled at its next token.

No request can ask for unbounded work: prompts per request, prompt tokens per request, completions (n x prompts)
per request, max_tokens and the body size are capped (`Limits`, one flag each), and a full queue answers 429 with
Retry-After. With --api-key (or $NANOPHI_API_KEY) every endpoint but /health needs `Authorization: Bearer KEY`.
SIGINT/SIGTERM stop accepting, give requests in flight --shutdown-grace seconds to finish, cancel the rest and
exit 0; a second signal exits at once. FastAPI and uvicorn are imported only when the server starts.

The package, one job per module: `request` (parsing and validating a body against the `Limits`), `batcher` (the
queue and the worker thread), `logprobs` (OpenAI's two logprobs shapes), `app` (the FastAPI endpoints, the API-key
middleware, streaming), `errors` (`APIError`), `cli` (`nanophi serve`: flags, checks, uvicorn and the shutdown).
"""

from nanophi.serve.app import create_app
from nanophi.serve.errors import APIError
from nanophi.serve.request import Limits, parse_request

__all__ = ["APIError", "Limits", "create_app", "parse_request"]
