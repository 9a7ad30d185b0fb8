"""Prompts of an exact token count for a server, built from random words of the model's own tokenizer.

Seeded per cell, repeat and request (``request_seed``), so repeats never hit a prefix cache and a rerun
sends the same text; requests of a prefix group share their group's prefix token for token
(``workload_prompts``, rule in kvray/sim/reuse.py). Shared by the openai and ollama backends.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.resolve import is_bundled
from kvray.sim.reuse import has_shared_prefixes, salt_label, shared_token_ids
from kvray.spec import Cell, RequestSpec


class PromptBuilder:
    """Random-word prompts of an exact token count under a tokenizer (completion or chat form)."""

    def __init__(self, tokenizer: Any, chat: bool = False):
        self.tokenizer = tokenizer
        self.chat = chat
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.allowed = [i for i in range(len(tokenizer)) if i not in special and i not in added]
        if not self.allowed:
            raise KvrayInputError("the tokenizer has no ordinary tokens to build prompts from")

    def count(self, text: str) -> int:
        if self.chat:
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
            )
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            return len(ids)
        return len(self.tokenizer(text)["input_ids"])

    def count_text_tokens(self, text: str) -> int:
        """Tokens a streamed piece of text stands for (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def make(self, n_tokens: int, seed: int) -> str:
        """A prompt of ``n_tokens`` tokens; the closest reachable length if the tokenizer does not round-trip."""
        rng = random.Random(seed)
        return self.fit([rng.choice(self.allowed) for _ in range(max(n_tokens - self.count(""), 0))], n_tokens, rng)

    def draw(self, seed: int, n: int) -> list[int]:
        """``n`` ordinary token ids drawn from ``seed`` (the ids ``make`` starts from)."""
        rng = random.Random(seed)
        return [rng.choice(self.allowed) for _ in range(n)]

    def fit(self, ids: list[int], n_tokens: int, rng: random.Random) -> str:
        """The text of ``ids``, its tail trimmed or extended until it counts ``n_tokens`` tokens (a word-level
        tokenizer needs no change; a subword one may merge across a boundary, corrected at the tail only)."""
        text = ""
        for _ in range(12):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            diff = self.count(text) - n_tokens
            if diff == 0:
                break
            grow = [rng.choice(self.allowed) for _ in range(-diff)]  # empty when trimming
            ids = ids[: max(len(ids) - diff, 0)] if diff > 0 else ids + grow
        return text


def load_tokenizer(name: str) -> Any:
    """``AutoTokenizer`` for a local directory or hub id; failures become one clear input error. A geometry
    kvray bundles (``kvray/…``) is on no hub: its word-level tokenizer is built offline instead — the one a
    server kvray starts for it serves (kvray/servers/model_dirs.py)."""
    if name.startswith("kvray/"):  # kvray's own namespace: never looked up on the hub
        if not is_bundled(name):
            from kvray.model.resolve import bundled_models

            known = ", ".join(m for m in bundled_models() if m.startswith("kvray/"))
            raise KvrayInputError(f"{name!r} is not a model kvray bundles (kvray's own: {known})")
        from kvray.servers.model_dirs import bundled_word_tokenizer

        return bundled_word_tokenizer(name)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise KvrayInputError(
            f"cannot load a tokenizer for {name!r} ({first}); pass option tokenizer=DIR_OR_ID for exact prompt lengths"
        ) from None


def request_seed(cell: Cell, repeat: int, request_id: int | str) -> int:
    """The seed of a request's own tokens (``request_id``), or of any label under the cell and repeat (a shared
    prefix group's, a synthetic answer's: kvray/backends/prefixes.py)."""
    digest = hashlib.sha256(f"{cell.cell_id}:{repeat}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def workload_prompts(
    builder: PromptBuilder, cell: Cell, requests: Sequence[RequestSpec], repeat: int
) -> dict[int, str]:
    """Every request's prompt text: unique per request, or sharing its group's prefix token for token."""
    if not has_shared_prefixes(requests):
        return {r.id: builder.make(r.prompt_toks, request_seed(cell, repeat, r.id)) for r in requests}
    ids = shared_token_ids(requests, builder.draw, lambda label: request_seed(cell, repeat, label), builder.count(""))
    return {
        r.id: builder.fit(ids[r.id], r.prompt_toks, random.Random(request_seed(cell, repeat, f"fit{r.id}")))
        for r in requests
    }


def request_salt(cell: Cell, repeat: int, r: RequestSpec) -> str:
    """vLLM's ``cache_salt`` for a request: per request, or per prefix group (kvray/sim/reuse.py)."""
    return f"kvray-{request_seed(cell, repeat, salt_label(r)):x}"


class TokenCounter:
    """Counts streamed text's tokens with a fast tokenizer's core (the ``tokenizers`` library) — all a client actor
    needs once the caller has built the prompts, and it spares the actor importing transformers (~10 s on 2 cores)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0


def counter_json(builder: PromptBuilder, seed: int = 0) -> str | None:
    """``builder``'s tokenizer core, serialised for a ``TokenCounter``, when that counts text exactly as the tokenizer
    does (checked on a prompt of its own and pieces of it); None for a tokenizer without a fast core or one that adds
    rules of its own — a client actor then loads the tokenizer itself."""
    core = getattr(builder.tokenizer, "backend_tokenizer", None)
    if core is None:
        return None
    try:
        text = builder.make(48, seed)
        samples = [text, text[: len(text) // 2], " " + text[len(text) // 3 :], "Hello, world! 12 tokens", " a"]
        counter = TokenCounter(core.to_str())
        if all(counter.count_text_tokens(s) == builder.count_text_tokens(s) for s in samples):
            return str(core.to_str())
    except Exception:  # any surprise: the actor loads the tokenizer the usual way
        return None
    return None
