"""make_checkpoint.py: the starting weights are a pure function of (config, seed), bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import torch

EX = Path(__file__).resolve().parents[1] / "examples" / "mlperf_bert"
sys.path.insert(0, str(EX))
from make_checkpoint import make  # noqa: E402
from model import BertForMLPerfMLM, state_dict_sha256  # noqa: E402


def test_same_seed_same_bits_other_seed_differs():
    torch.manual_seed(123)  # global RNG state must not matter
    a = state_dict_sha256(make("tiny", 0))
    torch.rand(1000)
    b = state_dict_sha256(make("tiny", 0))
    c = state_dict_sha256(make("tiny", 1))
    assert a == b
    assert a != c


def test_init_statistics():
    m = make("tiny", 0)
    w = m.bert.encoder.layer[0].attention.self.query.weight
    assert abs(w.std().item() - 0.0176) < 0.002  # std of N(0, 0.02) truncated at 2 std
    assert w.abs().max().item() <= 0.04
    assert torch.all(m.bert.embeddings.LayerNorm.weight == 1)
    assert torch.all(m.bert.encoder.layer[0].attention.self.query.bias == 0)
    assert torch.all(m.bert.embeddings.word_embeddings.weight[0] == 0)  # [PAD] row
    # the decoder shares the word embeddings, as BERT ties them
    assert m.cls.predictions.decoder.weight.data_ptr() == m.bert.embeddings.word_embeddings.weight.data_ptr()


def test_script_checkpoint_reloads_bit_identical(tmp_path):
    out = tmp_path / "init"
    subprocess.run([sys.executable, str(EX / "make_checkpoint.py"), "--config", "tiny", "--seed", "0",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    info = json.loads((out / "init.json").read_text())
    want = state_dict_sha256(make("tiny", 0))
    assert info["state_dict_sha256"] == want  # another process, same bits
    loaded = BertForMLPerfMLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert state_dict_sha256(loaded) == want  # save/load round trip keeps every bit
