"""Hugging Face transformers in-process with continuous batching and paged attention (transformers ≥ 5.17).

The same model and prompts as the ``hf`` backend (it inherits loading and seeded random prompts), but
served by transformers' continuous-batching manager: each request is added when it arrives, admitted
into the running batch as soon as the scheduler has room, and its KV lives in fixed-size blocks of a
cache allocated once up front — the paged-KV design vLLM uses, inside one Python process.

What is recorded beyond the traces:
  start_s         when the scheduler admitted the request (transformers' ``lifespan[0]``), so queue_s is real
  token times     transformers' own per-token timestamps (``record_timestamps``), same perf_counter clock
  kv_reserved_bytes  the cache tensor allocated up front (what the engine holds whatever the load)
  kv_measured_bytes  peak bytes of blocks in use, sampled every ~5 ms from the cache's free-block count
  kv_predicted_bytes kvray's paged prediction with the engine's block size, for the requests the scheduler
                     held at the sample where used KV peaked, each at its own length then (admission times
                     and token timestamps: kvray/measure/kv_timeline.py); kv_predicted_all_resident_bytes is
                     every request at P + G − 1 at once
  kv_allocated_in_window_bytes  the pool bytes this run allocated (the pool, when the manager was created in
                     it; 0 when it already existed): the runner subtracts it, not the used KV, from
                     peak − baseline for ``activation_peak_bytes`` (docs/metrics.md)
  extra["paged_cache"]  block size, block count, bytes per block, capacity in tokens, attention implementation
  extra["kv_timeline"]  usage / running / waiting over time, as for servers

The manager (and its cache) persists across runs of cells with the same model and knobs, so warmup
pays the start-up once. Cell options: block_size (tokens per page; transformers' default 256),
num_blocks, kv_cache_memory_bytes (the pool size; CPU default 256 MiB, as the vllm backend uses on CPU, since
a CPU has no "free GPU memory" to size from), max_memory_percent (CUDA), max_batch_tokens (CPU default 512:
the CPU attention path builds a dense mask of max_batch_tokens × cache tokens), max_num_seqs, prefix_sharing
(False: random prompts share nothing and retained blocks would blur "used"), timeout_s (600),
sample_interval_s (0.005).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kvray.backends.arrivals import ArrivalSchedule
from kvray.backends.base import BackendRun
from kvray.backends.hf import HFBackend
from kvray.errors import KvrayInputError
from kvray.measure.sampler import PeriodicSampler
from kvray.measure.trace import RunTrace
from kvray.model.kvmath import cached_positions, kv_bytes_batch, normalize_dtype, paged_blocks_in
from kvray.spec import Cell, RequestSpec

DEFAULTS: dict[str, Any] = {
    "block_size": None,
    "num_blocks": None,
    "kv_cache_memory_bytes": None,
    "max_memory_percent": None,
    "max_batch_tokens": None,
    "max_num_seqs": None,
    "prefix_sharing": False,
    "timeout_s": 600.0,
    "sample_interval_s": 0.005,
}
CPU_KV_CACHE_MEMORY_BYTES = 256 * 2**20  # the same default pool as the vllm backend on CPU
CPU_MAX_BATCH_TOKENS = 512
_DEFAULT_PAGE_SIZE = 256  # transformers' ContinuousBatchingConfig.page_size default


def paged_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The cell options this backend reads, over its defaults, checked."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}
    for key in ("block_size", "num_blocks", "max_batch_tokens", "max_num_seqs"):
        if opts[key] is not None and int(opts[key]) < 1:
            raise KvrayInputError(f"hf-paged: {key} must be >= 1, got {opts[key]}")
    if opts["block_size"] is not None and int(opts["block_size"]) < 4:
        raise KvrayInputError("hf-paged: block_size must be at least 4 tokens")
    if opts["kv_cache_memory_bytes"] is not None and int(opts["kv_cache_memory_bytes"]) <= 0:
        raise KvrayInputError("hf-paged: kv_cache_memory_bytes must be positive")
    if opts["max_memory_percent"] is not None and not 0 < float(opts["max_memory_percent"]) <= 1:
        raise KvrayInputError("hf-paged: max_memory_percent must be in (0, 1]")
    return opts


def pool_in_window(pool_before_bytes: int, pool_after_bytes: int, created: bool) -> int:
    """KV pool bytes a run allocated: none when it reused the manager (its pool is in the memory baseline),
    the new pool less the old one it replaced when it created one (the old pool was in the baseline and was
    freed first)."""
    return max(pool_after_bytes - pool_before_bytes, 0) if created else 0


# transformers' paged cache comes in two layouts, told apart by what the cache object has (no version numbers):
#   sectors (5.2x):  one byte tensor ``cache_tensor`` of ``num_sectors × bytes_per_sector`` usable bytes (plus two
#                    trash sectors); ``compute_free_capacity(relative=False)`` is the free bytes; the config's
#                    tokens-per-block field is ``page_size``
#   blocks (≤ 5.1x): per-layer ``key_cache`` / ``value_cache`` tensors of ``num_blocks + 2`` blocks (two padding
#                    blocks never allocated); ``get_num_free_blocks()`` counts free blocks; the field is ``block_size``
# Both hand out ``num_blocks`` whole-model blocks of the page size; these helpers read either as bytes.


def page_size_field(config_class: type) -> str:
    """The name ``ContinuousBatchingConfig`` gives the tokens per KV block: ``page_size``, or ``block_size`` before
    the rename (the newer class still accepts ``block_size``, with a deprecation warning)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    return "page_size" if "page_size" in names else "block_size"


def _block_tensors(cache: Any) -> list[Any]:
    return [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])]


def _block_layout_bytes_per_block(cache: Any) -> int:
    """Bytes of one block in the per-layer layout: every key and value tensor's row bytes × tokens per block."""
    per_token = sum(t[0].numel() * t.element_size() for t in _block_tensors(cache))
    return int(per_token * cache.block_size)


def pool_usable_bytes(cache: Any) -> int:
    """The bytes the engine can hand out to requests (padding / trash space excluded)."""
    if hasattr(cache, "num_sectors"):
        return int(cache.num_sectors * cache.bytes_per_sector)
    return int(cache.num_blocks) * _block_layout_bytes_per_block(cache)


def pool_used_bytes(cache: Any) -> int:
    """Bytes of the pool held by requests right now."""
    if hasattr(cache, "num_sectors"):
        return int(pool_usable_bytes(cache) - cache.compute_free_capacity(relative=False))
    return (int(cache.num_blocks) - int(cache.get_num_free_blocks())) * _block_layout_bytes_per_block(cache)


def pool_allocated_bytes(cache: Any) -> int:
    """Bytes of the cache tensors as allocated (the usable pool plus the engine's padding space)."""
    if hasattr(cache, "cache_tensor"):
        return int(cache.cache_tensor.numel() * cache.cache_tensor.element_size())
    return int(sum(t.numel() * t.element_size() for t in _block_tensors(cache)))


class KVSampler(PeriodicSampler):
    """Samples the paged cache's blocks in use (and the scheduler's queues) on a daemon thread."""

    def __init__(self, manager: Any, t0: float, interval_s: float, repeat: int):
        super().__init__(interval_s, "kvray-paged-kv", t0)
        self.manager, self.repeat = manager, repeat
        self.peak_used = 0
        self.points: list[dict[str, Any]] = []

    def sample(self) -> None:
        bp = self.manager.batch_processor
        if bp is None:
            return
        cache = bp.cache
        try:  # the generation thread mutates these structures; a torn read is skipped
            usable = pool_usable_bytes(cache)
            used = pool_used_bytes(cache)
            running = len(bp.scheduler.active_requests)
            waiting = len(bp.scheduler.waiting_requests)
        except (RuntimeError, AttributeError, KeyError, IndexError):
            return
        self.peak_used = max(self.peak_used, used)
        point = {
            "repeat": self.repeat,
            "t_s": round(self.elapsed_s(), 6),
            "kv_used_bytes": used,
            "kv_usage": used / usable if usable else None,
            "running": running,
            "waiting": waiting,
            "preemptions": None,
        }
        last = self.points[-1] if self.points else None
        if last is None or any(last[k] != point[k] for k in ("kv_usage", "running", "waiting")):
            self.points.append(point)  # changes only: a 5 ms sampler would otherwise flood the dataset


class HFPagedBackend(HFBackend):
    """transformers continuous batching over a paged KV cache, requests admitted as they arrive."""

    name = "hf-paged"
    kv_layout = "paged"
    queues_when_full = True  # the scheduler admits what fits the cache and queues the rest

    def __init__(self) -> None:
        super().__init__()
        self.manager: Any = None
        self._manager_key: tuple[Any, ...] | None = None
        self._created_now = False  # _ensure_manager started a new manager (and so allocated its pool) just now

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        paged_options(options)

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """Its options only: the cell keeps the device it was given (resolved when the model loads)."""
        cls.validate_options(cell.option_dict)
        return cell

    def load(self, cell: Cell) -> None:
        paged_options(cell.option_dict)
        super().load(cell)  # a different model closes the old one, and with it the manager

    def close(self) -> None:
        self._stop_manager()
        super().close()

    def free_memory(self) -> None:
        self._stop_manager()
        super().free_memory()

    def _stop_manager(self) -> None:
        manager, self.manager, self._manager_key = self.manager, None, None
        if manager is None:
            return
        try:
            manager.stop(block=True, timeout=10)
        finally:
            with contextlib.suppress(Exception):
                manager.destroy()

    def _num_blocks(self, opts: dict[str, Any], page_size: int) -> int | None:
        if opts["num_blocks"] is not None:
            return int(opts["num_blocks"])
        space = opts["kv_cache_memory_bytes"]
        if space is None and self.device == "cpu" and opts["max_memory_percent"] is None:
            space = CPU_KV_CACHE_MEMORY_BYTES
        if space is None:
            return None  # CUDA: transformers sizes the cache from free memory
        if self.geometry is None:
            raise KvrayInputError("hf-paged: this architecture's KV size is unknown; pass num_blocks explicitly")
        return max(paged_blocks_in(self.geometry, int(space), self.dtype, page_size), 1)

    def _ensure_manager(self, cell: Cell, temperature: float) -> Any:
        try:
            from transformers import ContinuousBatchingConfig, GenerationConfig
        except ImportError as exc:  # releases before its continuous-batching config (5.0 has none)
            raise RuntimeError(f"hf-paged needs transformers >= 5.17 (ContinuousBatchingConfig): {exc}") from None

        opts = paged_options(cell.option_dict)
        page_size = int(opts["block_size"] or _DEFAULT_PAGE_SIZE)
        num_blocks = self._num_blocks(opts, page_size)
        max_batch_tokens = opts["max_batch_tokens"] or (CPU_MAX_BATCH_TOKENS if self.device == "cpu" else None)
        key = (
            self._key,
            page_size,
            num_blocks,
            opts["max_memory_percent"],
            max_batch_tokens,
            opts["max_num_seqs"],
            bool(opts["prefix_sharing"]),
            temperature,
        )
        if key == self._manager_key and self.manager is not None and self.manager.is_running():
            return self.manager
        self._stop_manager()
        cb_kwargs: dict[str, Any] = {
            page_size_field(ContinuousBatchingConfig): page_size,
            "allow_block_sharing": bool(opts["prefix_sharing"]),
        }
        for name, value in (
            ("num_blocks", num_blocks),
            ("max_memory_percent", opts["max_memory_percent"]),
            ("max_batch_tokens", max_batch_tokens),
            ("max_requests_per_batch", opts["max_num_seqs"]),
        ):
            if value is not None:
                cb_kwargs[name] = value
        sampling: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling["temperature"] = temperature
        gen_config = GenerationConfig(eos_token_id=-1, pad_token_id=self._pad_id, max_new_tokens=1, **sampling)
        manager = self.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs)
        )
        manager.start()
        deadline = time.monotonic() + 120
        while manager.batch_processor is None:  # the cache is created on the generation thread
            if not manager.is_running() or time.monotonic() > deadline:
                error = manager.background_thread_status.fatal_error
                raise RuntimeError(f"hf-paged: the continuous-batching manager did not start ({error})")
            time.sleep(0.01)
        self.manager, self._manager_key = manager, key
        self._created_now = True
        return manager

    def _pool_bytes(self) -> int:
        """Bytes of the current manager's cache tensor (0 without a running manager)."""
        if self.manager is None or self.manager.batch_processor is None:
            return 0
        return int(self.cache_info()["allocated_bytes"])

    def cache_info(self) -> dict[str, Any]:
        """The paged cache the engine allocated: block size, blocks, bytes, capacity in tokens."""
        cache = self.manager.batch_processor.cache
        cfg = self.manager.continuous_batching_config
        page_size = int(getattr(cfg, "page_size", None) or cfg.block_size)
        usable = pool_usable_bytes(cache)
        bytes_per_block = usable // cache.num_blocks if cache.num_blocks else None
        return {
            "block_size": page_size,
            "num_blocks": int(cache.num_blocks),
            "bytes_per_block": bytes_per_block,
            "kv_cache_memory_bytes": usable,
            "allocated_bytes": pool_allocated_bytes(cache),
            "kv_cache_size_tokens": int(cache.num_blocks) * page_size,
            "max_batch_tokens": int(cache.max_batch_tokens),
            "cache_dtype": self.dtype,
            # "sdpa" / "paged|eager": one masked attention over the flattened batch; a flash one: varlen
            # (kvray/sim/passes.py, ATTENTIONS) — what the simulator replays this engine with
            "attn_implementation": str(getattr(self.model.config, "_attn_implementation", None) or "sdpa"),
        }

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.model is None:
            self.load(cell)
        if cell.kv_dtype and normalize_dtype(cell.kv_dtype) != self.dtype:
            raise KvrayInputError(f"hf-paged caches KV in the model dtype ({self.dtype}), not {cell.kv_dtype}")
        opts = paged_options(cell.option_dict)
        pool_before = self._pool_bytes()
        manager = self._ensure_manager(cell, max((r.temperature for r in requests), default=0.0))
        info = self.cache_info()
        pool_grown = pool_in_window(pool_before, info["allocated_bytes"], created=self._created_now)
        self._created_now = False
        for r in requests:
            cached = cached_positions(r.prompt_toks, r.gen_toks)  # the last token is sampled, never cached
            need = math.ceil(cached / info["block_size"])
            if need > info["num_blocks"]:
                raise MemoryError(
                    f"hf-paged: can't allocate memory: a request of {cached} cached positions needs {need} "
                    f"blocks, the cache has {info['num_blocks']} (raise num_blocks or kv_cache_memory_bytes)"
                )
        prompts = self._prompts(cell, requests, repeat)
        schedule = ArrivalSchedule.for_cell(cell, requests)
        sent: dict[str, tuple[float, float]] = {}  # name → (due_s, sent_s)
        by_name = {f"{cell.cell_id}-{repeat}-{r.id}": r for r in requests}
        names = {r.id: name for name, r in by_name.items()}
        outputs: dict[str, Any] = {}
        deadline = time.monotonic() + float(opts["timeout_s"])
        t0 = time.perf_counter()
        with KVSampler(manager, t0, float(opts["sample_interval_s"]), repeat) as sampler:
            while len(outputs) < len(sent) or schedule.pending:
                now = time.perf_counter() - t0
                for due_s, r in schedule.pop_due(now):
                    sent[names[r.id]] = (due_s, now)
                    manager.add_request(
                        prompts[r.id].tolist(),
                        request_id=names[r.id],
                        max_new_tokens=r.gen_toks,
                        record_timestamps=True,
                        eos_token_id=-1,
                    )
                if len(outputs) == len(sent) and schedule.next_due_s() is None and schedule.pending:
                    break  # nothing in flight and nothing the schedule will still send
                next_s = schedule.next_due_s()
                wait = 0.01 if next_s is None else max(min(0.01, next_s - now), 0.0)
                result = manager.get_result(timeout=wait) if wait > 0 else None
                if result is not None and result.is_finished() and result.request_id in by_name:
                    outputs[result.request_id] = result
                    end = result.timestamps[-1] if result.timestamps else time.perf_counter()
                    schedule.ended(by_name[result.request_id].id, end - t0)
                if not manager.is_running() and len(outputs) < len(sent):
                    error = manager.background_thread_status.fatal_error
                    self._stop_manager()
                    raise RuntimeError(f"hf-paged: the generation loop stopped: {error}")
                if time.monotonic() > deadline:
                    self._stop_manager()
                    raise RuntimeError(
                        f"hf-paged: {len(sent) - len(outputs)} requests unfinished after {opts['timeout_s']} s"
                    )
        traces = [self._trace(by_name[name], out, t0, repeat, *sent[name]) for name, out in outputs.items()]
        memory: dict[str, int | float | None] = {
            "weights_bytes": self.weights_bytes,
            "kv_reserved_bytes": info["allocated_bytes"],
            "kv_used_peak_bytes": sampler.peak_used,
            "kv_usage_peak": sampler.peak_used / info["kv_cache_memory_bytes"],
            "kv_allocated_in_window_bytes": pool_grown,
        }
        if self.geometry is not None:  # predicted from the running set at the measured peak (kv_timeline.py)
            from kvray.measure.kv_timeline import timeline_prediction

            positions = [cached_positions(r.prompt_toks, r.gen_toks) for r in requests]
            all_resident = kv_bytes_batch(self.geometry, positions, self.dtype, "paged", info["block_size"])
            memory.update(
                timeline_prediction(sampler.points, traces, self.geometry, self.dtype, info["block_size"], all_resident)
            )
        extra: dict[str, Any] = {"paged_cache": info}
        if repeat >= 0:
            extra["kv_timeline"] = list(sampler.points)  # this repeat's; the runner joins a cell's repeats
        return BackendRun(
            traces=sorted(traces, key=lambda t: t.request_id),
            kv_measured_bytes=sampler.peak_used,
            memory=memory,
            extra=extra,
            t0_s=t0,
        )

    @staticmethod
    def _trace(r: RequestSpec, out: Any, t0: float, repeat: int, due_s: float, sent_s: float) -> RunTrace:
        times = [t - t0 for t in (out.timestamps or [])]
        generated = len(out.generated_tokens)
        admitted = out.lifespan[0] - t0 if out.lifespan[0] > 0 else sent_s
        end = times[-1] if times else (out.lifespan[1] - t0 if out.lifespan[1] > 0 else admitted)
        error = out.error
        if error is None and generated != r.gen_toks:
            error = f"generated {generated} of {r.gen_toks} tokens"
        return RunTrace(
            request_id=r.id,
            repeat=repeat,
            arrival_s=due_s,
            start_s=max(admitted, sent_s),
            token_times_s=times,
            end_s=end,
            prompt_toks=len(out.prompt_ids) or r.prompt_toks,
            output_toks=generated,
            status="ok" if error is None else "error",
            error=error,
            sent_s=sent_s,
        )
