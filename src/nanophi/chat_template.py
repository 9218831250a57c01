"""A model's chat template, rendered the way transformers renders it (sandboxed Jinja2, trim_blocks,
lstrip_blocks, `raise_exception`, `bos_token`/`eos_token`). A tokenizer without a template gets PLAIN_TEMPLATE, a
"role: content" transcript. Used by the engine, the server, the chat REPL and the textbook teacher; imports no
command module.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from nanophi.errors import UserError

# Used where a template is needed (the server's chat endpoint) and the tokenizer has none.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def chat_template(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        template: str | None = None) -> str:
    """The prompt text for `messages` under the tokenizer's chat template (or `template`, or PLAIN_TEMPLATE)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    special = {}
    for name in ("bos", "eos"):
        tid = getattr(tokenizer, f"{name}_id", None)
        special[f"{name}_token"] = tokenizer.decode([tid]) if tid is not None else ""
    source = template or chat_template(tokenizer) or PLAIN_TEMPLATE
    try:
        return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **special)
    except TemplateError as e:
        raise UserError(f"the model's chat template failed to render ({e})") from None
