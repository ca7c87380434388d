"""Pieces shared by the benchmark scripts: run metadata, result files, the closing table.

Kept free of CUDA-only calls at import time so `--help` and the CPU dry runs work anywhere.
"""

import csv
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def kernel_source_hash() -> str:
    """sha256 over kernels/*.py: names the kernel version even where the tree has no .git."""
    h = hashlib.sha256()
    for p in sorted((REPO / "kernels").glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _portable(arg, out):
    """The results folder as OUT when it is an absolute path: it names the machine, not the run."""
    if isinstance(arg, str) and out and os.path.isabs(str(out)) and arg == str(out):
        return "OUT"
    return arg


def run_metadata(args) -> dict:
    """Who, what and where: enough to tell two result files apart and to reproduce one."""
    import torch

    out = getattr(args, "out", None)
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)]
                            + [_portable(a, out) for a in sys.argv]),
        "args": {k: _portable(v, out) if k == "out" else v for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernel_src_sha256_16": kernel_source_hash(),
    }
    # A copy of the tree whose .git is missing or stale can pass the sha in by hand.
    sha = os.environ.get("GIT_SHA") or _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "kernels", "hf_flash", "patches")
    meta["git_sha"] = sha
    meta["git_dirty"] = None if dirty is None else bool(dirty)
    for name in ("triton", "transformers", "hf_flash"):
        try:
            meta[name] = __import__(name).__version__
        except Exception as e:  # a missing package is a fact to record, not a reason to stop
            meta[name] = f"n/a ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, gpu_sm_count=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    gpu_l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        meta.update(gpu="none (CPU)")
    return meta


def output_dir(out: str, dry_run: bool, default: str = "benchmarks/results") -> Path:
    """Where results go; a dry run left at the default goes to a fresh temp folder so that
    plumbing checks never mix with real results."""
    if dry_run and out == default:
        import tempfile
        return Path(tempfile.mkdtemp(prefix="hf_flash_dry_run_"))
    return Path(out)


def write_results(out_dir: Path, stem: str, meta: dict, rows: list, extra: dict = None):
    """Rewrites <stem>.csv and <stem>.json; called after every case so a run cut short keeps
    everything measured so far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    tmp = out_dir / f".{stem}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
    tmp.replace(out_dir / f"{stem}.csv")
    doc = {"meta": meta, "rows": rows}
    if extra:
        doc.update(extra)
    tmp = out_dir / f".{stem}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    tmp.replace(out_dir / f"{stem}.json")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def table(headers, body) -> str:
    """Plain fixed-width text table (no third-party formatter on every machine)."""
    cols = list(zip(*([headers] + body))) if body else [[h] for h in headers]
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def short_reason(exc: BaseException, warns=(), limit: int = 240) -> str:
    """One line: the exception's first line plus the first warning PyTorch gave for it
    (SDPA explains in warnings why a backend refused the inputs)."""
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    for w in warns:
        text = str(w.message).strip().replace("\n", " ")
        if text and text not in msg:
            msg += f" | {text}"
            break
    return msg[:limit]


def warm_up_gpu(seconds: float = 2.0):
    """Keep the GPU busy with large matmuls for `seconds`, so that timings start at steady clocks
    rather than climbing out of idle."""
    import time

    import torch
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.time() + seconds
    while time.time() < t_end:
        x @ x
    torch.cuda.synchronize()


def device_kernels(events) -> list:
    """The GPU kernels among a profile's events (`prof.key_averages()`), each with its
    `self_device_time_total`. A `record_function` range also shows on the GPU timeline, as a user
    annotation spanning the kernels it launched: counted as a kernel it doubles their time (as
    hf_flash's no-grad range did in profile_decode's runs before 2026-12-03)."""
    return [e for e in events if e.device_type.name == "CUDA"
            and not getattr(e, "is_user_annotation", False)]


def idle_gaps(kernels, top_n=5) -> dict:
    """Where the GPU waited inside a profiled span: `kernels` are (start_us, end_us, name) of
    its kernels (any order). Returns the span's ms, the ms no kernel ran (the union of kernel
    intervals taken from the span), and the `top_n` longest waits, each with the kernels before
    and after it: a wait after a kernel that ends a data-dependent step (a `nonzero`, say) is
    the host catching up after a sync; waits spread evenly are launch overhead."""
    if not kernels:
        return {"span_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    kernels = sorted(kernels)
    gaps, busy_end, last = [], kernels[0][0], kernels[0]
    for start, end, name in kernels:
        if start > busy_end:
            gaps.append((start - busy_end, last[2], name))
        if end >= busy_end:
            busy_end, last = end, (start, end, name)
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": round((busy_end - kernels[0][0]) / 1e3, 3),
            "idle_ms": round(sum(g[0] for g in gaps) / 1e3, 3),
            "gaps": [dict(ms=round(us / 1e3, 3), after=a[:80], before=b[:80])
                     for us, a, b in gaps[:top_n]]}


# ---------------------------------------------------------------------------------------------
# The Gluon routes' length floors, for experiments: each route serves calls from a sequence
# length on (kernels/_forward_hopper.py, _backward_hopper.py); a run may move them all at once.
HOPPER_ROUTES = ("fwd", "dkdv", "fused")


def add_hopper_floors_arg(parser, example: str):
    parser.add_argument("--hopper-floors", default="", metavar="ROUTE=N,...",
                        help="set the shortest length each Gluon route serves, for every head "
                             "dim and causal setting, for this run (routes: "
                             + ", ".join(HOPPER_ROUTES) + "); " + example)


def parse_hopper_floors(parser, text: str) -> dict:
    try:
        floors = {k.strip(): int(v) for k, v in
                  (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        parser.error(f"--hopper-floors takes ROUTE=N,...; got {text!r}")
    if set(floors) - set(HOPPER_ROUTES):
        parser.error(f"--hopper-floors: routes are {', '.join(HOPPER_ROUTES)}; "
                     f"got {sorted(floors)}")
    return floors


def _floor_tables():
    from hf_flash.kernels import _backward_hopper, _forward_hopper
    return {"fwd": (_forward_hopper, "MIN_LENGTH"), "dkdv": (_backward_hopper, "MIN_LENGTH"),
            "fused": (_backward_hopper, "FUSED_MIN_LENGTH")}


def set_hopper_floors(floors: dict):
    """Every (head dim, causal) entry of each named route's length floor set to the value."""
    from hf_flash.kernels import _backward_hopper
    every = set(_backward_hopper.MIN_LENGTH)  # every (head dim, causal) a Gluon route may serve
    for route, n in floors.items():
        mod, name = _floor_tables()[route]
        setattr(mod, name, dict.fromkeys(set(getattr(mod, name)) | every, n))


def hopper_floors() -> dict:
    """The floors this run used, for its metadata."""
    return {route: {f"d{d}{' causal' if c else ''}": n for (d, c), n in getattr(mod, name).items()}
            for route, (mod, name) in _floor_tables().items()}

