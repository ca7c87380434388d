"""MLPerf-style BERT masked-LM time-to-accuracy run: train from a fixed checkpoint until the masked-LM
accuracy on a fixed eval set reaches a target, and log how long that took.

One GPU (the commands run_gpu.sh issues; data from prepare_data.py, init from make_checkpoint.py):

    python examples/mlperf_bert/train.py --data .carry/mlperf_bert/data \
        --init runs/mlperf_bert/init-large-seed0 --attn sdpa --target 0.40 --seed 1 \
        --out runs/mlperf_bert/sdpa-t0.40-seed1 --time_limit 540 --resume

Several GPUs (DDP; the global batch grows with the number of processes):

    torchrun --nproc_per_node=2 examples/mlperf_bert/train.py <same arguments>

CPU smoke run (tiny model, gloo backend; what tests/test_mlperf_train.py runs):

    torchrun --nproc_per_node=2 examples/mlperf_bert/train.py --tiny --data DIR --init DIR \
        --attn eager --target 0.10 --out DIR

What is timed. `time_to_target_s` is MLPerf's quantity: wall time from the start of training (after
the model, data and optimizer are set up, and after an untimed kernel warm-up on random tokens, as
MLPerf's initialization allows; --no_warm_kernels skips it) to the end of the evaluation that first reaches the target,
evaluation included, checkpoint saving excluded; a resumed run adds its segments (each pays its own
warm-up again; `segments` says how many there were). `train_time_to_target_s` is the same without the
evaluations. The target is checked only at evaluations, every --eval_every samples, as in MLPerf.

Outputs in --out: curve.jsonl (one JSON object a line: `run` header, `log` every --log_every steps,
`eval` per evaluation, `result` at the end), result.json, and Trainer checkpoints for --resume.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.time()  # --time_limit counts from here: a job's time limit covers start-up

import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lamb import Lamb, lamb_param_groups, warmup_poly_schedule  # noqa: E402
from model import BertForMLPerfMLM  # noqa: E402

# ---- settings: BERT-large on one H100 (the CLI overrides each) -------------------------------------
ATTN = "sdpa"
PER_DEVICE_BATCH = 32       # samples per GPU per step; the global batch is this x processes x GRAD_ACCUM
GRAD_ACCUM = 1
EVAL_BATCH = 64
LR = 5e-4                   # LAMB peak learning rate, for the run from the warm-up's checkpoint. On
                            # BERT-large (H200, 2026-12-01) 3e-3 undid the warm-up: accuracy 0.110 at
                            # lr 1.3e-3, then back to the unigram plateau (0.048) by lr 3e-3, flat
                            # from step 512 to the end (2432). 5e-4 is where the warm-up was still
                            # climbing; batch 32 at 512 tokens carries ~2000 predictions a step, as
                            # the warm-up's batch 128 at 128 tokens did.
WARMUP_STEPS = 100          # short: the weights are warm, only LAMB's moments start from zero
DECAY_STEPS = 12000         # polynomial decay horizon (= max steps): far past the target, so the lr is
                            # nearly flat over the timed window and identical for every backend
POLY_POWER = 1.0            # MLPerf BERT
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-6
MAX_GRAD_NORM = 1.0         # global-norm clipping before LAMB, as MLPerf's BERT
EVAL_EVERY = 4096           # samples between evaluations of the full fixed eval set: ~20 s of
                            # BERT-large training on an H100 (an estimate), which bounds how finely
                            # time-to-target is resolved; one evaluation (1168 samples) costs a few s
LOG_EVERY = 50              # steps between loss logs
PAD_TO_MULTIPLE = 8         # pad each batch to its longest sample, rounded up for tensor cores
TIME_CHECK_EVERY = 10       # steps between (all-reduced) --time_limit checks
METRIC_DIR = HERE / "mlm_accuracy"

# --tiny: CPU tests. Only what differs from the above.
TINY = dict(per_device_batch=8, eval_batch=16, lr=5e-3, warmup_steps=10, decay_steps=400,
            eval_every=64, log_every=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder written by prepare_data.py")
    p.add_argument("--init", required=True, help="checkpoint folder written by make_checkpoint.py")
    p.add_argument("--out", required=True)
    p.add_argument("--attn", default=ATTN,
                   choices=["eager", "sdpa", "hf_flash", "hf_flash_packed", "hf_flash_flat"],
                   help="hf_flash_packed: patch(model, packed=True), the encoder on real tokens only "
                        "(what NVIDIA's MLPerf BERT does by unpadding); hf_flash_flat: padding-free "
                        "batches, each batch's samples in one row with their boundaries "
                        "(cu_seq_lens), so that no layer, embeddings and MLM head included, sees "
                        "padding")
    p.add_argument("--target", type=float, required=True, help="masked-LM accuracy to stop at")
    p.add_argument("--seed", type=int, default=1, help="data order and dropout (the init is fixed)")
    p.add_argument("--tiny", action="store_true", help="CPU-test defaults (use a tiny --init)")
    p.add_argument("--per_device_batch", type=int)
    p.add_argument("--grad_accum", type=int, default=GRAD_ACCUM)
    p.add_argument("--eval_batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup_steps", type=int)
    p.add_argument("--decay_steps", type=int)
    p.add_argument("--eval_every", type=int, help="samples between evaluations")
    p.add_argument("--log_every", type=int)
    p.add_argument("--time_limit", type=float, default=None,
                   help="seconds since process start after which to checkpoint and exit (resume later)")
    p.add_argument("--on_time_limit", choices=["save", "stop"], default="save",
                   help="save: checkpoint for --resume; stop: just end (a calibration run)")
    p.add_argument("--time_check_every", type=int, default=TIME_CHECK_EVERY,
                   help="steps between --time_limit checks (each is an all-reduce under DDP)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out if there is one")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers (default 2 on GPU)")
    p.add_argument("--no_bf16", action="store_true", help="fp32 on GPU")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="crop every sample (train and eval) to this many tokens, [SEP] kept last: "
                        "the short-sequence first phase of BERT's and MLPerf's recipe")
    p.add_argument("--save_final", default=None,
                   help="when the run ends, save the model there as a starting checkpoint (with "
                        "init.json: its sha256, this run's settings and the checkpoint it came from)")
    p.add_argument("--no_warm_kernels", action="store_true",
                   help="skip the untimed kernel warm-up on random tokens before the clock starts "
                        "(then the first steps' compiling and tuning count in time-to-target)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the BERT body (embeddings and encoder; inductor on a GPU, "
                        "aot_eager on the CPU), as one graph with dynamic shapes; the kernel "
                        "warm-up compiles it before the clock. With --attn hf_flash_packed the "
                        "packing is traced too (an unbacked count of real tokens)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels where PyTorch has them (a warm-up meant to be "
                        "regenerable); warns where it has none")
    args = p.parse_args(argv)
    if args.max_seq_len is not None and args.max_seq_len < 3:
        p.error("--max_seq_len must be >= 3 ([CLS], one token, [SEP])")
    base = dict(per_device_batch=PER_DEVICE_BATCH, eval_batch=EVAL_BATCH, lr=LR,
                warmup_steps=WARMUP_STEPS, decay_steps=DECAY_STEPS, eval_every=EVAL_EVERY,
                log_every=LOG_EVERY)
    if args.tiny:
        base.update(TINY)
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ---- data -------------------------------------------------------------------------------------------
class MaskedLMShard(torch.utils.data.Dataset):
    """One split written by prepare_data.py: ragged token ids and masked positions/labels in memory."""

    def __init__(self, path, max_seq_len=None, sep_id=None):
        with np.load(path) as z:
            self.ids, self.offsets = z["input_ids"], z["offsets"]
            self.pos, self.lab, self.pred_offsets = z["mlm_positions"], z["mlm_labels"], z["mlm_offsets"]
        if max_seq_len is not None and sep_id is None:
            raise ValueError("cropping samples needs the [SEP] id")
        self.max_seq_len, self.sep_id = max_seq_len, sep_id

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        c, d = self.pred_offsets[i], self.pred_offsets[i + 1]
        ids, pos, lab = self.ids[a:b], self.pos[c:d], self.lab[c:d]
        L = self.max_seq_len
        if L is not None and len(ids) > L:
            # The first L - 1 tokens, then [SEP]; predictions at the positions that remain. The
            # masking was drawn once for the full sample, so the crop keeps its 15 % rate.
            ids = np.concatenate([ids[:L - 1], np.array([self.sep_id], dtype=ids.dtype)])
            keep = pos < L - 1
            pos, lab = pos[keep], lab[keep]
        return {"input_ids": ids, "positions": pos, "labels": lab}

    def lengths(self):
        n = np.diff(self.offsets)
        return n if self.max_seq_len is None else np.minimum(n, self.max_seq_len)


class Collator:
    """Pads a batch to its longest sample (rounded up to PAD_TO_MULTIPLE): real padding, marked in
    attention_mask, which is what a backend that skips padded tiles can exploit. Prediction slots are
    as many as the batch's largest count (empty ones: position 0, label -100), so the vocabulary
    projection is not run on slots that hold nothing; the Trainer pads eval outputs of different
    widths with -100 when it concatenates them. With `flat_max_length`, the padded batch is handed
    over padding-free instead (to_padding_free)."""

    def __init__(self, pad_id, pad_to_multiple=PAD_TO_MULTIPLE, flat_max_length=None):
        self.pad_id, self.multiple, self.flat_max_length = pad_id, pad_to_multiple, flat_max_length

    def __call__(self, samples):
        longest = max(len(s["input_ids"]) for s in samples)
        width = -(-longest // self.multiple) * self.multiple
        slots = max(len(s["positions"]) for s in samples)
        n = len(samples)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, slots), dtype=torch.long)
        labels = torch.full((n, slots), -100, dtype=torch.long)
        for i, s in enumerate(samples):
            k, m = len(s["input_ids"]), len(s["positions"])
            input_ids[i, :k] = torch.from_numpy(s["input_ids"].astype(np.int64))
            attention_mask[i, :k] = 1
            positions[i, :m] = torch.from_numpy(s["positions"].astype(np.int64))
            labels[i, :m] = torch.from_numpy(s["labels"].astype(np.int64))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "masked_lm_positions": positions, "masked_lm_labels": labels}
        if self.flat_max_length is not None:
            return to_padding_free(batch, self.flat_max_length)
        return batch


def to_padding_free(batch, max_length):
    """A right-padded batch's real tokens in one row (1, T), in the form transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives: positions restart at 0 for
    every sample, cu_seq_lens_q/k (int32, B + 1) hold the samples' boundaries, no attention mask.
    The masked positions move with their samples into the row (empty slots point at their sample's
    first token, label -100). max_length_q/k is `max_length`, a bound on a sample's length that is
    the same for every batch (the kernels size their grids by it; a compiled graph keeps it)."""
    keep = batch["attention_mask"].bool()
    starts = torch.nn.functional.pad(keep.sum(1).cumsum(0), (1, 0))
    cu = starts.to(torch.int32)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return {"input_ids": batch["input_ids"][keep][None], "position_ids": positions[keep][None],
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_length,
            "max_length_k": max_length,
            "masked_lm_positions": batch["masked_lm_positions"] + starts[:-1, None],
            "masked_lm_labels": batch["masked_lm_labels"]}


# ---- model ------------------------------------------------------------------------------------------
def load_model(init_dir, attn):
    """The fixed checkpoint with the requested attention backend. Returns (model, how)."""
    kw = dict(dtype=torch.float32)
    if not attn.startswith("hf_flash"):
        return BertForMLPerfMLM.from_pretrained(init_dir, attn_implementation=attn, **kw), attn
    import hf_flash

    model = BertForMLPerfMLM.from_pretrained(init_dir, attn_implementation="eager", **kw)
    # fallback="raise": a call the kernel cannot serve must fail, not run eager inside a timed run.
    packed = attn == "hf_flash_packed"
    hf_flash.patch(model, fallback="raise", packed=packed)
    how = f"hf_flash.patch(fallback=raise{', packed=True' if packed else ''})"
    return model, how + (", padding-free batches" if attn == "hf_flash_flat" else "")


def compile_body(model, attn, cuda):
    """torch.compile `model.bert` in place (its parameters keep their names, so checkpoints do
    not change); the masked-LM head and the sample and token counts stay eager around it.
    fullgraph: a graph break would quietly leave part of the body uncompiled. dynamic: the
    collator pads each batch to its own longest sample, and packed batches hold other counts of
    real tokens, so one graph serves them all rather than a recompile inside the clock."""
    if attn == "hf_flash_packed":
        # The packing's count of rows is data-dependent: traced only with this option (without
        # it hf_flash runs the compiled encoder padded).
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    # The Trainer turns the config's use_cache off for training, and the graph guards on it: off
    # from the start, so the warm-up's graphs are the ones the timed steps run (no cache here).
    model.config.use_cache = False
    model.bert.compile(backend="inductor" if cuda else "aot_eager", fullgraph=True, dynamic=True)


def compiled_graphs():
    """How many graphs dynamo has compiled in this process (0 without --compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def attention_paths(model):
    """hf_flash's own account of each attention layer (path, mask form, last call), if it gives one."""
    try:
        import hf_flash
    except ImportError:
        return None
    if not hasattr(hf_flash, "explain"):
        return None
    import io

    rows = hf_flash.explain(model, file=io.StringIO())
    return json.loads(json.dumps(rows, default=str))


def warm_kernels(model, device, bf16, train_shape, eval_shape, slots, vocab_size,
                 flat_max_length=None):
    """Compile and tune what the first steps would, on random tokens, before the clock starts.

    MLPerf's clock starts at run_start, after initialization, which may compile and tune on
    synthetic data. Without this the first 128 steps of an hf_flash run (H200, 2026-12-01) took
    51.5 s against sdpa's 18.1 s: Triton compiling and timing every tuning candidate of each
    kernel, once per machine; the steps after that ran at sdpa's pace. Every backend gets the same
    warm-up: one forward and backward at the training shape (B, N) and one evaluation-mode forward at
    the eval shape, with key padding as real batches have it. Nothing is learned (no optimizer step,
    gradients dropped) and the RNG states are put back (the Trainer also reseeds when it starts), so
    the timed run is the one it would have been without it: tests/test_mlperf_train.py compares the
    curves. With `flat_max_length` the batches go padding-free, as the collator hands them over.
    Returns its seconds."""
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(12345)  # its own generator: the global RNG stays untouched
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None

    def batch(n, width):
        lengths = torch.randint(width // 2, width + 1, (n,), generator=gen)
        lengths[0] = width  # the collator pads to the longest sample
        b = {"input_ids": torch.randint(vocab_size, (n, width), generator=gen),
             "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
             "masked_lm_positions": torch.randint(1, width // 2, (n, slots), generator=gen),
             "masked_lm_labels": torch.randint(vocab_size, (n, slots), generator=gen)}
        if flat_max_length is not None:
            b = to_padding_free(b, flat_max_length)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    was_training = model.training
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.train()
        model(**batch(*train_shape)).loss.backward()
        model.eval()
        with torch.no_grad():
            model(**batch(*eval_shape))
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    model.tokens_seen = None  # the training forward counted its tokens
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
        torch.cuda.synchronize()
    return round(time.perf_counter() - t, 1)


# ---- timing, target and resume ----------------------------------------------------------------------
def _rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _all_reduce(value, device, op):
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.long,
                     device=device)
    dist.all_reduce(t, op=op)
    return t.item()


class TimeToTarget(TrainerCallback):
    """Evaluation bookkeeping: the accuracy curve, the stop at the target, the --time_limit pause."""

    def __init__(self, cli, out, restored=None):
        self.cli, self.out = cli, Path(out)
        r = restored or {}
        self.run_offset = r.get("run_s", 0.0)        # time of earlier segments
        self.eval_s = r.get("eval_s", 0.0)
        self.samples_offset = r.get("samples", 0)
        self.tokens_offset = r.get("tokens", 0)
        self.segments = r.get("segments", 0) + 1
        self.reached = False
        self.paused = False
        self.save_s = 0.0                             # this segment's checkpoint saving, not timed

    # time of this run (all segments) excluding checkpoint saves
    def run_s(self, now=None):
        return (now or time.perf_counter()) - self.t0 - self.save_s + self.run_offset

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _write(self, rec):
        if _rank0():
            with open(self.out / "curve.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _counts(self, model, device):
        tokens = getattr(model, "tokens_seen", None)
        tokens = int(tokens.item()) if tokens is not None else 0
        samples = getattr(model, "samples_seen", 0)
        return (_all_reduce(samples, device, dist.ReduceOp.SUM) + self.samples_offset,
                _all_reduce(tokens, device, dist.ReduceOp.SUM) + self.tokens_offset)

    def on_train_begin(self, args, state, control, **kw):
        self._sync()
        self.t0 = self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if control.should_evaluate or state.global_step % args.eval_steps == 0:
            self._sync()  # so the evaluation's time is not charged with queued training work
        self.mark = time.perf_counter()
        if self.cli.time_limit is not None and state.global_step % self.cli.time_check_every == 0:
            over = int(time.time() - PROCESS_START > self.cli.time_limit)
            if _all_reduce(over, args.device, dist.ReduceOp.MAX):  # every rank stops at one step
                control.should_save = self.cli.on_time_limit == "save"
                control.should_training_stop = True
                self.paused = True

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self._write({"event": "log", "step": state.global_step, "run_s": round(self.run_s(), 3),
                         **{k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if k in logs}})

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        now = time.perf_counter()
        self.eval_s += now - self.mark
        self.mark = now
        samples, tokens = self._counts(model, args.device)
        run_s = self.run_s(now)
        acc = metrics["eval_mlm_accuracy"]
        rec = {"event": "eval", "step": state.global_step, "samples": samples, "tokens": tokens,
               "run_s": round(run_s, 3), "train_s": round(run_s - self.eval_s, 3),
               "eval_s": round(self.eval_s, 3), "mlm_accuracy": acc,
               "eval_loss": metrics.get("eval_loss"), "eval_predictions": metrics.get("eval_count")}
        self._write(rec)
        if acc >= self.cli.target and not self.reached:
            self.reached = True
            control.should_training_stop = True
            self._result(True, rec)

    def on_save(self, args, state, control, **kw):
        now = time.perf_counter()
        self.save_s += now - self.mark
        self.mark = now
        if _rank0():
            # The run's clock and counters travel with the checkpoint, so --resume continues them.
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            samples, tokens = self._counts(kw["model"], args.device)
            (ck / "timing.json").write_text(json.dumps({
                "run_s": self.run_s(now), "eval_s": self.eval_s, "samples": samples,
                "tokens": tokens, "segments": self.segments, "step": state.global_step}))
        elif dist.is_initialized():
            self._counts(kw["model"], args.device)  # matches rank 0's all-reduces

    def on_train_end(self, args, state, control, **kw):
        if self.paused and not self.reached:
            self._write({"event": "paused", "step": state.global_step, "run_s": round(self.run_s(), 3),
                         "segments": self.segments})
        elif not self.reached:
            self._result(False, {"step": state.global_step, "run_s": self.run_s()})

    def _result(self, reached, rec):
        res = {"event": "result", "reached": reached, "target": self.cli.target, "attn": self.cli.attn,
               "seed": self.cli.seed, "segments": self.segments,
               "time_to_target_s": rec["run_s"] if reached else None,
               "train_time_to_target_s": rec.get("train_s") if reached else None,
               "steps_to_target": rec["step"] if reached else None,
               "samples_to_target": rec.get("samples") if reached else None,
               "tokens_to_target": rec.get("tokens") if reached else None,
               "final_step": rec["step"], "final_run_s": rec["run_s"],
               "final_mlm_accuracy": rec.get("mlm_accuracy")}
        self._write(res)
        if _rank0():
            (self.out / "result.json").write_text(json.dumps(res, indent=1) + "\n")


def _restore(out, checkpoint):
    """Timing state of `checkpoint`, and the curve cut back to it (later lines were not kept)."""
    timing = json.loads((Path(checkpoint) / "timing.json").read_text())
    curve = Path(out) / "curve.jsonl"
    if _rank0() and curve.exists():
        keep = [ln for ln in curve.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= timing["step"]
                and json.loads(ln)["event"] != "result"]
        curve.write_text("".join(k + "\n" for k in keep))
    return timing


def _git_sha():
    if os.environ.get("GIT_SHA"):  # a copied checkout's .git may be older than its files
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- main -------------------------------------------------------------------------------------------
def main(argv=None):
    cli = parse_args(argv)
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "result.json").exists():
        print(f"{out} already has a result: {(out / 'result.json').read_text()}", flush=True)
        return
    cuda = torch.cuda.is_available()
    meta = json.loads((Path(cli.data) / "meta.json").read_text())
    if cli.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    crop = dict(max_seq_len=cli.max_seq_len, sep_id=meta.get("sep_id"))
    train_set = MaskedLMShard(Path(cli.data) / "train.npz", **crop)
    eval_set = MaskedLMShard(Path(cli.data) / "eval.npz", **crop)
    # The longest sample: padding-free batches' bound on a sample's length (max_length_q/k).
    longest = int(max(train_set.lengths().max(), eval_set.lengths().max()))
    collator = Collator(meta["pad_id"],
                        flat_max_length=longest if cli.attn == "hf_flash_flat" else None)

    model, attn_how = load_model(cli.init, cli.attn)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = cli.per_device_batch * world * cli.grad_accum
    eval_steps = max(1, cli.eval_every // global_batch)
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cli.per_device_batch,
        per_device_eval_batch_size=cli.eval_batch, gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.decay_steps, max_grad_norm=MAX_GRAD_NORM, bf16=cuda and not cli.no_bf16,
        eval_strategy="steps", eval_steps=eval_steps, logging_steps=cli.log_every,
        save_strategy="no", save_total_limit=1, report_to="none", seed=cli.seed, data_seed=cli.seed,
        remove_unused_columns=False, label_names=["masked_lm_labels"],
        dataloader_num_workers=cli.workers if cli.workers is not None else (2 if cuda else 0),
        dataloader_pin_memory=cuda, ddp_backend="gloo" if world > 1 and not cuda else None,
        ddp_find_unused_parameters=False, use_cpu=not cuda,
    )
    model.to(targs.device)  # before the optimizer is built, so it holds the device parameters
    if cli.compile:
        compile_body(model, cli.attn, cuda)
    optimizer = Lamb(lamb_param_groups(model, WEIGHT_DECAY), lr=cli.lr, betas=BETAS, eps=EPS)
    scheduler = warmup_poly_schedule(optimizer, cli.warmup_steps, cli.decay_steps, POLY_POWER)

    import evaluate

    metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)

    def compute_metrics(pred):
        res = metric.compute(predictions=np.asarray(pred.predictions).ravel(),
                             references=np.asarray(pred.label_ids).ravel())
        return {"mlm_accuracy": res["accuracy"], "count": res["count"]}

    def argmax_logits(logits, labels):  # keep (N, 76) ids, not (N, 76, 30522) logits
        return logits.argmax(dim=-1)

    warm_s = None
    if not cli.no_warm_kernels:
        width = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE  # as the collator pads
        warm_s = warm_kernels(model, targs.device, targs.bf16, (cli.per_device_batch, width),
                              (cli.eval_batch, width),
                              int(np.diff(train_set.pred_offsets).max()),
                              model.config.vocab_size, collator.flat_max_length)

    checkpoint = get_last_checkpoint(str(out)) if cli.resume and out.exists() else None
    restored = _restore(out, checkpoint) if checkpoint else None
    if dist.is_initialized():
        dist.barrier()  # rank 0 has cut the curve back before anyone appends
    timer = TimeToTarget(cli, out, restored)
    trainer = Trainer(model=model, args=targs, data_collator=collator, train_dataset=train_set,
                      eval_dataset=eval_set, optimizers=(optimizer, scheduler),
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=argmax_logits,
                      callbacks=[timer])
    model.samples_seen = 0
    _count_samples(model)

    init_info = Path(cli.init) / "init.json"
    header = {
        "event": "run", "attn": cli.attn, "attn_how": attn_how,
        "attn_implementation": model.config._attn_implementation, "seed": cli.seed,
        "target": cli.target, "resumed_from": checkpoint, "world_size": world,
        "global_batch": global_batch, "per_device_batch": cli.per_device_batch,
        "grad_accum": cli.grad_accum, "lr": cli.lr, "warmup_steps": cli.warmup_steps,
        "decay_steps": cli.decay_steps, "eval_every_samples": eval_steps * global_batch,
        "eval_steps": eval_steps, "bf16": targs.bf16, "layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size, "heads": model.config.num_attention_heads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "init": json.loads(init_info.read_text()) if init_info.exists() else None,
        "data": {k: meta["splits"][k].get("sha256") for k in meta["splits"]},
        "train_samples": len(train_set), "eval_samples": len(eval_set),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "git": _git_sha(),
        "startup_s": round(time.time() - PROCESS_START, 1),
        "max_seq_len": cli.max_seq_len, "deterministic": cli.deterministic,
        "kernel_warmup_s": warm_s,  # untimed, as MLPerf's initialization
        "compiled": cli.compile, "compiled_graphs_before_clock": compiled_graphs(),
    }
    if cli.attn.startswith("hf_flash"):
        paths = attention_paths(model) or []
        header["attn_paths"] = sorted({r.get("path") for r in paths})
    timer._write(header)
    if _rank0():
        print(json.dumps(header), flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)
    if cli.attn.startswith("hf_flash") and _rank0():
        # What the kernel was actually asked to do in the last call (e.g. key-padding lengths).
        paths = attention_paths(model) or [{}]
        timer._write({"event": "attn_check", "layer0": paths[0]})
    if cli.compile and _rank0():
        # More graphs than before the clock: recompiles inside the timed run.
        timer._write({"event": "compile_check", "compiled_graphs": compiled_graphs()})
    if _rank0():
        res = out / "result.json"
        print(res.read_text() if res.exists() else f"paused; continue with --resume into {out}",
              flush=True)
        if cli.save_final and res.exists():
            save_start(trainer.model, cli, header, json.loads(res.read_text()))
    if dist.is_initialized():
        # Torn down here, in this order. Left to exit-time destructors, a gloo run once aborted
        # (SIGABRT, "terminate called without an active exception") after writing its result.
        # And a gloo group must not end while one of its worker threads still frees a finished
        # collective's tensors: that thread waits for the GIL, which the thread ending the group
        # holds while it waits for that worker (a run hung so, ended by the DDP reducer's
        # destructor). So: every collective done (barrier), the reducer released while the group
        # is still registered (its destructor then does not end the group), a pause without the
        # GIL for the workers to finish, then the group ended.
        dist.barrier()
        del trainer
        gc.collect()
        time.sleep(0.2)
        dist.destroy_process_group()


def save_start(model, cli, header, result):
    """Write `model` as a starting checkpoint for later runs (make_checkpoint.py's layout): the
    weights, and init.json with their sha256 and how they were made, so another machine that
    makes them again can compare."""
    from model import state_dict_sha256

    out = Path(cli.save_final)
    model = getattr(model, "module", model)  # DDP
    model.save_pretrained(out)
    info = {"made_by": "train.py warm-up", "state_dict_sha256": state_dict_sha256(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "from_init": header["init"], "attn": cli.attn, "seed": cli.seed,
            "max_seq_len": cli.max_seq_len, "per_device_batch": cli.per_device_batch,
            "world_size": header["world_size"], "lr": cli.lr, "warmup_steps": cli.warmup_steps,
            "decay_steps": cli.decay_steps, "target": cli.target, "reached": result["reached"],
            "steps": result["final_step"], "mlm_accuracy": result["final_mlm_accuracy"],
            "deterministic": cli.deterministic, "bf16": header["bf16"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": header["device"], "git": header["git"]}
    (out / "init.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"saved_start": str(out), "state_dict_sha256": info["state_dict_sha256"]}),
          flush=True)


def _count_samples(model):
    """Counts training samples in Python (no device sync) via a forward pre-hook."""

    def hook(module, args, kwargs):
        if module.training:
            # One row of masked positions per sample, padded or padding-free (one input row).
            module.samples_seen += int(kwargs["masked_lm_positions"].shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)


if __name__ == "__main__":
    main()
