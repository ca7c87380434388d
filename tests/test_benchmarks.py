"""The benchmarks' plumbing on the CPU (their --dry-run: tiny models, kernels under the interpreter,
timings meaningless): every run completes, the hf_flash rows prove their kernel ran, and the
results files hold what the README's tables are built from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_bench_models_dry_run_with_packed_and_profile(tmp_path):
    _run(["benchmarks/bench_models.py", "--dry-run", "--impls", "sdpa,hf_flash", "--patch-kwargs",
          '{"packed": true}', "--profile"], tmp_path)
    doc = json.loads(next(tmp_path.rglob("models_dry-run.json")).read_text())
    # GPT-2 has no packed mode: its options run is n/a, with the reason, and the exit status 0.
    gpt2 = {r["impl"]: r for r in doc["rows"] if r["model"] == "gpt2_tiny_lm"}
    assert gpt2["hf_flash+opts"]["status"] == "n/a"
    assert "packed=True is not available for gpt2" in gpt2["hf_flash+opts"]["reason"]
    assert gpt2["hf_flash"]["status"] == "ok"
    rows = {r["impl"]: r for r in doc["rows"] if r["model"] == "bert_tiny_mlm"}
    assert set(rows) == {"sdpa", "hf_flash", "hf_flash+opts"}
    assert all(r["status"] == "ok" and r["model"] == "bert_tiny_mlm" for r in rows.values())
    assert rows["sdpa"]["sdpa_calls"] > 0 and rows["sdpa"]["hf_flash_calls"] == 0
    assert rows["hf_flash"]["hf_flash_calls"] > 0 and rows["hf_flash+opts"]["hf_flash_calls"] > 0
    assert "packed=True" in rows["hf_flash+opts"]["how"]
    # Same weights and batch, eval mode: the losses agree.
    assert abs(rows["hf_flash"]["eval_loss"] - rows["sdpa"]["eval_loss"]) < 1e-4
    assert abs(rows["hf_flash+opts"]["eval_loss"] - rows["sdpa"]["eval_loss"]) < 1e-4
    assert all(r["host_ms"] > 0 for r in rows.values())  # --profile ran (no GPU kernel time here)
    assert {f"bert_tiny_mlm {i}" for i in rows} <= set(doc["profiles"])
    assert {"top_kernels", "gpu_idle"} <= set(doc["profiles"]["bert_tiny_mlm sdpa"])
    # The results folder (an absolute path here) is not written into the results.
    assert doc["meta"]["args"]["out"] == "OUT" and "--out OUT" in doc["meta"]["command"]


def test_bench_models_dry_run_compiled(tmp_path):
    _run(["benchmarks/bench_models.py", "--dry-run", "--models", "bert", "--impls",
          "sdpa,hf_flash", "--compile", "--patch-kwargs", '{"packed": true}', "--flattened"],
         tmp_path)
    doc = json.loads(next(tmp_path.rglob("models_dry-run_compiled.json")).read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert all(r["status"] == "ok" and r["compiled"] for r in rows.values())
    # The compiled training step itself called the kernel (through the custom op).
    # Through the custom op only: no layer fell back to the eager autograd Function.
    assert rows["hf_flash"]["compiled_hf_flash_calls"] > 0
    assert rows["hf_flash"]["compiled_eager_hf_flash_calls"] == 0
    assert rows["sdpa"]["compiled_hf_flash_calls"] == 0
    # The packed encoder, compiled, packs (the option it needs is set and recorded).
    assert rows["hf_flash+opts"]["compiled_hf_flash_calls"] > 0
    assert rows["hf_flash+opts"]["compiled_packings"] > 0 == rows["hf_flash"]["compiled_packings"]
    # The padding-free batch: the same tokens, so the same eval loss; compiled through the op.
    flat = rows["hf_flash+flat"]
    assert flat["compiled_hf_flash_calls"] > 0 and flat["compiled_eager_hf_flash_calls"] == 0
    assert abs(flat["eval_loss"] - rows["sdpa"]["eval_loss"]) < 1e-4
    assert doc["meta"]["timing"]["capture_dynamic_output_shape_ops"] is True
    assert doc["meta"]["timing"]["compiled"] == "torch.compile, aot_eager"
    assert all(r["host_ms"] > 0 and r["warmup_s"] > 0 for r in rows.values())


def test_bench_ops_dry_run_checks_against_pytorch(tmp_path):
    out = _run(["benchmarks/bench_ops.py", "--dry-run", "--host-profile", "1"], tmp_path)
    doc = json.loads(next(tmp_path.rglob("ops_dry-run.json")).read_text())
    rows = doc["rows"]
    cases = {r["case"] for r in rows}
    assert {"tiny", "tiny_causal", "tiny_pad_drop"} <= cases
    ours = [r for r in rows if r["backend"] == "hf_flash"]
    assert ours and all(r["status"] == "ok" for r in ours)
    # The padded case also ran on its real tokens packed (flash_attention_varlen), every mode.
    packed = [r for r in rows if r["backend"] == "hf_flash_packed"]
    assert {(r["case"], r["status"]) for r in packed} == {("tiny_pad_drop", "ok")}
    assert len(packed) == 3
    # ...and the spot check compared its output with the padded call's on the real tokens.
    assert [c["case"] for c in doc["checks"] if "packed_out_vs_padded" in c] == ["tiny_pad_drop"]
    assert all(r["dtype"] == "fp16" for r in rows)  # what ran: the interpreter's bf16 is broken
    # The spot check against PyTorch ran for every case and passed.
    assert {r["case"] for r in ours if r.get("check") == "ok"} == cases
    assert "0 not ok" in out
    # The host time to queue a call is recorded and tabled; --host-profile printed a profile.
    assert all(r["host_ms"] > 0 for r in rows if r["mode"] != "bwd" and r["status"] == "ok")
    assert "host ms to queue one call" in out
    assert re.search(r"host profile, tiny, hf_flash fwd\+bwd x1:\n +ncalls +tottime", out)


def test_bench_ops_sweep_variants():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_ops
    finally:
        sys.path.pop(0)
    (c,) = bench_ops.sweep_cases([1024], [64], ["causal_dropout"])
    assert (c.name, c.causal, c.padded, c.dropout) == ("d64_causal_dropout_n1024", True, False,
                                                       bench_ops.DROPOUT)
    # A misspelt variant is refused, not run as a plain case under its name.
    r = subprocess.run([sys.executable, "benchmarks/bench_ops.py", "--suite", "sweep",
                        "--variants", "causal,causal-dropout"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown sweep variant(s) causal-dropout" in r.stderr


def test_sweep_configs_reads_its_configs_and_refuses_what_it_cannot_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sweep_configs
    finally:
        sys.path.pop(0)
    assert sweep_configs.parse_configs("128,64,8,3; 64,64,4,2,128;") == [
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": 128}]
    with pytest.raises(SystemExit, match="'128,64,8' is not BLOCK_M,BLOCK_N,warps,stages"):
        sweep_configs.parse_configs("128,64,8")
    # A config's rounds: their median, and how far apart they are (a host-bound call's rounds
    # wander: BERT's forward read 0.112, 0.142 and 0.173 ms for one config on one host).
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    row, line = sweep_configs.result_row("bert", "fwd", cfg, [0.112, 0.142, 0.173], 3e-3)
    assert row["ms_median"] == 0.142 and abs(row["spread"] - (0.173 / 0.112 - 1)) < 1e-12
    assert line == ["bert", "64x64 w4 s3", "0.142", "0.112 0.142 0.173", "54 %", "3.0e-03"]
    steady, _ = sweep_configs.result_row("gpt2", "fwd", cfg, [0.125, 0.126, 0.126], 0.0)
    assert sweep_configs.unsteady([row, steady]) == ["bert"]
    # --timer kernel: the swept kernel's GPU time per launch, from the profiler's averages (us);
    # the other kernels of the call, and host-side ranges, are not counted.
    cuda, cpu = SimpleNamespace(name="CUDA"), SimpleNamespace(name="CPU")
    events = [SimpleNamespace(key="_fwd_kernel", device_type=cuda, count=4,
                              self_device_time_total=500.0),
              SimpleNamespace(key="_bwd_dq_kernel", device_type=cuda, count=4,
                              self_device_time_total=900.0),
              SimpleNamespace(key="_fwd_kernel", device_type=cpu, count=4,
                              self_device_time_total=0.0)]
    assert sweep_configs.kernel_ms(events, "_fwd_kernel") == 0.125
    with pytest.raises(RuntimeError, match=r"no GPU kernel named _bwd_dkdv_kernel .*'_bwd_dq_kernel'"):
        sweep_configs.kernel_ms(events, "_bwd_dkdv_kernel")
    base = [sys.executable, "benchmarks/sweep_configs.py", "--kernel", "dkdv"]
    r = subprocess.run(base + ["--cases", "gpt2,gpt3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "unknown case(s) ['gpt3']" in r.stderr
    if not HAS_CUDA:  # it times GPU kernels, and says so rather than timing the interpreter
        r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "no CUDA device here" in r.stderr


def test_tuner_repeat_counts_each_kernels_picks_over_the_trials():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import tuner_repeat
    finally:
        sys.path.pop(0)
    trials = [dict(picks={"fwd": "128x64 w8 s3", "dq": "64x64 w4 s2", "dkdv": "32x64 w4 s2"}, ms=0.50),
              dict(picks={"fwd": "128x64 w4 s3", "dq": "64x64 w4 s2", "dkdv": "32x64 w4 s2"}, ms=0.47),
              dict(picks={"fwd": "128x64 w8 s3", "dq": "64x64 w4 s2", "dkdv": "32x64 w4 s2"}, ms=0.49)]
    row = tuner_repeat.summary_row("gpt2", (3, 1), trials)
    assert (row["tune_rounds"], row["min_runs"]) == (3, 1)
    assert (row["ms_median"], row["ms_min"], row["ms_max"]) == (0.49, 0.47, 0.50)
    assert row["fwd_picks"] == "128x64 w8 s3 x2; 128x64 w4 s3 x1" and row["fwd_distinct"] == 2
    assert row["dq_picks"] == "64x64 w4 s2 x3" and row["dkdv_distinct"] == 1
    assert tuner_repeat.parse_settings("1:1, 3:8,") == [(1, 1), (3, 8)]
    with pytest.raises(SystemExit, match="'3' is not ROUNDS:MIN_RUNS"):
        tuner_repeat.parse_settings("3")
    r = subprocess.run([sys.executable, "benchmarks/tuner_repeat.py", "--cases", "gpt3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "unknown case(s) ['gpt3']" in r.stderr


def test_bench_first_call_dry_run_runs_each_mode_in_its_own_process(tmp_path):
    out = _run(["benchmarks/bench_first_call.py", "--dry-run"], tmp_path)
    rows = json.loads(next(tmp_path.rglob("first_call_dry-run.json")).read_text())["rows"]
    assert [r["mode"] for r in rows] == ["tuned-threads", "tuned-serial", "heuristic"]
    assert all("error" not in r and r["first_train_call_s"] > 0 < r["first_eval_call_s"] for r in rows)
    assert rows[1]["compile_threads"] == 1  # the mode's environment reached its process
    assert "results in" in out


def test_profile_decode_dry_run_profiles_both_levels_and_backends(tmp_path):
    out = _run(["benchmarks/profile_decode.py", "--dry-run"], tmp_path)
    doc = json.loads(next(tmp_path.rglob("decode_dry-run.json")).read_text())
    got = {(r["level"], r["backend"]) for r in doc["rows"]}
    backends = ("sdpa", "hf_flash", "hf_flash_unfolded")
    assert got == {(lvl, b) for lvl in ("op", "model") for b in backends}
    assert all(r["host_us_per_call"] > 0 for r in doc["rows"] if r["level"] == "op")
    assert all(r["ms_per_step"] >= r["host_ms_per_step"] > 0 for r in doc["rows"] if r["level"] == "model")
    # Each backend's steps at first-met cache lengths and again at the same ones.
    visits = [(r["backend"], r["lengths"]) for r in doc["rows"] if r["level"] == "model"]
    assert visits == [(b, f"{v} visit") for b in backends for v in ("first", "again")]
    # The hf_flash decode steps ran the kernel (its no-grad path, named in profiles), the sdpa
    # ones did not.
    from hf_flash.kernels._op import NO_GRAD_EVENT
    ops = {b: {t["op"] for t in tops} for b, tops in doc["top_host_ops"].items()}
    for v in ("first", "again"):
        assert NO_GRAD_EVENT in ops[f"hf_flash, {v} visit"]
        assert NO_GRAD_EVENT in ops[f"hf_flash_unfolded, {v} visit"]
        assert NO_GRAD_EVENT not in ops[f"sdpa, {v} visit"]
    # The GPU kernels by name for every profiled stretch (none on the CPU).
    assert set(doc["gpu_kernels"]) == {f"{b}, {w}" for b in backends
                                       for w in ("op", "first visit", "again visit")}
    assert all(v == [] for v in doc["gpu_kernels"].values())
    assert "results in" in out


@pytest.mark.parametrize("case,line,fn", [
    ("--decode", "hf_flash decode layer call:", "hf_flash_attention"),
    (None, "flash_attention fwd+bwd:", "attention_backward")])
def test_profile_host_with_the_launch_stubbed_runs_the_real_call_path(case, line, fn):
    # The stub stands in for the direct launch path with launch()'s own signature: if either
    # drifts, this run fails (every first call goes through it). The profile shows the repeated
    # calls went through hf_flash's own code (the figures mean nothing here).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "benchmarks/profile_host.py", "--stub-launch", "--profile"]
    r = subprocess.run(cmd + ([case] if case else []), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert line in r.stdout
    assert fn in r.stdout and "attention_forward" in r.stdout, r.stdout[-3000:]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, ws_repro.py itself is the check")
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("ws", [False, True])
def test_ws_repro_kernel_is_exact_under_the_interpreter(ws, tma):
    # ws_repro.py blames Triton for the warp-specialised rows it finds wrong on a GPU; that holds
    # only if its kernel is right: here, where warp specialisation does not apply, it must be.
    import importlib.util
    import math

    import torch
    import triton
    spec = importlib.util.spec_from_file_location("ws_repro", ROOT / "benchmarks" / "ws_repro.py")
    ws_repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws_repro)
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    g = torch.Generator().manual_seed(7)
    bh, n, d = 2, 64, 16
    q, k, v = (torch.randn(bh, n, d, generator=g).half() for _ in range(3))
    o = torch.full_like(q, float("nan"))
    ws_repro._attn_fwd[(n // 32, bh)](q, k, v, o, n, 1 / math.sqrt(d) * 1.4426950408889634, D=d,
                                      BLOCK_M=32, BLOCK_N=32, WS=ws, TMA=tma)
    ref = torch.softmax(q.float() @ k.float().transpose(1, 2) / math.sqrt(d), -1) @ v.float()
    assert torch.isfinite(o).all()
    assert ((o.float() - ref).norm() / ref.norm()).item() < 1e-3  # fp16 output: ~2.5e-4


def _gluon_probe_compiles_for_sm90(script, n_lines, extra=()):
    # A probe that waits for a GPU call must, until then and after every Triton upgrade, still
    # build (Gluon renames things between releases) and keep its tiles in registers.
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pytest.skip("Triton without Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU
    r = subprocess.run([sys.executable, script, "--compile-only"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("D")]
    assert len(lines) == n_lines and not any("does not compile" in ln for ln in lines), r.stdout
    for ln in lines:  # "registers / stack (168, 0)", or None without cuobjdump
        stack = re.search(r"registers / stack \(\d+, (\d+)\)", ln)
        assert stack is None or stack.group(1) == "0", ln
        for want in extra:
            assert want in ln, ln


def test_gluon_bwd_probe_compiles_for_sm90():
    _gluon_probe_compiles_for_sm90("benchmarks/gluon_bwd_probe.py", 4)


def test_gluon_fused_bwd_probe_compiles_for_sm90():
    try:
        from triton.experimental.gluon.language.nvidia.hopper import tma
    except ImportError:
        pytest.skip("Triton without Gluon")
    if not hasattr(tma, "async_atomic_add"):
        pytest.skip("this Triton's Gluon has no TMA reduction (tma.async_atomic_add)")
    # dQ's sum must go out as a bulk TMA reduction, not element atomics.
    _gluon_probe_compiles_for_sm90("benchmarks/gluon_fused_bwd_probe.py", 2,
                                   extra=("bulk reduce True",))


def test_idle_gaps_finds_the_gpus_waits_between_kernels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import benchlib
    # Three kernels with waits of 5 and 20 us, one kernel inside another's interval (a second
    # stream): the union of intervals counts, and each wait names its neighbours.
    kernels = [(30, 40, "c"), (0, 10, "a"), (15, 25, "b"), (16, 20, "inner"), (60, 61, "d")]
    got = benchlib.idle_gaps(kernels, top_n=2)
    assert got["span_ms"] == 0.061 and got["idle_ms"] == 0.030
    assert got["gaps"] == [dict(ms=0.02, after="c", before="d"),
                           dict(ms=0.005, after="a", before="b")]
    assert benchlib.idle_gaps([]) == {"span_ms": 0.0, "idle_ms": 0.0, "gaps": []}
