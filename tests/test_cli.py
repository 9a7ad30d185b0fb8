"""The CLI as a user runs it: a real subprocess, one line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest


def kvray(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kvray.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_info_json_fields():
    out = kvray("info", "meta-llama/Meta-Llama-3-8B", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["num_layers"] == 32 and data["num_kv_heads"] == 8 and data["head_dim"] == 128
    assert data["attention"] == "gqa" and data["sliding_window"] is None
    assert data["params"] == 8_030_261_248 and data["weights_bytes"] == 2 * 8_030_261_248
    assert data["kv_bytes_per_token"] == 131_072 and data["kv_bytes_per_token_paged"] == 131_072


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_info_tables_and_mistral_window():
    out = kvray("info", "mistralai/Mistral-7B-v0.1", "--dtype", "fp16")
    assert out.returncode == 0 and "sliding window 4096" in out.stdout and "H100-SXM" in out.stdout
    data = json.loads(kvray("info", "mistralai/Mistral-7B-v0.1", "--json").stdout)
    assert data["sliding_window"] == 4096


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_env_without_gpu_is_clean():
    out = kvray("env", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["libraries"]["transformers"] and data["python"]
    if not data["gpus"]:
        assert data["gpu_note"]
    assert "Traceback" not in kvray("env").stderr


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_check_readable():
    out = kvray("check", "facebook/opt-1.3b", "--concurrency", "64", "--seq-len", "4096", "--gpu", "L4")
    assert out.returncode == 0 and "high" in out.stdout and "reduce concurrency" in out.stdout


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "nobody/nothing"], "bundled:"),
        (["info", "gpt2", "--dtype", "int3"], "unknown dtype"),
        (["check", "gpt2", "--concurrency", "0"], "must be positive"),
        (["check", "gpt2", "--seq-len", "-5"], "must be positive"),
        (["check", "gpt2", "--gpu", "Z100"], "known: A100"),
        (["check", "gpt2", "--bogus"], "No such option"),
        (["check", "gpt2", "--concurrency", "many"], "--concurrency"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    out = kvray(*args)
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_malformed_local_config_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    out = kvray("info", str(tmp_path))
    assert out.returncode == 2 and "num_hidden_layers" in out.stderr


def test_help_and_info_do_not_import_heavy_libraries():
    code = (
        "import sys, io, contextlib\n"
        "from kvray.cli import app\n"
        "for argv in (['--help'], ['info', 'facebook/opt-1.3b', '--json']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: app(argv, standalone_mode=False)\n"
        "        except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_info_asks_the_oom_module_what_fits():
    from kvray.hardware.gpus import GPUS
    from kvray.model.oom import kv_tokens_that_fit, model_summary
    from kvray.model.resolve import resolve_geometry

    data = json.loads(kvray("info", "mistralai/Mistral-7B-v0.1", "--dtype", "fp16", "--json").stdout)
    g = resolve_geometry("mistralai/Mistral-7B-v0.1")
    assert data == json.loads(json.dumps(model_summary(g, "fp16")))
    fits = data["kv_tokens_fitting_beside_weights"]
    assert set(fits) == set(GPUS) and fits["H100-SXM"] == kv_tokens_that_fit(g, "H100-SXM", "fp16") > 0
    # 90% of memory, less weights and the runtime's 0.5 GiB, over 128 KiB of fp16 KV per token
    spec = GPUS["H100-SXM"]
    assert fits["H100-SXM"] == int((0.9 * spec.memory_bytes - data["weights_bytes"] - 2**29) // 131_072)
    assert kv_tokens_that_fit(resolve_geometry("meta-llama/Llama-3.1-70B"), "L4") == 0  # weights alone too big


def test_help_and_json_paths_import_no_rendering_or_data_libraries():
    """`kvray --help` and `kvray info … --json` are the cold-start paths benchmarks/cli_startup.py times."""
    code = (
        "import sys, io, contextlib\n"
        "from kvray.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(sys.argv[1:])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('rich', 'pandas', 'numpy', 'yaml', 'matplotlib') if m in sys.modules))\n"
    )
    for argv in (["--help"], ["info", "facebook/opt-1.3b", "--json"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert out.stdout.strip() == "[]", (argv, out.stdout, out.stderr)


SHARED_EXP_FLAGS = ("--model", "--dtype", "--kv-dtype", "--weights", "--hardware", "--device", "--warmup",
                    "--repeats", "--option", "--output", "--address", "--cluster", "--dry-run", "--json",
                    "--no-plots", "--no-check-oom", "--verbose", "--progress")  # fmt: skip
SERVER_FLAGS = ("--vllm-python", "--base-url", "--api-key-env", "--host")


@pytest.mark.parametrize(
    ("command", "own"),
    [
        ("exp1", ("--prompt-toks", "--gen-toks", "--concurrency", "--backend")),
        ("exp2", ("--seqlens", "--gen-toks", "--concurrency", "--backend")),
        ("exp3", ("--short", "--long", "--gen-toks", "--n-short", "--n-long", "--backend")),
        ("exp4", ("--backends", "--prompt-toks", "--gen-toks", "--concurrency", *SERVER_FLAGS)),
        ("exp5", ("--backends", "--users", "--rates", "--open-load", "--slo", "--prompt-toks", *SERVER_FLAGS)),
        ("exp6", ("--backends", "--prefix-toks", "--concurrency", "--turns", "--kv-pool-mib", "--vllm-python")),
        ("exp7", ("--backends", "--prompt-toks", "--gen-toks", "--concurrency")),
    ],
)
def test_exp_help_lists_the_shared_flags_and_its_own(capsys, command, own):
    from kvray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: kvray {command} [OPTIONS]")
    for flag in (*SHARED_EXP_FLAGS, *own):
        assert f"{flag} " in text or f"{flag}," in text or f"{flag}/" in text, flag
    # one dialect (issue 26): -c is always --concurrency, the folder written is --output (--output-dir: hidden)
    assert "--output-dir" not in text and ("-c, --concurrency" in text) == ("--concurrency" in own)


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_bare_kvray_prints_the_help_and_exits_2():
    out = kvray()
    assert out.returncode == 2 and "Commands:" in out.stdout and "exp4" in out.stdout
    assert out.stderr == ""


def test_shared_flags_cannot_be_redeclared():
    from kvray.cli.options import ExperimentFlags, experiment_command

    def exp9(flags: ExperimentFlags, dtype: str = "fp32") -> None: ...

    with pytest.raises(TypeError, match="redeclares shared experiment flags: dtype"):
        experiment_command(exp9)
