"""python -m hf_flash demo: patch a model, show parity against eager and time eager, sdpa, hf_flash.

On a GPU: BERT-large and GPT-2-medium shapes (random weights, from config), bf16, a few timed
training steps each with CUDA synchronisation. On the CPU: a tiny model under Triton's
interpreter, which only shows that everything runs (interpreter timings mean nothing).
"""

import argparse
import os
import sys


def _ensure_interpreter() -> None:
    # Triton decides between GPU code and its interpreter when the kernels are defined, i.e. when
    # hf_flash was imported (before this module ran). Without CUDA, restart with the interpreter.
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "hf_flash", *sys.argv[1:]], env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_flash")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="parity vs eager and time per step of eager/sdpa/hf_flash")
    demo.add_argument("--steps", type=int, default=None, help="timed steps per backend")
    demo.add_argument("--models", default="bert,gpt2", help="comma-separated: bert, gpt2")
    sub.add_parser("models", help="list supported model families")
    args = parser.parse_args(argv)
    if args.command == "models":
        import hf_flash
        for f in hf_flash.supported_models():
            print(f"{f['family']}: {', '.join(f['model_types'])}")
            for k, v in f["quirks"].items():
                print(f"    {k}: {v}")
        return 0
    _ensure_interpreter()
    from ._demo import run_demo
    return run_demo(models=args.models.split(","), steps=args.steps)


if __name__ == "__main__":
    sys.exit(main())
