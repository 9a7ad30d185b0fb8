"""Hugging Face transformers, in-process: static batches through ``model.generate``.

Requests are served by a real queue with static batching: whenever the engine is free, every request
that has arrived forms the next batch, left-padded to its longest prompt and generating the longest
``gen_toks`` of its members; a request arriving meanwhile waits for the next batch. Each request's trace
keeps its own ``gen_toks`` tokens (its end is its last token), and its start is its batch's start.

Prompts are exactly ``prompt_toks`` random ids (no special tokens, seeded per cell and repeat, so nothing is
reused between repeats); generation is exactly ``gen_toks`` (``min_new_tokens = max_new_tokens``, so EOS
cannot stop it). Token timestamps come from a streamer: ``generate`` hands it each step's tokens with
``tokens.cpu()``, a device→host copy that waits for the step to finish, so on CUDA a timestamp means
"token ready on the host" at the cost of one tiny copy per step (``generate`` already synchronises every
step for its stop check).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from kvray.backends.arrivals import ArrivalSchedule
from kvray.backends.base import BackendBase, BackendRun
from kvray.errors import KvrayInputError
from kvray.hardware.devices import resolve_device
from kvray.measure.memory import free_memory
from kvray.measure.trace import RunTrace
from kvray.model.geometry import geometry_from_config
from kvray.model.kvmath import cached_positions, kv_bytes_batch, normalize_dtype
from kvray.model.resolve import load_config
from kvray.sim.reuse import has_shared_prefixes, shared_token_ids
from kvray.spec import Cell, RequestSpec

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_CONFIG_KEYS_NOT_KWARGS = ("model_type", "_name_or_path", "transformers_version")


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key/value tensors (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def generated_cache(out: Any) -> Any:
    """The KV cache a ``generate(..., return_dict_in_generate=True)`` output holds, under either of its names.

    transformers 5.0–5.2x name the field ``past_key_values``; later releases renamed it ``cache`` (the old name
    is gone from the output class, not aliased). Read whichever the installed release has, by attribute, so no
    version number is compared.
    """
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


@lru_cache(maxsize=1)
def _streamer_class() -> type:
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Timestamps each decoding step; generate's first ``put`` is the prompt and is skipped."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            else:
                self._prompt_seen = True

        def end(self) -> None:
            pass

    return TokenClock


def _seed(cell: Cell, repeat: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{cell.cell_id}:{repeat}".encode()).digest()[:8], "little") >> 1


class HFBackend(BackendBase):
    """One model in memory at a time; ``load`` reuses it for every cell with the same (model, dtype, weights, device)."""

    name = "hf"

    def __init__(self) -> None:
        self.model: Any = None
        self.geometry: Any = None
        self.device = "cpu"
        self.dtype = "fp32"
        self.weights_bytes: int | None = None
        self._key: tuple[str, str, str, str, int] | None = None
        self._allowed_ids: Any = None  # token ids a prompt may use
        self._pad_id = 0

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """The cell with its device pinned ("auto" → "cpu" | "cuda:0"), so the row says where it ran."""
        cell = super().check_cell(cell)
        return dataclasses.replace(cell, device=resolve_device(cell.device))

    # --- loading ------------------------------------------------------------------------------------

    def load(self, cell: Cell) -> None:
        device = resolve_device(cell.device)
        dtype = normalize_dtype(cell.dtype, allow_fp8=False)
        key = (cell.model, dtype, cell.weights, device, cell.tensor_parallel)
        if key == self._key:
            return
        spread = cell.tensor_parallel > 1 and device.startswith("cuda")  # layer-wise over the worker's GPUs
        self.close()
        import torch
        import transformers

        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        model: Any
        if cell.weights == "random":
            cfg = dict(load_config(cell.model))
            kwargs = {k: v for k, v in cfg.items() if k not in _CONFIG_KEYS_NOT_KWARGS}
            config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
            with torch.device("cpu" if spread else device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            geometry_cfg = cfg
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(cell.model, dtype=torch_dtype)
            model = model if spread else model.to(device)
            geometry_cfg = model.config.to_dict()
        if spread:
            device = spread_layers(model, cell.tensor_parallel)
        model.eval()
        config = model.config
        self._pad_id = _first_id(config.pad_token_id, config.eos_token_id, 0)
        # A clean generation config: pretrained checkpoints ship sampling defaults we must not inherit.
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=self._pad_id
        )
        special = {
            i
            for i in (config.bos_token_id, config.eos_token_id, config.pad_token_id, self._pad_id)
            for i in (i if isinstance(i, list) else [i])
            if i is not None
        }
        vocab = int(config.vocab_size)
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[i for i in special if 0 <= i < vocab]] = False
        self._allowed_ids = torch.nonzero(allowed).flatten()
        try:
            self.geometry = geometry_from_config(geometry_cfg, name=cell.model)
        except KvrayInputError:
            self.geometry = None  # an architecture kvmath does not know: no KV prediction
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.model, self.device, self.dtype, self._key = model, device, dtype, key

    def memory_available_bytes(self, cell: Cell) -> int:
        """What the OOM pre-check may plan with: the GPU's capacity, or free RAM plus our own loaded weights."""
        device = resolve_device(cell.device)
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory)
        import psutil

        same_model = self._key is not None and self._key[0] == cell.model and self._key[3] == device
        return int(psutil.virtual_memory().available) + (self.weights_bytes or 0 if same_model else 0)

    def close(self) -> None:
        if self.model is None:
            return
        device = self.device
        self.model = None
        self._key = None
        free_memory(device)

    def free_memory(self) -> None:
        """After an OOM: drop what the failed run left and keep the model for the next cell."""
        free_memory(self.device)

    # --- serving -------------------------------------------------------------------------------------

    def _prompts(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> dict[int, Any]:
        import torch

        n = len(self._allowed_ids)
        if has_shared_prefixes(requests):  # a prefix group's requests share its first tokens, id for id

            def draw(seed: int, k: int) -> list[int]:
                g = torch.Generator().manual_seed(seed)
                return self._allowed_ids[torch.randint(0, n, (k,), generator=g)].tolist()

            def label_seed(label: str) -> int:
                return (
                    int.from_bytes(hashlib.sha256(f"{cell.cell_id}:{repeat}:{label}".encode()).digest()[:8], "little")
                    >> 1
                )

            ids = shared_token_ids(requests, draw, label_seed)
            return {r.id: torch.tensor(ids[r.id], dtype=self._allowed_ids.dtype) for r in requests}
        gen = torch.Generator().manual_seed(_seed(cell, repeat))
        return {r.id: self._allowed_ids[torch.randint(0, n, (r.prompt_toks,), generator=gen)] for r in requests}

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.model is None:
            self.load(cell)
        if cell.kv_dtype and normalize_dtype(cell.kv_dtype) != self.dtype:
            raise KvrayInputError(f"the hf backend caches KV in the model dtype ({self.dtype}), not {cell.kv_dtype}")
        prompts = self._prompts(cell, requests, repeat)
        schedule = ArrivalSchedule.for_cell(cell, requests)
        traces: list[RunTrace] = []
        kv_measured = kv_predicted = 0
        t0 = time.perf_counter()
        while schedule.pending:
            now = time.perf_counter() - t0
            due = schedule.pop_due(now)
            if not due:  # nothing due yet: sleep to the next arrival (None: the rest were never to be sent)
                next_s = schedule.next_due_s()
                if next_s is None:
                    break
                time.sleep(max(next_s - now, 0.0))
                continue
            batch = [r for _, r in due]
            batch_traces, measured, predicted = self._run_batch(batch, prompts, t0, repeat, cell)
            for (due_s, _), trace in zip(due, batch_traces, strict=True):  # sent: handed to the batch at ``now``
                trace.arrival_s, trace.sent_s = due_s, now
                schedule.ended(trace.request_id, trace.end_s)
            traces.extend(batch_traces)
            kv_measured = max(kv_measured, measured)
            kv_predicted = max(kv_predicted, predicted or 0)
        memory: dict[str, int | float | None] = {
            "weights_bytes": self.weights_bytes,
            "kv_predicted_bytes": kv_predicted if self.geometry is not None else None,
        }
        return BackendRun(
            traces=sorted(traces, key=lambda t: t.request_id),
            kv_measured_bytes=kv_measured,
            memory=memory,
            t0_s=t0,
            extra={"parallelism": hf_parallelism(cell, self.device)} if cell.tensor_parallel > 1 else {},
        )

    def _run_batch(
        self, batch: list[RequestSpec], prompts: dict[int, Any], t0: float, repeat: int, cell: Cell
    ) -> tuple[list[RunTrace], int, int | None]:
        import torch

        longest = max(r.prompt_toks for r in batch)
        gen_toks = max(r.gen_toks for r in batch)
        ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, longest - r.prompt_toks :] = prompts[r.id]
            mask[row, longest - r.prompt_toks :] = 1
        temperature = max(r.temperature for r in batch)
        sampling: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling["temperature"] = temperature
        clock = _streamer_class()()
        start = time.perf_counter()
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=gen_toks,
                min_new_tokens=gen_toks,
                pad_token_id=self._pad_id,
                return_dict_in_generate=True,
                streamer=clock,
                **sampling,
            )
        end = time.perf_counter()
        new_toks = int(out.sequences.shape[1]) - longest
        measured = cache_bytes(generated_cache(out))
        del out, ids, mask
        times = clock.times[:new_toks]
        traces = []
        for r in batch:
            own = [t - t0 for t in times[: r.gen_toks]]
            traces.append(
                RunTrace(
                    request_id=r.id,
                    repeat=repeat,
                    arrival_s=r.arrival_s,
                    start_s=start - t0,
                    token_times_s=own,
                    end_s=own[-1] if own else end - t0,
                    prompt_toks=r.prompt_toks,
                    output_toks=len(own),
                    status="ok" if len(own) == r.gen_toks else "error",
                    error=None if len(own) == r.gen_toks else f"generated {len(own)} of {r.gen_toks} tokens",
                )
            )
        predicted = None
        if self.geometry is not None:
            positions = [cached_positions(r.prompt_toks, gen_toks) for r in batch]
            predicted = kv_bytes_batch(self.geometry, positions, self.dtype, "hf")
        return traces, measured, predicted


def _first_id(*candidates: Any) -> int:
    for c in candidates:
        if isinstance(c, list):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return 0


def hf_parallelism(cell: Cell, device: str) -> str:
    """The row's ``parallelism`` for a TP>1 cell: what transformers did, said plainly (its latency is not TP's)."""
    n = cell.tensor_parallel
    if device.startswith("cuda"):
        return (
            f"layer-wise placement over {n} GPUs (transformers device_map), not tensor parallelism: "
            "one GPU computes at a time"
        )
    return f"tensor_parallel {n} requested; hf ran on one {device} device (no split): not tensor parallelism"


def spread_layers(model: Any, gpus: int) -> str:
    """Place whole decoder layers over the first ``gpus`` visible GPUs, balanced by size (accelerate's
    ``get_balanced_memory`` + ``infer_auto_device_map`` + ``dispatch_model``); returns the inputs' device."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    visible = torch.cuda.device_count()
    if visible < gpus:
        raise KvrayInputError(f"hf: tensor_parallel {gpus} needs {gpus} GPUs, this worker sees {visible}")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    capacity = {i: int(torch.cuda.get_device_properties(i).total_memory * 0.9) for i in range(gpus)}
    budget = get_balanced_memory(model, max_memory=capacity, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    first = next(iter(device_map.values()))
    return f"cuda:{first}" if isinstance(first, int) else str(first)
