"""report.md and the self-contained report.html from the crafted dataset: tables, environment and
findings whose numbers are the data's."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
from test_findings import ACT_PER_REQUEST, KV_BIAS, KV_PER_TOKEN, write_crafted

from kvray.figures.plots import FIGURES
from kvray.report import make_report
from kvray.units import human_bytes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = write_crafted(tmp_path_factory.mktemp("crafted"))
    paths = make_report(out)
    return out, paths, paths.markdown.read_text(), paths.html.read_text()


def section(md: str, heading: str) -> str:
    start = md.index(f"## {heading}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:]]  # without the header


def test_files_and_title(report):
    out, paths, md, html = report
    assert paths.markdown == out / "report.md" and paths.html == out / "report.html"
    assert md.startswith("# kvray report — crafted")
    assert "31 cells (1 error, 26 ok, 2 oom, 1 refused, 1 skipped_after_oom)" in md


def test_environment_lists_each_hardware_type(report):
    _, _, md, _ = report
    env = section(md, "Environment and hardware")
    rows = {r[0]: r for r in table_rows(env)}
    assert rows["NVIDIA H100 80GB HBM3"][1:5] == ["H100-SXM", "80.00 GiB", "H100", "16"]
    assert rows["NVIDIA A100-SXM4-40GB"][1:5] == ["A100-40GB-SXM", "40.00 GiB", "A100", "15"]
    assert "kvray test; job `crafted`" in env


def test_one_table_per_experiment_with_every_cell(report):
    _, _, md, _ = report
    exp1 = table_rows(section(md, "Exp1"))
    assert len(exp1) == 15  # 7 concurrencies × 2 GPUs + the error cell
    by_key = {(r[0], r[1]): r for r in exp1}
    assert by_key[("A100-40GB-SXM", "32")][4] == "oom" and by_key[("A100-40GB-SXM", "64")][4] == "skipped_after_oom"
    assert by_key[("H100-SXM", "8")][8] == "+2.00%"  # KV error column
    assert len(table_rows(section(md, "Exp2"))) == 12
    exp3 = section(md, "Exp3")
    assert "| H100-SXM | 3 × 128 + 1 × 4096 | TTFT p50 | 21.0 | 546.0 | ×26.00 |" in exp3
    assert "refused at c=1 × 4096 prompt tokens — refused: crafted" in section(md, "Exp2")


def test_findings_state_the_datas_numbers(report):
    _, paths, md, _ = report
    findings = section(md, "Findings")
    slope_h100 = 575 * KV_PER_TOKEN * (1 + KV_BIAS["H100"]) + ACT_PER_REQUEST
    assert (
        f"H100-SXM: peak memory (torch max_memory_allocated) grows by {human_bytes(slope_h100)} per extra" in findings
    )
    assert "A100-40GB-SXM: max concurrency before OOM is 16; 32 does not fit (OOM, skipped after OOM)" in findings
    assert "H100-SXM: over prompt lengths 128–4096, TTFT p50 ∝ L^1.50 (superlinear" in findings
    # 3 short requests × 2 repeats cannot hold a p99 (issue 17): the tail is named as the maximum it is.
    assert "TTFT max of 6 ×26.00 (22.0 ms → 572.0 ms)" in findings and "TTFT p99 ×" not in findings
    assert "predicted KV is within 2.0% of measured over 14 cells" in findings
    assert {f.key for f in paths.findings} == {
        "memory_slope",
        "oom_boundary",
        "throughput_plateau",
        "latency_exponent",
        "mixed_penalty",
        "kv_error",
    }


def test_markdown_links_every_figure(report):
    out, _, md, _ = report
    for name in FIGURES:
        assert f"![{name}](figures/{name}.png)" in md and f"([SVG](figures/{name}.svg))" in md
        assert (out / "figures" / f"{name}.svg").is_file()


def test_html_is_self_contained_with_embedded_pngs(report):
    _, _, md, html = report
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', html)
    names = [name for name, _ in images]  # fig1–fig7, then the timeline (fig10) of the highest-p99-TTFT cell
    assert names[: len(FIGURES)] == list(FIGURES) and len(names) == len(FIGURES) + 1
    assert names[-1].startswith("fig10_timeline_")
    # the timeline is the most concurrent measured cell's: H100 at c=32 (its c=64 is OOM, EXP1_STATUS), not the first
    assert "most concurrent (32 requests at once)" in md
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert not re.search(r'(src|href)="(https?:|figures/)', html)  # nothing fetched from elsewhere
    assert html.count("<table>") == md.count("\n|---") and "<code>crafted</code>" in html
    assert "TTFT max of 6 ×26.00 (22.0 ms → 572.0 ms)" in html


def test_empty_folder_still_gets_a_report(tmp_path):
    paths = make_report(tmp_path)
    md = paths.markdown.read_text()
    assert "0 cells (no cells)" in md and "The dataset is empty" in md
    assert "No finding can be computed" in md and paths.html.read_text().count("<img") == len(FIGURES)


def test_report_command_without_ray_or_torch(report, tmp_path):
    out, _, _, _ = report
    code = (
        "import sys\n"
        "from kvray.cli import main\n"
        f"try: main(['report', {str(out)!r}, '--no-figures'])\n"
        "except SystemExit as e: assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "max concurrency before OOM is 32" in proc.stdout and "report.html" in proc.stdout
