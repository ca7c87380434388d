"""Write the fixed starting checkpoint of the MLPerf-style run: a seeded BERT initialisation.

    python examples/mlperf_bert/make_checkpoint.py --config large --seed 0 --out runs/mlperf_bert/init-large-seed0

Every backend starts from these weights. They are regenerable bit-for-bit from (config, seed): the
init draws every tensor from one seeded generator in sorted-name order (see model.seeded_init_), and
the sha256 of the state dict is printed and stored in init.json so two machines can compare.
MLPerf starts from a partly trained checkpoint; none is available offline here, so the run starts from
this initialisation and the target accuracy is calibrated to it (see README.md).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import BertForMLPerfMLM, bert_config, seeded_init_, state_dict_sha256  # noqa: E402

CONFIG = "large"
SEED = 0


def make(config, seed, vocab_size=30522, pad_id=0):
    # The global seed only makes the throw-away default init quiet and repeatable; every weight is
    # then overwritten by seeded_init_.
    torch.manual_seed(seed)
    model = BertForMLPerfMLM(bert_config(config, vocab_size=vocab_size, pad_id=pad_id))
    return seeded_init_(model, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG, choices=["large", "tiny"])
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = make(args.config, args.seed, args.vocab_size)
    digest = state_dict_sha256(model)
    out = Path(args.out)
    model.save_pretrained(out)
    info = {"config": args.config, "seed": args.seed, "state_dict_sha256": digest,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "transformers": transformers.__version__}
    (out / "init.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
