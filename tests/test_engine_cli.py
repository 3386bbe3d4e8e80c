"""`python -m engine run`: the JSON report's shape and content; one-line errors, exit code 2.

Most cases call `cli.main()` in-process (fast); one success and one failure go through a real
subprocess, as a user would run them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["run", "--model", "tiny", "--device", "cpu", "--kv-budget-mb", "1", "--page-size", "4"]

SUMMARY_KEYS = {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput_rps", "slo_attainment",
                "throughput_tok_s", "kv_bytes_peak", "kv_bytes_capacity", "waste_tokens_peak",
                "preemptions"}
STAT_KEYS = {"mean", "p50", "p90", "p99"}
REQUEST_KEYS = {"id", "prompt_ids", "output_ids", "arrival_s", "first_token_s", "token_times_s",
                "finish_s", "preemptions"}
STEP_KEYS = {"t_start", "t_end", "prefill_tokens", "decode_seqs", "running", "waiting",
             "kv_blocks_used", "kv_bytes_used", "waste_tokens"}


def _strict_json(text: str) -> dict:
    """Parse, refusing NaN and Infinity, which are not JSON."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def check_report(report: dict, requests: int, context: int, output: int) -> None:
    assert {"device", "model", "config", "summary", "requests", "steps"} <= set(report)
    assert report["model"] == "tiny"
    assert report["device"].startswith("CPU")
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[key]
        assert set(stats) == STAT_KEYS
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"]
        assert stats["mean"] > 0
    assert len(report["requests"]) == requests
    for r in report["requests"]:
        assert REQUEST_KEYS <= set(r)
        assert len(r["prompt_ids"]) == context
        assert len(r["output_ids"]) == len(r["token_times_s"]) == output
        assert r["arrival_s"] <= r["first_token_s"] == r["token_times_s"][0]
        assert r["finish_s"] == r["token_times_s"][-1]
    assert report["steps"]
    for s in report["steps"]:
        assert STEP_KEYS <= set(s)
        assert s["t_start"] <= s["t_end"]
    assert summary["preemptions"] == sum(r["preemptions"] for r in report["requests"])
    assert summary["kv_bytes_peak"] == max(s["kv_bytes_used"] for s in report["steps"])
    peak = max(report["steps"], key=lambda s: s["kv_blocks_used"])  # the first step at the peak
    assert summary["waste_tokens_peak"] == peak["waste_tokens"]
    assert 0 < summary["kv_bytes_peak"] <= summary["kv_bytes_capacity"] == 2**20
    assert summary["throughput_tok_s"] > 0
    assert summary["slo_attainment"] == 1.0  # no SLO given: every finished request meets it
    assert report["config"]["block_size"] == 4


def test_json_report_in_process(capsys) -> None:
    code = cli.main(SMALL + ["--batch", "2", "--requests", "3", "--context", "10", "--output",
                             "5", "--max-batched-tokens", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.count("\n") == 1  # one JSON object on one line
    check_report(_strict_json(out), requests=3, context=10, output=5)
    assert "Traceback" not in err


def test_mix_draws_long_tailed_lengths(capsys) -> None:
    base = SMALL + ["--batch", "4", "--requests", "12", "--context", "12", "--output", "3",
                    "--json"]
    assert cli.main(base) == 0
    fixed = {len(r["prompt_ids"]) for r in _strict_json(capsys.readouterr().out)["requests"]}
    assert cli.main(base + ["--mix", "lognormal"]) == 0
    mixed = [len(r["prompt_ids"]) for r in _strict_json(capsys.readouterr().out)["requests"]]
    assert fixed == {12} and len(set(mixed)) > 3 and max(mixed) <= 48


def test_slo_flags_reach_the_summary(capsys) -> None:
    base = SMALL + ["--batch", "2", "--context", "6", "--output", "3", "--json"]
    assert cli.main(base + ["--ttft-slo", "1e-6"]) == 0
    strict = _strict_json(capsys.readouterr().out)["summary"]
    assert strict["slo_attainment"] == 0.0 and strict["goodput_rps"] == 0.0
    assert cli.main(base + ["--ttft-slo", "1e6", "--tpot-slo", "1e6"]) == 0
    loose = _strict_json(capsys.readouterr().out)["summary"]
    assert loose["slo_attainment"] == 1.0 and loose["goodput_rps"] > 0


def test_readable_table_in_process(capsys) -> None:
    assert cli.main(SMALL + ["--batch", "2", "--context", "6", "--output", "3"]) == 0
    out = capsys.readouterr().out
    for label in ("device", "TTFT (ms)", "TPOT (ms)", "ITL (ms)", "E2E (ms)", "throughput",
                  "goodput", "KV peak", "waste peak"):
        assert label in out
    assert "2 done, 0 rejected" in out


ERRORS = {
    "page size 0": (["--page-size", "0"], "page size must be at least 1"),
    "context past the maximum": (["--context", "9000"], "maximum of 8192"),
    "KV budget holds no block": (["--kv-budget-mb", "0.001"], "holds no block"),
    "KV budget too small for a request": (["--kv-budget-mb", "0.02", "--context", "128"],
                                          "the KV budget holds"),
    "KV budget zero": (["--kv-budget-mb", "0"], "KV budget must be positive"),
    "KV budget past memory": (["--kv-budget-mb", "1e12"], "of memory free on this machine"),
    "output past the maximum": (["--output", "100000000"], "--output 100000000 is past"),
    "context + output past the maximum": (["--context", "8000", "--output", "193"],
                                          "= 8193 tokens is past the model's maximum of 8192"),
    "requests past the workload cap": (["--requests", "100000000"], "--requests 100000000"),
    "batch past the largest": (["--batch", "100000000"], "--batch 100000000 is past"),
    "page past the maximum": (["--page-size", "100000"], "--page-size 100000 is past"),
    "unknown preset": (["--model", "no-such-model"], "unknown model preset"),
    "missing checkpoint": (["--model", "/no/such/checkpoint"], "not a checkpoint directory"),
    "rate zero": (["--rate", "0"], "request rate must be positive"),
    "SLO zero": (["--tpot-slo", "0"], "tpot_ms SLO must be a positive"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_exits_2_with_one_line(case: str, capsys) -> None:
    flags, message = ERRORS[case]
    code = cli.main(SMALL + ["--batch", "2", "--context", "8", "--output", "4"] + flags)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_json_report_subprocess() -> None:
    proc = _run(*SMALL, "--batch", "3", "--requests", "4", "--context", "12", "--output", "4",
                "--rate", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    report = _strict_json(lines[0])
    check_report(report, requests=4, context=12, output=4)
    arrivals = [r["arrival_s"] for r in report["requests"]]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0


def test_bad_input_subprocess() -> None:
    proc = _run(*SMALL, "--model", "no-such-model", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "unknown model preset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sizes_are_refused_before_any_prompt_or_model_is_made(monkeypatch, capsys) -> None:
    """The checks run on the flags and the model's shapes alone: neither the prompt lists nor the
    engine (weights, KV cache) may be built for a run that is then refused."""
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("built before the sizes were checked")

    monkeypatch.setattr(cli, "LLMEngine", must_not_run)
    monkeypatch.setattr("engine.workload.make_requests", must_not_run)
    for flags in (["--context", "100000000", "--output", "2"], ["--output", "100000000"],
                  ["--requests", "100000000"], ["--kv-budget-mb", "1e12"]):
        assert cli.main(["run", "--model", "tiny", "--device", "cpu"] + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and flags[0] in err, err


def _memory_capped(limit_bytes: int):
    """A preexec_fn that caps the child's address space (a build of the prompt lists then fails
    with MemoryError instead of taking the machine's memory)."""
    def cap() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return cap


def test_huge_context_exits_2_inside_a_small_address_space() -> None:
    """`--context 100000000` once built the prompts first and used all 24 GB of the machine. Under
    a 3 GiB address-space cap that build raises MemoryError; refused first, it never happens."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "engine", "run", "--context", "100000000",
                           "--output", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=_memory_capped(3 << 30))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: --context 100000000 is past the model's maximum of 8192 tokens "
                           "(prompt + output)\n")


def test_run_and_serve_read_the_engine_flags_alike() -> None:
    """One list of engine flags (engine.cli_flags) behind both commands."""
    from engine.cli_flags import engine_config

    flags = ["--model", "tiny", "--device", "cpu", "--page-size", "4", "--kv-budget-mb", "2",
             "--max-batched-tokens", "64", "--no-cuda-graphs", "--seed", "3"]
    parser = cli.build_parser()
    ran = cli.configs(parser.parse_args(["run", *flags]))[0]
    served = engine_config(parser.parse_args(["serve", *flags]))
    shared = ("model", "device", "block_size", "kv_budget_bytes", "max_num_batched_tokens",
              "cuda_graphs", "seed")
    assert [getattr(ran, f) for f in shared] == [getattr(served, f) for f in shared] == [
        "tiny", "cpu", 4, 2 * 2**20, 64, False, 3]
