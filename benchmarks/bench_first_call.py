"""What the first call of a new shape class costs: Triton compiling (and, with tuning, timing) the
kernels, before any step runs at speed.

    python benchmarks/bench_first_call.py --out benchmarks/results/h200

Each mode runs in a fresh process with an empty Triton cache (TRITON_CACHE_DIR), as on a new
machine; a training-shaped call (BERT-large: B32 H16 N512 D64, bf16, key padding with lengths in
[N/2, N], dropout 0.1) is timed first, forward + backward, then a second time, then an
evaluation-shaped forward (no grad, no dropout: a specialisation of its own).

| mode | environment |
|---|---|
| tuned-threads | the default: each shape class's candidates compiled on a thread pool, then timed |
| tuned-serial | HF_FLASH_COMPILE_THREADS=1: compiled one by one inside the timing loop |
| heuristic | HF_FLASH_AUTOTUNE=0: one config per shape class, nothing timed |

--dry-run: a tiny shape under Triton's interpreter (plumbing only; nothing compiles there).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

MODES = {"tuned-threads": {}, "tuned-serial": {"HF_FLASH_COMPILE_THREADS": "1"},
         "heuristic": {"HF_FLASH_AUTOTUNE": "0"}}
SHAPE = dict(B=32, H=16, N=512, D=64)
TINY = dict(B=2, H=2, N=40, D=16)


def child(shape, dry_run):
    """One mode, in this process: prints a JSON line of seconds."""
    import torch

    import hf_flash
    from hf_flash.kernels import _tuning

    dev = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16  # bf16 dot is wrong under the interpreter
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    kpm = (torch.arange(N) < lengths[:, None]).to(dev)  # True = a real key

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def train_call():
        out = hf_flash.flash_attention(q, k, v, key_padding_mask=kpm, dropout_p=0.1)
        out.sum().backward()
        sync()

    times = {}
    for name, fn in (("first_train_call_s", train_call), ("second_train_call_s", train_call)):
        t = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t, 3)
    with torch.no_grad():
        t = time.perf_counter()
        hf_flash.flash_attention(q, k, v, key_padding_mask=kpm)
        sync()
        times["first_eval_call_s"] = round(time.perf_counter() - t, 3)
    times["compile_threads"] = _tuning.COMPILE_THREADS
    times["chosen"] = {f"{name} {key}": cfg for (name, key), cfg in _tuning.chosen_configs().items()}
    print("RESULT " + json.dumps(times, default=str), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = TINY if args.dry_run else SHAPE
    if args.child:
        return child(shape, args.dry_run)
    out = benchlib.output_dir(args.out, args.dry_run)
    meta = benchlib.run_metadata(args)
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        env = {**os.environ, **MODES[mode], "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton_cache_")}
        if args.dry_run:
            env["TRITON_INTERPRET"] = "1"
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", mode] + (["--dry-run"] if args.dry_run else []),
                           env=env, capture_output=True, text=True, timeout=900)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        row = {"mode": mode, **shape, "process_s": round(time.perf_counter() - t, 1)}
        if r.returncode or not line:
            row["error"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:240]
        else:
            row.update(json.loads(line[0][len("RESULT "):]))
        rows.append(row)
        benchlib.write_results(out, "first_call" + ("_dry-run" if args.dry_run else ""), meta, rows)
    print(benchlib.table(["mode", "first train call s", "second s", "first eval s", "threads", "error"],
                         [[r["mode"], r.get("first_train_call_s", "-"), r.get("second_train_call_s", "-"),
                           r.get("first_eval_call_s", "-"), r.get("compile_threads", "-"),
                           r.get("error", "")] for r in rows]))
    print(f"results in {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
