"""Workloads with KV reuse: requests sharing a prefix, and multi-turn conversations.

Both only say *which* prompt tokens are shared (``RequestSpec.prefix_group`` / ``shared_prefix_toks``); every
backend builds the tokens by one rule (kvray/sim/reuse.py), and the same module predicts what a prefix cache
saves on them. Plain signatures: the job file's ``workload: shared_prefix`` / ``workload: multi_turn`` grid
keys and ``kvray exp6`` call these.
"""

from __future__ import annotations

from kvray.errors import KvrayInputError
from kvray.spec import LoadSpec, RequestSpec, Workload


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KvrayInputError(f"{name} must be a positive integer, got {value!r}")


def shared_prefix_workload(
    requests: int,
    groups: int,
    prefix_toks: int,
    suffix_toks: int,
    gen_toks: int,
    arrival_gap_s: float = 0.0,
    *,
    grouped: bool = False,
    one_at_a_time: bool = False,
) -> Workload:
    """``requests`` requests spread round-robin over ``groups`` groups; each prompt is its group's
    ``prefix_toks`` shared tokens then ``suffix_toks`` of its own (kind "shared_prefix"). All arrive at once
    unless ``arrival_gap_s`` spaces them.

    ``grouped``: the groups one after another instead (request i in group ⌊i · groups ÷ requests⌋), as a router
    sees a prefix's requests arrive together; ``one_at_a_time``: each request sent when the one before it ends (a
    closed loop of one user), so the order is the order a cache and a router see."""
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
                after=i - 1 if one_at_a_time and i else None,
                prefix_group=i * groups // requests if grouped else i % groups,
                shared_prefix_toks=prefix_toks,
            )
            for i in range(requests)
        ),
    )


def multi_turn_workload(
    conversations: int, turns: int, user_toks: int, gen_toks: int, think_s: float = 0.0
) -> Workload:
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
                )
            )
    load = LoadSpec("closed", users=conversations, requests=conversations * turns)
    return Workload("multi_turn", tuple(reqs), load=load)


def turn_of(workload: Workload, request_id: int) -> int:
    """The turn of a multi_turn workload's request (ids run turn-major)."""
    conversations = len({r.prefix_group for r in workload.requests})
    return request_id // max(conversations, 1)
