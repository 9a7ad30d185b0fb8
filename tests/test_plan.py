"""The planner: groups share one model load, run small to large, and an OOM skips only cells that outgrow it."""

from kvray.plan.job import job_from_dict
from kvray.plan.planner import group_cells, group_key, outgrows, plan_cells, predicted_bytes, skip_reason
from kvray.spec import Cell, Workload


def job(**overrides):
    base = {
        "name": "p",
        "models": ["kvray/tiny-llama", "gpt2"],
        "backends": ["synthetic", "hf"],
        "dtypes": ["fp32"],
        "grid": [
            {"prompt_toks": [512, 16], "gen_toks": [4], "concurrency": [8, 1]},
            {"mixed": [[16, 16, 512]], "gen_toks": [4]},
        ],
    }
    return job_from_dict({**base, **overrides})


def cell(c, p, g=4, **kw):
    return Cell(model="kvray/tiny-llama", workload=Workload.uniform(c, p, g, kw.pop("gap", 0.0)), **kw)


def test_groups_are_model_backend_dtype_and_run_small_to_large():
    cells = plan_cells(job())
    groups = group_cells(cells)
    assert len(cells) == 2 * 2 * 5 and len(groups) == 4
    for key, members in groups.items():
        assert {group_key(c) for c in members} == {key} and len(members) == 5
        sizes = [predicted_bytes(c) for c in members]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
        shapes = [(c.concurrency, c.prompt_toks) for c in members]
        assert shapes[0] == (1, 16) and shapes[-1] == (8, 512)
        # the mixed batch [16, 16, 512] needs more than one 512 request and less than eight
        assert shapes.index((3, 512)) > shapes.index((1, 512))


def test_predicted_bytes_follows_kv_and_dtype():
    small, big = cell(1, 64), cell(4, 64)
    assert predicted_bytes(big) > 3 * predicted_bytes(small) > 0
    assert predicted_bytes(cell(1, 64, dtype="fp32")) > predicted_bytes(cell(1, 64, dtype="bf16"))


def test_outgrows_needs_every_axis():
    oomed = cell(4, 256)
    assert outgrows(cell(4, 256, g=8), oomed) and outgrows(cell(8, 512), oomed)
    assert not outgrows(cell(2, 1024), oomed)  # fewer requests
    assert not outgrows(cell(8, 128), oomed)  # shorter prompts
    assert not outgrows(cell(4, 256, g=2), oomed)  # fewer generated tokens
    assert not outgrows(cell(4, 256, gap=0.5), oomed)  # arrivals spread out
    assert not outgrows(cell(8, 512, dtype="fp16"), oomed)  # another group
    assert not outgrows(cell(8, 512, backend="synthetic"), oomed)
    mixed = Cell(model="kvray/tiny-llama", workload=Workload.mixed([256, 16, 16, 16], 4))
    assert outgrows(mixed, cell(1, 256)) and not outgrows(mixed, cell(2, 256))


def test_skip_reason_names_the_cell_and_hardware():
    oomed = cell(4, 256)
    reason = skip_reason(cell(8, 256), [cell(1, 4096), oomed], "NVIDIA L4")
    assert reason is not None and oomed.cell_id in reason and "NVIDIA L4" in reason and "out of memory" in reason
    assert skip_reason(cell(2, 256), [oomed], "cpu") is None


def test_experiment_labels_follow_grid_then_job():
    j = job(
        experiment="expX",
        grid=[{"prompt_toks": [8], "gen_toks": [2]}, {"prompt_toks": [8], "gen_toks": [2], "experiment": "exp3"}],
    )
    labels = sorted({c.experiment for c in plan_cells(j)})
    assert labels == ["exp3", "expX"]
