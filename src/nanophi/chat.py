"""`nanophi chat`: the terminal REPL (the chat template itself is rendered by nanophi.chat_template).

    nanophi chat smollm2-135m-instruct
    > What is a list comprehension?
    A list comprehension is ...
    > /reset        forget the conversation
    > /exit         quit (so does end of input, Ctrl-D)

Chat templates are Jinja2, rendered the way transformers renders them (sandboxed, trim_blocks, lstrip_blocks,
`raise_exception`, `bos_token`/`eos_token`). A model whose tokenizer has no template (nanophi's own char/BPE
models) chats by plain continuation: the conversation is one growing text the model continues.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from nanophi.chat_template import apply_chat_template, chat_template

COMMANDS_HELP = "/reset forgets the conversation, /exit quits"
# --- the REPL ------------------------------------------------------------------------------------------------
class ChatSession:
    """One conversation with a model: templated turns when the tokenizer has a chat template, else a growing
    transcript the model continues. Old turns are dropped when the prompt would not leave room to answer."""

    def __init__(self, engine: Any, system: str | None = None, max_new_tokens: int = 256,
                 sampling: dict[str, Any] | None = None) -> None:
        self.engine, self.system, self.max_new_tokens = engine, system, max_new_tokens
        self.sampling = sampling or {}
        self.templated = chat_template(engine.tokenizer) is not None
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript = ""

    def reply(self, user: str, on_text: Any = None) -> str:
        if not self.templated:
            self.transcript += user + "\n"
            self.transcript = self._fit_text(self.transcript)
            text = self.engine.generate([self.transcript], self.max_new_tokens, on_text=_row0(on_text),
                                        **self.sampling)[0]
            self.transcript += text + "\n"
            return text
        self.messages.append({"role": "user", "content": user})
        self._fit_messages()
        prompt = apply_chat_template(self.engine.tokenizer, self.messages, add_generation_prompt=True)
        text = self.engine.generate([prompt], self.max_new_tokens, on_text=_row0(on_text), **self.sampling)[0]
        self.messages.append({"role": "assistant", "content": text})
        return text

    def _room(self) -> int:
        return max(1, self.engine.block_size - min(self.max_new_tokens, self.engine.block_size // 2))

    def _fit_messages(self) -> None:
        tok = self.engine.tokenizer
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        while len(self.messages) - first > 1:
            prompt = apply_chat_template(tok, self.messages, add_generation_prompt=True)
            if len(tok.encode(prompt)) <= self._room():
                return
            del self.messages[first : first + 2]  # the oldest exchange (user + assistant)

    def _fit_text(self, text: str) -> str:
        tok = self.engine.tokenizer
        ids = tok.encode(text)
        return text if len(ids) <= self._room() else tok.decode(ids[-self._room():])


def _row0(on_text: Any) -> Any:
    return None if on_text is None else (lambda i, delta: on_text(delta))


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO, prompt: str = "> ") -> None:
    """Read a line, stream the reply, repeat; until /exit or end of input."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write(prompt)
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command = line.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            stdout.write("(conversation reset)\n")
            stdout.flush()
            continue
        if command.startswith("/") and " " not in command:
            stdout.write(f"(unknown command {command}; {COMMANDS_HELP})\n")
            stdout.flush()
            continue

        def on_text(delta: str) -> None:
            stdout.write(delta)
            stdout.flush()

        session.reply(line, on_text)
        stdout.write("\n")
        stdout.flush()


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--system", default=None, help="system prompt (models with a chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the context (Hugging Face's; 1.1-1.3 typical)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    from nanophi.generate import add_engine_arguments

    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nanophi.generate import check_sampling_args, engine_from_args

    check_sampling_args(args)
    engine = engine_from_args(args)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    repetition_penalty=args.repetition_penalty)
    session = ChatSession(engine, args.system, args.max_new_tokens, sampling)
    if sys.stdin.isatty():
        mode = "chat template" if session.templated else "plain continuation (no chat template)"
        print(f"nanophi chat: {args.model}, {mode}; {COMMANDS_HELP}", file=sys.stderr)
    repl(session, sys.stdin, sys.stdout)
    return 0
