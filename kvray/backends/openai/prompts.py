"""Prompts of an exact token count for a server, built from random words of the model's own tokenizer.

Seeded per cell, repeat and request (``request_seed``), so repeats never hit a prefix cache and a rerun
sends the same text. Shared by the openai and ollama backends.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from kvray.errors import KvrayInputError
from kvray.spec import Cell


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
        overhead = self.count("")
        ids = [rng.choice(self.allowed) for _ in range(max(n_tokens - overhead, 0))]
        text = ""
        for _ in range(12):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            diff = self.count(text) - n_tokens
            if diff == 0:
                break
            if diff > 0:
                ids = ids[: max(len(ids) - diff, 0)]
            else:
                ids += [rng.choice(self.allowed) for _ in range(-diff)]
        return text


def load_tokenizer(name: str) -> Any:
    """``AutoTokenizer`` for a local directory or hub id; failures become one clear input error."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise KvrayInputError(
            f"cannot load a tokenizer for {name!r} ({first}); pass option tokenizer=DIR_OR_ID for exact prompt lengths"
        ) from None


def request_seed(cell: Cell, repeat: int, request_id: int) -> int:
    digest = hashlib.sha256(f"{cell.cell_id}:{repeat}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
