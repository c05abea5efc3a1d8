"""benchmarks/perf.py: FLOP counting (exact on known matmuls and attention), the matmul peak, the intervals, and
one reduced end-to-end run whose JSON and Markdown are checked row by row."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf.py"


@pytest.fixture(scope="module")
def perf():
    """The perf.py module, with one torch thread while these tests run: perf.py's OMP_WAIT_POLICY=PASSIVE cannot
    take effect in a process that started torch already, and two spinning OpenMP threads on a shared 2-core
    machine turn a 0.1 s step into seconds."""
    name = "dagman_benchmarks_perf"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PERF)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sys.modules[name]
    torch.set_num_threads(threads)


def test_flop_counter_counts_a_matmul_exactly_forward_and_backward(perf):
    m, k, n = 37, 19, 23
    a = torch.randn(m, k, requires_grad=True)
    b = torch.randn(k, n, requires_grad=True)
    assert perf.count_flops(lambda: torch.matmul(a, b))["total"] == 2 * m * n * k
    # backward: dA = dC B^T and dB = A^T dC, each another 2*M*N*K
    result = perf.count_flops(lambda: torch.matmul(a, b).sum().backward())
    assert result["total"] == 3 * 2 * m * n * k
    assert result["added"] == {} and result["attention_ops"] == []


def test_fused_window_attention_is_counted_forward_and_backward(perf):
    from dagman.models.attention import window_attention

    w, h, length, d = 3, 2, 8, 4
    q, k, v = (torch.randn(w, h, length, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, length, length, requires_grad=True)
    unit = w * h * length * length * d  # one (L x d) @ (d x L) matmul is 2 * unit FLOPs
    forward = perf.count_flops(lambda: window_attention(q, k, v, bias, d**-0.5))
    # torch itself has no formula for the CPU flash kernel: perf.py's added formula gives 4*W*H*L^2*d exactly
    assert forward["total"] == 4 * unit
    assert forward["uncounted_attention_ops"] == []
    assert sum(forward["added"].values()) == 4 * unit
    # the chunked backward is 5 plain matmuls (incl. recomputing Q K^T): 10 more units
    both = perf.count_flops(lambda: window_attention(q, k, v, bias, d**-0.5).sum().backward())
    assert both["total"] == 14 * unit
    # the SA block's plain SDPA on CPU: flash forward and flash backward, both through the added formulas
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    sdpa = perf.count_flops(lambda: F.scaled_dot_product_attention(qs, ks, vs).sum().backward())
    assert sdpa["total"] == 14 * unit and sdpa["uncounted_attention_ops"] == []


def test_counted_backbone_attention_equals_the_analytic_sum(perf):
    from dagman.models.swin import build_backbone

    arch = dict(embed_dim=12, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16), window_size=(4, 4, 4), patch_size=(2, 2, 2))
    model = build_backbone(in_chans=1, **arch)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        counted = perf.count_flops(lambda: model(x))
    analytic = perf.analytic_window_attention_flops(64, embed_dim=12, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16),
                                                    window=4, patch=2)
    # grids 32, 16, 8, 4 tokens; 64 tokens per window; d = 6 in every stage
    assert analytic == 4 * 64 * 64 * 6 * (1 * 2 * 512 + 1 * 4 * 64 + 2 * 8 * 8 + 1 * 16 * 1)
    assert sum(counted["added"].values()) == analytic


def test_matmul_peak_is_positive_and_from_the_sizes_given(perf):
    peak = perf.measure_matmul_peak(torch.device("cpu"), torch.float32, [64, 128], repeats=2)
    assert peak["gflops"] > 0 and math.isfinite(peak["gflops"])
    assert peak["size"] in (64, 128) and set(peak["per_size"]) == {64, 128}
    assert peak["gflops"] == pytest.approx(2 * peak["size"] ** 3 / peak["seconds"] / 1e9)


def test_bootstrap_intervals(perf):
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 1.02]
    lo, hi = perf.bootstrap_median_ci(values, resamples=500)
    assert min(values) <= lo <= statistics.median(values) <= hi <= max(values)
    assert (lo, hi) == perf.bootstrap_median_ci(values, resamples=500)  # seeded
    assert perf.bootstrap_median_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = perf.bootstrap_ratio_of_medians_ci([10.0, 12.0, 11.0], [2.0, 2.0, 2.0], resamples=500)
    assert 5.0 <= lo <= 5.5 <= hi <= 6.0


def test_help_explains_rows_and_targets(perf):
    text = perf.build_parser().format_help()
    for needle in ("(a) backbone", "(b) DAGMaN / SMIT", "(c) bf16", "(d) loader", "(e) paper-size", "(f) achieved",
                   "<= 0.8", "<= 1.15", ">= 5", "24 GiB", ">= 40%", "--quick", "--device cuda"):
        assert needle in text, needle


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_reduced_run_writes_a_consistent_table(perf, tmp_path, capsys):
    out = tmp_path / "perf-out"
    argv = ["--quick", "--threads", "1", "--out", str(out), "--backbone-size", "32", "--backbone-rounds", "2",
            "--step-rounds", "2",
            "--loader-seconds", "0.3", "--loader-repeats", "2", "--loader-volumes", "2",
            "--loader-shape", "64", "64", "64", "--matmul-sizes", "128", "256", "--matmul-repeats", "2",
            "--bootstrap", "200"]
    assert perf.main(argv) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "perf.json").read_text())
    md = (out / "perf.md").read_text()
    assert md in stdout and "| measurement | configuration |" in md and "machine: " in md

    rows = {r["id"]: r for r in report["rows"]}
    assert set(rows) == {
        "backbone_ours_vs_monai", "backbone_bf16_vs_fp32", "step_dagman_vs_smit_tiny", "loader_vs_step_tiny",
        "memory_ckpt_fp32", "matmul_peak_fp32", "matmul_peak_bf16", "flops_backbone_fp32", "flops_backbone_bf16",
        "flops_step_tiny"}
    assert report["threads"] == torch.get_num_threads() and report["torch"] == torch.__version__
    assert report["quick"] is True and report["command"].startswith("python benchmarks/perf.py --quick --threads 1")
    for row in report["rows"]:
        assert row["values"] and all(_finite_positive(v) for v in row["values"].values()), row["id"]
        assert row["measurement"] in md
        if row["ratio"] is not None:
            assert _finite_positive(row["ratio"])
        if row["interval"] is not None:
            lo, hi = row["interval"]
            assert lo <= row["ratio"] <= hi, row["id"]

    # per-round ratios: the figure is the median of num/den over the rounds, and matches the raw times
    for rid in ("backbone_ours_vs_monai", "backbone_bf16_vs_fp32", "step_dagman_vs_smit_tiny", "flops_backbone_fp32",
                "flops_step_tiny"):
        r = rows[rid]
        num, den = r["samples"]["numerator"], r["samples"]["denominator"]
        assert len(num) == len(den) == 2 == r["rounds"]
        assert r["ratio"] == pytest.approx(statistics.median(r["scale"] * a / b for a, b in zip(num, den)))
    times = report["raw"]["backbone"]["times"]
    assert 0 <= rows["backbone_ours_vs_monai"]["parity_max_abs_diff"] < 1e-4  # the same function, fp32
    assert rows["backbone_ours_vs_monai"]["samples"]["numerator"] == times["ours fp32"]
    assert rows["backbone_ours_vs_monai"]["samples"]["denominator"] == times["monai fp32"]
    assert rows["backbone_ours_vs_monai"]["values"]["ours_s"] == pytest.approx(statistics.median(times["ours fp32"]))
    step = report["raw"]["step"]["tiny"]
    assert rows["step_dagman_vs_smit_tiny"]["samples"]["numerator"] == step["times"]["dagman"]
    assert rows["step_dagman_vs_smit_tiny"]["pass"] == (rows["step_dagman_vs_smit_tiny"]["ratio"] <= 1.15)

    # (f) percentage = FLOPs / (time * peak), and the FLOP count includes the added CPU attention formula
    peak = rows["matmul_peak_fp32"]["values"]["gflops"]
    fb = rows["flops_backbone_fp32"]
    assert fb["ratio"] == pytest.approx(
        statistics.median(100 * fb["values"]["gflop_per_step"] / (t * peak) for t in times["ours fp32"]))
    assert fb["pass"] == (fb["ratio"] >= 40.0)
    flops = report["raw"]["backbone_flops"]
    assert sum(flops["ours"]["added"].values()) == flops["analytic_attention_forward"]
    # ours = MONAI's explicit count + the backward's recompute of Q K^T (half the forward attention FLOPs)
    assert flops["ours"]["total"] == flops["monai"]["total"] + flops["analytic_attention_forward"] // 2

    # (d) ratio of medians: loader pairs/s over batch / step time
    ld = rows["loader_vs_step_tiny"]
    assert ld["samples"]["denominator"] == pytest.approx([2 / t for t in step["times"]["dagman"]])
    assert ld["ratio"] == pytest.approx(
        statistics.median(ld["samples"]["numerator"]) / statistics.median(ld["samples"]["denominator"]))

    # (e) reduced by --quick: tiny preset, no target evaluated, both children ran
    mem = rows["memory_ckpt_fp32"]
    assert mem["pass"] is None and "REDUCED" in mem["configuration"]
    assert mem["ratio"] == pytest.approx(mem["values"]["ckpt_on_peak_gib"] / mem["values"]["ckpt_off_peak_gib"])
    assert [c["status"] for c in mem["children"]] == ["ok", "ok"]


def test_compile_row_and_a_compile_failure_row(perf, monkeypatch):
    """The torch.compile on/off row (on by default on CUDA) without compiling here: torch.compile replaced by
    the identity, then by a failure, which becomes a row that says so instead of stopping the run."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(perf.torch, "compile", lambda model: model)
    bb = perf.measure_backbone(cpu, 32, rounds=2, warmup=1, compile_model=True, progress=False)
    bb.pop("models")
    assert set(bb["times"]) == {"monai fp32", "ours fp32", "ours bf16", "ours fp32 compiled"}
    rows = {r["id"]: r for r in perf.backbone_rows(bb, 100)}
    row = rows["backbone_compile_vs_eager"]
    assert row["samples"]["numerator"] == bb["times"]["ours fp32 compiled"]
    assert row["samples"]["denominator"] == bb["times"]["ours fp32"] and row["ratio"] > 0

    def broken(model):
        raise RuntimeError("no compiler\nsecond line")

    monkeypatch.setattr(perf.torch, "compile", broken)
    bb = perf.measure_backbone(cpu, 32, rounds=1, warmup=0, compile_model=True, progress=False)
    bb.pop("models")
    assert "ours fp32 compiled" not in bb["times"] and bb["compile_error"] == "RuntimeError: no compiler"
    row = {r["id"]: r for r in perf.backbone_rows(bb, 100)}["backbone_compile_vs_eager"]
    assert row["ratio"] is None and row["values_text"] == "torch.compile failed: RuntimeError: no compiler"


def test_step_profile_counts_one_host_sync_per_train_step_and_its_phases_add_up():
    """benchmarks/step_profile.py: a pretraining step reads the device once (the finiteness flags and all
    metrics together), and the phase table's parts sum to the whole step."""
    name = "dagman_benchmarks_step_profile"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PERF.parent / "step_profile.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sp = sys.modules[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sp.host_syncs("tiny", "fp32") == 1
        rows = sp.phase_table("tiny", "fp32", steps=1, warmup=1)
    finally:
        torch.set_num_threads(threads)
    table = {p: ms for p, ms, _ in rows}
    assert set(table) == set(sp.PHASES) | {"backward + the rest", "whole step"}
    assert math.isclose(sum(ms for p, ms in table.items() if p != "whole step"), table["whole step"], rel_tol=1e-9)
    assert table["teacher forward"] > 0 and table["student forward"] > 0 and table["optimiser step"] > 0


def test_baseline_row_times_two_source_trees_in_the_same_rounds(perf, tmp_path):
    """Row (g): HEAD's src exported twice, as 'this checkout' and as the 'baseline' (a working tree with
    uncommitted changes would differ from HEAD), each in its own worker process on its own package; the same
    code and seed give the same losses step by step, and the row is their ratio."""
    import inspect

    assert inspect.signature(perf.measure_against_baseline).parameters["current_src"].default == perf.REPO / "src"
    commit = perf.export_source("HEAD", tmp_path / "a")
    assert perf.export_source("HEAD", tmp_path / "b") == commit
    assert len(commit) == 40 and (tmp_path / "a" / "src" / "dagman" / "__init__.py").is_file()
    res = perf.measure_against_baseline("tiny", tmp_path / "b" / "src", rounds=2, warmup=0, threads=1,
                                        current_src=tmp_path / "a" / "src")
    assert Path(res["info"]["baseline"]["package"]).resolve() == (tmp_path / "b" / "src" / "dagman").resolve()
    assert Path(res["info"]["current"]["package"]).resolve() == (tmp_path / "a" / "src" / "dagman").resolve()
    assert len(res["times"]["current"]) == len(res["times"]["baseline"]) == 2
    losses = res["losses"]
    assert len(losses["current"]) == 2 and losses["current"] == losses["baseline"]
    row = perf.baseline_row(res, commit, resamples=200)
    assert row["id"] == "step_vs_baseline_tiny" and row["target"] == "<= 0.5"
    ratios = [a / b for a, b in zip(res["times"]["current"], res["times"]["baseline"])]
    assert row["ratio"] == pytest.approx(statistics.median(ratios))
    assert commit[:7] in row["measurement"]


def test_baseline_commit_that_git_does_not_know_exits_2_with_one_line(perf, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        perf.export_source("no-such-commit-xyz", tmp_path)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-commit-xyz" in err[0]
