"""scripts/parts.sh, the time-limited part runner of the GPU scripts, on the CPU: a part past its
limit is interrupted (SIGINT first, so Python and pytest still report), marked as cut, and leaves
nothing of its process group running; a part within its limit is left alone. And run.sh's
Python path: the repository's kernels/ folder must not pass for the `kernels` package."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_parts_cut_a_slow_part_whole_and_leave_a_quick_one_alone(tmp_path):
    marker = tmp_path / "child-alive"
    # The slow part starts a grandchild that would outlive a plain kill of its parent.
    slow = (f"import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 30; touch {marker}']); "
            "time.sleep(30)")
    script = f"""
. {ROOT}/scripts/parts.sh
part slow 2 python3 -c "{slow}"
part quick 20 python3 -c "print('done')"
"""
    r = subprocess.run(["bash", "-c", script], env={**os.environ, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("slow: rc=130 (time limit)"), lines
    assert lines[1].startswith("quick: rc=0 in") and "time limit" not in lines[1], lines
    assert "KeyboardInterrupt" in (tmp_path / "slow.log").read_text()  # SIGINT reached Python
    assert (tmp_path / "quick.log").read_text().strip() == "done"
    assert "Terminated" not in r.stderr and "Interrupt" not in r.stderr  # no job notices
    # The whole group went, the grandchild too (it would still be sleeping otherwise).
    assert not [pid for pid in _pids_running(f"touch {marker}")]


def _pids_running(text):
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                yield proc.name
        except OSError:  # gone meanwhile
            pass


@pytest.mark.parametrize("script,parts,bad", [("gpu_check.sh", "tests scales", "scales"),
                                               ("gpu_examples.sh", "generation distill_flash",
                                                "distill_flash")])
def test_gpu_scripts_refuse_an_unknown_part_before_anything_runs(tmp_path, script, parts, bad):
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), str(tmp_path / "out")],
                       env={**os.environ, "PARTS": parts}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and f"unknown part '{bad}'" in r.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_examples_distillation_on_a_missing_teacher_says_so(tmp_path):
    # distill_sdpa alone, where no distill part has saved a teacher: a line in the summary, no run.
    # The scripts alone in a scratch root (the script works in its own root's runs/): no part runs.
    env = {**os.environ, "PARTS": "distill_sdpa", "TINY": "1"}
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", work / "scripts")
    r = subprocess.run(["bash", str(work / "scripts" / "gpu_examples.sh"), str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert "distill_sdpa: no runs/examples/distill/teacher" in (tmp_path / "out" / "summary.txt").read_text()
    assert not (work / "runs" / "examples" / "distill_sdpa").exists(), r.stdout


def test_gpu_examples_refuses_a_distillation_text_folder_without_its_files(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", work / "scripts")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt.xz").write_bytes(b"")  # eval.txt.xz missing
    env = {**os.environ, "PARTS": "distill", "TINY": "1", "DISTILL_TEXT": str(tmp_path / "text")}
    r = subprocess.run(["bash", str(work / "scripts" / "gpu_examples.sh"), str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "eval.txt.xz (DISTILL_TEXT)" in r.stdout, r.stdout + r.stderr
    assert not (work / "runs" / "examples" / "distill").exists()


def test_run_from_the_repository_root_kernels_folder_is_not_mistaken_for_transformers_kernels():
    # transformers >= 5.25 imports the `kernels` distribution; `python -m` from the repository
    # root would find the repository's kernels/ folder under that name. run.sh leaves the current
    # folder off sys.path; without that, importing hf_flash says what is wrong and how to run.
    import importlib.metadata
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    cmd = [sys.executable, "-m", "hf_flash", "--help"]
    bare = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    safe = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONSAFEPATH": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert safe.returncode == 0, safe.stderr
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # nothing to hide: runs either way
        assert bare.returncode == 0, bare.stderr
    else:
        assert bare.returncode == 1
        assert "hides the 'kernels' package that transformers imports: run Python with -P" in bare.stderr
    assert "PYTHONSAFEPATH=1" in (ROOT / "scripts" / "run.sh").read_text()
