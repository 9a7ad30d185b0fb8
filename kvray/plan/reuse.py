"""Workloads with KV reuse: requests sharing a prefix, and multi-turn conversations.

Both only say *which* prompt tokens are shared (``RequestSpec.prefix_group`` / ``shared_prefix_toks``); every
backend builds the tokens by one rule (kvray/sim/reuse.py), and the same module predicts what a prefix cache
saves on them. Plain signatures: the job file's ``workload: shared_prefix`` / ``workload: multi_turn`` grid
keys and ``kvray exp6`` call these.
"""

from __future__ import annotations

from typing import Any

from kvray.errors import KvrayInputError
from kvray.spec import LoadSpec, RequestSpec, Workload


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KvrayInputError(f"{name} must be a positive integer, got {value!r}")


def shared_prefix_workload(requests: int, groups: int, prefix_toks: int, suffix_toks: int, gen_toks: int,
                           arrival_gap_s: float = 0.0) -> Workload:  # fmt: skip
    """``requests`` requests spread round-robin over ``groups`` groups; each prompt is its group's
    ``prefix_toks`` shared tokens then ``suffix_toks`` of its own (kind "shared_prefix"). All arrive at once
    unless ``arrival_gap_s`` spaces them."""
    _positive(requests=requests, groups=groups, prefix_toks=prefix_toks, suffix_toks=suffix_toks, gen_toks=gen_toks)
    if groups > requests:
        raise KvrayInputError(f"groups ({groups}) cannot exceed requests ({requests})")
    if arrival_gap_s < 0:
        raise KvrayInputError(f"arrival_gap_s must be >= 0, got {arrival_gap_s}")
    return Workload(
        "shared_prefix",
        tuple(
            RequestSpec(
                i,
                prefix_toks + suffix_toks,
                gen_toks,
                round(i * arrival_gap_s, 6),
                prefix_group=i % groups,
                shared_prefix_toks=prefix_toks,
            )  # fmt: skip
            for i in range(requests)
        ),
    )


def multi_turn_workload(conversations: int, turns: int, user_toks: int, gen_toks: int,
                        think_s: float = 0.0) -> Workload:  # fmt: skip
    """``conversations`` chats of ``turns`` turns, interleaved (kind "multi_turn"): turn k of a conversation is sent
    ``think_s`` after turn k−1 ends, with the whole history as its prompt — turn k−1's prompt, its ``gen_toks``
    answer (synthetic: kvray/sim/reuse.py) and a new ``user_toks`` message — so turn k's prompt is
    (k+1)·user_toks + k·gen_toks tokens, of which k·(user_toks + gen_toks) are shared with turn k−1.
    Request ids run turn-major (turn k of conversation c is k·conversations + c); every first turn arrives at 0."""
    _positive(conversations=conversations, turns=turns, user_toks=user_toks, gen_toks=gen_toks)
    if think_s < 0:
        raise KvrayInputError(f"think_s must be >= 0, got {think_s}")
    reqs = []
    for k in range(turns):
        for c in range(conversations):
            rid = k * conversations + c
            reqs.append(
                RequestSpec(
                    rid,
                    (k + 1) * user_toks + k * gen_toks,
                    gen_toks,
                    after=None if k == 0 else rid - conversations,
                    think_s=think_s if k else 0.0,
                    prefix_group=c,
                    shared_prefix_toks=k * (user_toks + gen_toks),
                )  # fmt: skip
            )
    load = LoadSpec("closed", users=conversations, requests=conversations * turns)
    return Workload("multi_turn", tuple(reqs), load=load)


def turn_of(workload: Workload, request_id: int) -> int:
    """The turn of a multi_turn workload's request (ids run turn-major)."""
    conversations = len({r.prefix_group for r in workload.requests})
    return request_id // max(conversations, 1)


def exp6_grid(shared_prefix_toks: list[int], total_prompt_toks: int, concurrency: int, gen_toks: int,
              conversations: int, turns: int, user_toks: int, turn_gen_toks: int,
              pressure_concurrency: list[int], pressure_prompt_toks: int, pressure_gen_toks: int) -> list[dict[str, Any]]:  # fmt: skip
    """exp6's grid blocks, in the job file's own keys (``workload: shared_prefix`` / ``multi_turn``):

    - the same total prompt with a shared prefix of each of ``shared_prefix_toks`` (and 0: a uniform block), so
      TTFT and hit rate can be drawn against the shared fraction;
    - ``conversations`` × ``turns`` multi-turn chats;
    - a KV-pressure sweep: ``pressure_concurrency`` requests of ``pressure_prompt_toks`` + ``pressure_gen_toks``
      (long outputs grow the running set's KV until a small pool fills and the engine preempts).
    """
    _positive(total_prompt_toks=total_prompt_toks, concurrency=concurrency, gen_toks=gen_toks,
              conversations=conversations, turns=turns, user_toks=user_toks, turn_gen_toks=turn_gen_toks,
              pressure_prompt_toks=pressure_prompt_toks, pressure_gen_toks=pressure_gen_toks)  # fmt: skip
    for c in pressure_concurrency:
        _positive(pressure_concurrency=c)
    bad = [p for p in shared_prefix_toks if not 0 < p < total_prompt_toks]
    if bad:
        raise KvrayInputError(
            f"--prefix-toks must be within 1..{total_prompt_toks - 1} (the total prompt), got {bad[0]}"
        )
    blocks: list[dict[str, Any]] = [
        {"prompt_toks": [total_prompt_toks], "gen_toks": [gen_toks], "concurrency": [concurrency]}
    ]
    blocks += [
        {
            "workload": "shared_prefix",
            "prefix_toks": [p],
            "suffix_toks": [total_prompt_toks - p],
            "groups": [1],
            "gen_toks": [gen_toks],
            "concurrency": [concurrency],
        }  # fmt: skip
        for p in sorted(set(shared_prefix_toks))
    ]
    blocks.append({"workload": "multi_turn", "conversations": [conversations], "turns": [turns],
                   "user_toks": [user_toks], "gen_toks": [turn_gen_toks]})  # fmt: skip
    if pressure_concurrency:
        blocks.append({"prompt_toks": [pressure_prompt_toks], "gen_toks": [pressure_gen_toks],
                       "concurrency": sorted(set(pressure_concurrency))})  # fmt: skip
    return blocks


def exp6_job(common: Any, grid: list[dict[str, Any]]) -> Any:
    """exp6 — KV reuse and pressure — as a Job, parsed from the job-file mapping so it means exactly what
    jobs/exp6_kv_reuse.yaml means (``common`` is kvray.plan.experiments.Common)."""
    from kvray.plan.experiments import job_name
    from kvray.plan.job import job_from_dict

    mapping = {
        "name": common.name or job_name("exp6", common.model), "description": "kvray exp6", "experiment": "exp6",
        "models": [common.model], "backends": list(common.backends), "dtypes": [common.dtype],
        "weights": common.weights, "kv_dtype": common.kv_dtype, "device": common.device,
        "hardware": common.hardware, "warmup": common.warmup, "repeats": common.repeats,
        "options": dict(common.options), "grid": grid,
    }  # fmt: skip
    return job_from_dict({k: v for k, v in mapping.items() if v is not None}, source="kvray exp6")
