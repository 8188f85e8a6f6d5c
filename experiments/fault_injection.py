"""Fault injection: kill a training run with SIGKILL, re-run the same command, and compare the final weights
with those of an uninterrupted run (docs/testing.md, "Fault injection"). Not in CI.

    python -m experiments.fault_injection --trials 50     # the benchmark: about 25 minutes on 2 CPU cores

Half the kills come at a random moment of the training (uniform between the first iteration's record and
the uninterrupted run's end, imports left out); the other half at a random checkpoint-file event: some
bytes into the n-th write of a checkpoint file (through its file object), or just before the n-th rename
of one into place or removal of one (Python's audit hooks), so that kills land inside checkpoint writes,
which last milliseconds and a random moment would rarely hit. ``$TMPDIR`` is put on another filesystem (``/dev/shm``)
when one is there, as on clusters where it is node-local. Each trial reports whether the resumed run ended
with exactly the uninterrupted weights, and how many completed iterations it had to redo.

``python -m experiments.fault_injection child --event E --name N --nth K -- <overrides>`` is one killed
run: ``g2rpo.run`` with the hook that kills it (used by ``tests/test_resume.py`` too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: the tiny preset the trials run: model=tiny_sd3 on CPU, 8 iterations of 2 prompts x 4 images
OVERRIDES = [
    "model=tiny_sd3",
    "reward=jpeg_compressibility",
    "data=animals",
    "callbacks.evaluate=null",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "curriculum.prompts_per_iteration=2",
    "curriculum.group_size=4",
    "algo.num_steps=4",
    "algo.rollout_batch_size=4",
    "trainer.max_epochs=8",
]
#: the run directory those overrides name (trainer.* of the list excluded, as conf/config.yaml says)
RUN_DIR = Path("outputs") / (
    "algo.num_steps=4,algo.rollout_batch_size=4,callbacks.evaluate=null,curriculum.group_size=4,"
    "curriculum.prompts_per_iteration=2,data=animals,model=tiny_sd3,reward=jpeg_compressibility"
)
EVENTS = ("write", "rename", "remove")


def _matches(event: str, args: tuple, kind: str, name: str) -> bool:
    """Whether an audit event is the checkpoint-file action ``kind`` on a file whose name contains ``name``."""
    if kind == "rename" and event == "os.rename":  # os.rename and os.replace
        return name in os.path.basename(args[1])
    if kind == "remove" and event == "os.remove":  # os.remove and os.unlink
        return name in os.path.basename(args[0])
    return False


class _KilledAfter:
    """A file object that kills the process once ``limit`` bytes have been written through it (the bytes
    before the limit are written and flushed: the file is cut short as a kill mid-write leaves it)."""

    def __init__(self, stream, limit: int) -> None:
        self._stream, self._left = stream, limit

    def write(self, data) -> int:
        if len(data) >= self._left:
            self._stream.write(bytes(data[: self._left]))
            self._stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._left -= len(data)
        return self._stream.write(data)

    def __getattr__(self, attribute: str):
        return getattr(self._stream, attribute)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._stream.close()


def _kill_inside_writes(name: str, nth: int, after_bytes: int) -> None:
    """Kill the process ``after_bytes`` into the ``nth`` file opened for writing whose name contains ``name``,
    whoever writes it: ``open`` (Lightning's fsspec writer, and ``shutil``'s copy once ``sendfile`` is off)
    or ``os.fdopen`` (g2rpo.files)."""
    import builtins
    import shutil

    shutil._USE_CP_SENDFILE = False  # a cross-filesystem move then copies through write(), where we count
    real_open, real_fdopen = builtins.open, os.fdopen
    opened = 0

    def watched(stream, path):
        nonlocal opened
        mode = getattr(stream, "mode", "")
        if isinstance(path, (str, os.PathLike)) and name in os.path.basename(path) and "r" not in mode:
            opened += 1
            if opened == nth:
                return _KilledAfter(stream, after_bytes)
        return stream

    def patched_open(file, mode="r", *args, **kwargs):
        return watched(real_open(file, mode, *args, **kwargs), file)

    def patched_fdopen(fd, mode="r", *args, **kwargs):
        return watched(real_fdopen(fd, mode, *args, **kwargs), os.readlink(f"/proc/self/fd/{fd}"))

    builtins.open, os.fdopen = patched_open, patched_fdopen


def child(kind: str, name: str, nth: int, after_bytes: int, overrides: list[str]) -> None:
    """Run ``g2rpo.run overrides``, killing the process with SIGKILL at the ``nth`` matching event: ``write``
    ``after_bytes`` into a file, or just before a ``rename`` or ``remove``."""
    if kind == "write":
        _kill_inside_writes(name, nth, after_bytes)
    else:
        seen = 0

        def hook(event: str, args: tuple) -> None:
            nonlocal seen
            if _matches(event, args, kind, name):
                seen += 1
                if seen == nth:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
    sys.argv = ["g2rpo.run", *overrides]
    runpy.run_module("g2rpo.run", run_name="__main__")


def environment() -> dict[str, str]:
    """One thread (the runs are compared bit for bit), no network, this repository importable (the killed
    runs import this module from their own directory), and ``$TMPDIR`` on another filesystem when
    ``/dev/shm`` is one."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != Path.cwd().stat().st_dev:
        env["TMPDIR"] = str(shm)
    return env


def run_command(cwd: Path, overrides: list[str] = OVERRIDES) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "g2rpo.run", *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment())


def killed_command(
    kind: str, name: str, nth: int, after_bytes: int = 4096, overrides: list[str] = OVERRIDES
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.fault_injection",
        "child",
        "--event",
        kind,
        "--name",
        name,
        "--nth",
        str(nth),
        "--after-bytes",
        str(after_bytes),
        "--",
        *overrides,
    ]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def completed_iterations(run_dir: Path) -> int:
    """Iterations whose metrics record was written (the last iteration logged + 1)."""
    from g2rpo.loggers import read_metrics

    path = run_dir / "metrics.jsonl"
    steps = [int(r["step"]) for r in read_metrics(path) if "reward/total/mean" in r] if path.is_file() else []
    return max(steps) + 1 if steps else 0


def _first_iteration(process: subprocess.Popen, run_dir: Path) -> bool:
    """Wait until the run has written its first metrics record (False: it ended first)."""
    while not (run_dir / "metrics.jsonl").is_file():
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    return True


def trial(index: int, seconds: float, straight: dict, root: Path, rng: random.Random) -> dict:
    """One killed-and-resumed run in a fresh directory; what happened, as a JSON-able record."""
    from g2rpo.resume import ResumeError, newest_checkpoint

    cwd = root / f"trial_{index:03d}"
    cwd.mkdir()
    env = environment()
    if index % 2 == 0:
        # a moment of the training: after the first iteration's record, before the uninterrupted run's end
        kill = {"mode": "time", "after_first_iteration_s": round(rng.uniform(0.0, seconds), 2)}
        process = subprocess.Popen(
            [sys.executable, "-m", "g2rpo.run", *OVERRIDES],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = _first_iteration(process, cwd / RUN_DIR)
        kill["started"] = started
        try:
            process.wait(timeout=kill["after_first_iteration_s"])
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    else:
        kind = rng.choice(EVENTS)
        name = "ckpt" if kind == "remove" else rng.choice(["last.ckpt", "epoch="])
        kill = {"mode": "event", "event": kind, "name": name, "nth": rng.randint(1, 8)}
        if kind == "write":
            kill["after_bytes"] = rng.randint(1, 1 << 16)
        process = subprocess.Popen(
            killed_command(kind, name, kill["nth"], kill.get("after_bytes", 0)),
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process.wait()
    run_dir = cwd / RUN_DIR
    record = {"trial": index, **kill, "killed": process.returncode == -signal.SIGKILL}
    record["completed_before_kill"] = completed_iterations(run_dir)
    try:
        checkpoint = newest_checkpoint([run_dir / "checkpoints"])
        record["resumes_after"] = checkpoint.iteration + 1 if checkpoint else 0
    except ResumeError as error:
        record["resumes_after"], record["error"] = None, str(error)
    record["redone"] = (
        max(record["completed_before_kill"] - record["resumes_after"], 0)
        if record["resumes_after"] is not None
        else None
    )
    resumed = subprocess.run(
        [sys.executable, "-m", "g2rpo.run", *OVERRIDES],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    record["resume_exit"] = resumed.returncode
    if resumed.returncode != 0:
        record["resume_error"] = resumed.stderr[-1500:]
    record["exact"] = resumed.returncode == 0 and same_weights(straight, final_weights(run_dir))
    return record


def benchmark(trials: int, seed: int, output: Path) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="g2rpo-faults-") as directory:
        root = Path(directory)
        (root / "straight").mkdir()
        # the uninterrupted run, timed from its first iteration's record to its end (imports left out)
        process = subprocess.Popen(
            [sys.executable, "-m", "g2rpo.run", *OVERRIDES],
            cwd=root / "straight",
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _first_iteration(process, root / "straight" / RUN_DIR)
        started = time.perf_counter()
        _, stderr = process.communicate()
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{stderr[-3000:]}")
        straight = final_weights(root / "straight" / RUN_DIR)
        records = []
        for index in range(trials):
            record = trial(index, seconds, straight, root, rng)
            records.append(record)
            print(json.dumps(record), flush=True)
    killed = [r for r in records if r["killed"]]
    exact = sum(r["exact"] for r in records)
    lost = sum(1 for r in records if r["redone"] is None or r["redone"] > 1)
    in_writes = sum(1 for r in killed if r["mode"] == "event")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    summary = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, one thread per run",
        "trials": trials,
        "seed": seed,
        "uninterrupted_run_after_first_iteration_s": round(seconds, 1),
        "killed": len(killed),
        "killed_inside_checkpoint_file_events": in_writes,
        "exact_weights_after_resume": exact,
        "lost_more_than_one_iteration": lost,
        "redone_iterations": {str(k): sum(1 for r in records if r["redone"] == k) for k in (0, 1)},
    }
    print(json.dumps(summary, indent=1))
    output.write_text(json.dumps({"summary": summary, "trials": records}, indent=1))
    print(f"wrote {output}")
    if exact != trials or lost:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("child", help="one run killed at the nth matching checkpoint-file event")
    one.add_argument("--event", choices=EVENTS, required=True)
    one.add_argument("--name", required=True, help="a part of the file name, e.g. last.ckpt or epoch=")
    one.add_argument("--nth", type=int, required=True)
    one.add_argument("--after-bytes", type=int, default=4096, help="write: bytes written before the kill")
    one.add_argument("overrides", nargs="*")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("experiments/results/fault_injection.json"))
    args = parser.parse_args(argv)
    if args.command == "child":
        child(args.event, args.name, args.nth, args.after_bytes, args.overrides)
    else:
        benchmark(args.trials, args.seed, args.output)


if __name__ == "__main__":
    main()
