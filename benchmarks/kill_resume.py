"""Kill a training run with SIGKILL at random moments, resume it each time, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py                 # full: 20 kills
    python benchmarks/kill_resume.py --kills 3       # what tests/test_crash_safety.py runs

A short deterministic CPU run (tiny ViT on scikit-learn's digits, EMA and random crops on, so model, EMA,
optimiser, scheduler and RNG state all have to survive) is started as `python -m vitlab train ... --resume` and
SIGKILLed, over and over, until it has been killed `--kills` times; then it is resumed to the end. Kills come in
three kinds, in turn: at a random moment of training; a few milliseconds after a checkpoint step is reached
(inside or right around the save); and as soon as a checkpoint's `.staging`/`.tmp` file appears (mid-write).

Nothing in vitlab is instrumented. Progress is read from the run's own progress bar (tqdm, told by its standard
TQDM_MININTERVAL / TQDM_MINITERS environment variables to print every step): the last count printed before a
kill is the number of steps done, the first count the next run prints is the step it resumed from. Steps
recomputed after a kill = done - resumed-from, which must never exceed the checkpoint interval K.

At the end the final `last.safetensors` (every model/, train/, ema/ and optim/ tensor) and `metrics.jsonl`
(every field but the wall-clock ones) must equal those of an uninterrupted run of the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'
STEPS_PER_EPOCH = 22  # 1,437 digits training images // batch 64
WALL_CLOCK_FIELDS = ("img_per_s", "elapsed_s")
KINDS = ("random", "at-save", "mid-write")
_COUNT = re.compile(r"(\d+)/(\d+) \[")


def train_command(out: Path, epochs: int, every: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "vitlab", "train", "--model", "vit-mini-p4-28", "--dataset", "digits",
            "--img-size", "8", "--epochs", str(epochs), "--batch-size", "64", "--lr", "3e-3", "--seed", "0",
            "--deterministic", "--out", str(out), "--set", f"model_overrides={TINY}", "--set", "threads=1",
            "--set", "warmup_steps=5", "--set", "ema_decay=0.9", "--set", "crop_padding=1",
            "--set", f"checkpoint_every_steps={every}", *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    env = dict(os.environ, TQDM_MININTERVAL="0", TQDM_MINITERS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Segment:
    """One `vitlab train --resume` process, with its progress-bar counts read as they are printed."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        self.counts: list[int] = []
        self.times: list[float] = []  # when each count was read
        self.stderr = b""
        self.stdout = b""
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        while chunk := self.process.stderr.read1(65536):
            self.stderr += chunk
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            # tqdm writes "\r" before each line, not after: the newest count is in the unfinished part (it may be
            # seen twice; only the first and the last counts matter)
            found = [int(m.group(1)) for part in (*done, pending)
                     if (m := _COUNT.search(part.decode(errors="replace")))]
            if found:
                with self._changed:
                    self.counts.extend(found)
                    self.times.extend([time.monotonic()] * len(found))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = self.process.stdout.read()

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate(counts) holds (True) or the process ends / time runs out (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.counts):
                if self.process.poll() is not None and not self._readers[0].is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))
            return True

    def kill(self) -> None:
        try:
            self.process.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code


@dataclass
class Report:
    kills_planned: int
    every: int
    kills: int = 0
    survived: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in KINDS})
    mid_write: int = 0  # kills that left a staging/temporary checkpoint file behind
    recomputed: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    identical_weights: bool = False
    identical_metrics: bool = False
    tensors_compared: int = 0
    metric_records: int = 0
    seconds: float = 0.0

    @property
    def max_recomputed(self) -> int:
        return max(self.recomputed, default=0)

    def lines(self) -> list[str]:
        return [f"kills survived: {self.survived}/{self.kills} (planned {self.kills_planned}; "
                + ", ".join(f"{kind} {count}" for kind, count in self.kinds.items()) + ")",
                f"kills that interrupted a checkpoint write: {self.mid_write}",
                f"steps recomputed after a kill: max {self.max_recomputed} (checkpoint interval K={self.every}), "
                f"all: {self.recomputed}",
                f"final weights identical to the uninterrupted run: {self.identical_weights} "
                f"({self.tensors_compared} tensors)",
                f"metrics.jsonl identical (all but {', '.join(WALL_CLOCK_FIELDS)}): {self.identical_metrics} "
                f"({self.metric_records} records)",
                f"failures: {len(self.failures)}" + "".join(f"\n  - {failure}" for failure in self.failures),
                f"time: {self.seconds:.0f} s"]


def _temporaries(out: Path, since: float = 0.0) -> set[str]:
    """Staging and temporary checkpoint files in `out` (written at or after `since`, a time.time())."""
    found = set()
    for name in os.listdir(out) if out.is_dir() else ():
        if name.endswith((".staging", ".tmp")):
            try:
                if os.stat(out / name).st_mtime >= since:
                    found.add(name)
            except FileNotFoundError:
                continue
    return found


def _metrics(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{key: value for key, value in record.items() if key not in WALL_CLOCK_FIELDS} for record in records]


def _compare(reference: Path, resumed: Path, report: Report) -> None:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(reference / "last.safetensors"), load_file(resumed / "last.safetensors")
    keys = sorted(key for key in a if key.startswith(("model/", "train/", "ema/", "optim/")))
    if not any(key.startswith("model/") for key in keys):
        report.failures.append("the reference checkpoint has no model/ tensors")
    different = [key for key in keys if key not in b or not torch.equal(a[key], b[key])]
    if set(keys) != {key for key in b if key.startswith(("model/", "train/", "ema/", "optim/"))}:
        different.append("(different key sets)")
    report.tensors_compared = len(keys)
    report.identical_weights = not different
    if different:
        report.failures.append(f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}")
    ref_metrics, got_metrics = _metrics(reference / "metrics.jsonl"), _metrics(resumed / "metrics.jsonl")
    report.metric_records = len(got_metrics)
    report.identical_metrics = ref_metrics == got_metrics
    if not report.identical_metrics:
        report.failures.append(f"metrics.jsonl differs: reference {ref_metrics}, resumed {got_metrics}")


def run(kills: int = 20, every: int = 5, epochs: int = 6, seed: int = 0, workdir: Path | None = None,
        verbose: bool = True) -> Report:
    """Kill and resume `kills` times; returns the counts (see `Report.lines`)."""
    started = time.monotonic()
    rng = random.Random(seed)
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="vitlab-kill-resume-")) if own_dir else Path(workdir)
    reference_out, out = root / "reference", root / "killed"
    report = Report(kills, every)
    total = epochs * STEPS_PER_EPOCH
    say = print if verbose else (lambda *args, **kwargs: None)

    # The uninterrupted run goes on beside the killed ones (it shares no files with them).
    root.mkdir(parents=True, exist_ok=True)
    reference_log = open(root / "reference.stderr", "w+b")  # a file, not a pipe nobody reads while it runs
    reference = subprocess.Popen(train_command(reference_out, epochs, every, resume=False), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=reference_log)
    done_before: int | None = None  # steps done when the previous segment was killed
    finished = False
    while report.kills < kills and not finished:
        kind = KINDS[report.kills % len(KINDS)]
        segment = Segment(train_command(out, epochs, every, resume=True))
        if not segment.wait_for(lambda counts: len(counts) >= 1, 300):
            segment.finish()
            report.failures.append(f"run {report.kills + 1} printed no progress; exit {segment.process.returncode}:"
                                   f" {segment.stderr.decode(errors='replace')[-400:]}")
            break
        start = segment.counts[0]
        if done_before is not None:
            report.recomputed.append(done_before - start)
            if done_before - start > every:
                report.failures.append(f"kill {report.kills}: {done_before} steps were done, the resumed run "
                                       f"started from step {start}: {done_before - start} > K={every} recomputed")
            if start > done_before:
                report.failures.append(f"kill {report.kills}: resumed from step {start}, past the {done_before} "
                                       "steps done")
        if start >= total:
            finished = True
            segment.finish()
            break
        segment_began = time.time() - 0.01
        if kind == "random":
            # a random step within the next ~1.5 checkpoint intervals, then a random moment of the next two steps'
            # time (in a step, an evaluation or a save): progress per kill does not depend on the machine's speed
            target = min(start + rng.randint(2, max(2, round(1.5 * every))), total)
            segment.wait_for(lambda counts, target=target: counts[-1] >= target, 120)
            first = segment.counts.index(start + 1) if start + 1 in segment.counts else 0
            steps = segment.counts[-1] - segment.counts[first]
            step_time = (segment.times[-1] - segment.times[first]) / steps if steps > 0 else 0.05
            time.sleep(rng.uniform(0.0, 2 * step_time))
        elif kind == "at-save":
            # a checkpoint step (K-multiple or end of epoch) at least one step ahead, then 0-30 ms into the save
            boundary = [s for s in range(start + 1, total + 1) if s % every == 0 or s % STEPS_PER_EPOCH == 0]
            target = boundary[min(rng.randrange(2), len(boundary) - 1)]
            segment.wait_for(lambda counts, target=target: counts[-1] >= target, 120)
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            # 1 to K steps, then poll for a checkpoint write in progress: a staging or temporary file written now
            until = min(start + rng.randint(1, every), total)
            segment.wait_for(lambda counts, until=until: counts[-1] >= until, 120)
            deadline = time.monotonic() + 60
            while segment.process.poll() is None and time.monotonic() < deadline:
                if _temporaries(out, since=segment_began):
                    break
                time.sleep(0.0005)
        if segment.process.poll() is not None:  # it finished first: resume once more, then stop
            segment.finish()
            done_before = segment.counts[-1] if segment.counts else start
            if segment.process.returncode != 0:
                report.failures.append(f"run {report.kills + 1} exited {segment.process.returncode}: "
                                       f"{segment.stderr.decode(errors='replace')[-400:]}")
            continue
        segment.kill()
        segment.finish()
        report.kills += 1
        report.kinds[kind] += 1
        done_before = segment.counts[-1]
        left = _temporaries(out, since=segment_began)  # written by this run and not yet renamed into place
        if left:
            report.mid_write += 1
        say(f"kill {report.kills:>2} ({kind:>9}): started at step {start:>3}, killed after step {done_before:>3}"
            + (f", mid-write: left {sorted(left)}" if left else ""))

    # Resume to the end.
    if not report.failures:
        final = Segment(train_command(out, epochs, every, resume=True))
        code = final.finish()
        if final.counts and done_before is not None and not finished:
            report.recomputed.append(done_before - final.counts[0])
            if done_before - final.counts[0] > every:
                report.failures.append(f"final resume started from step {final.counts[0]} after {done_before} "
                                       f"steps were done: more than K={every} recomputed")
        if code != 0:
            report.failures.append(f"final resume exited {code}: {final.stderr.decode(errors='replace')[-600:]}")
        else:
            report.survived = report.kills
        if _temporaries(out):
            report.failures.append(f"temporary files left after the run finished: {sorted(_temporaries(out))}")
    code = reference.wait(600)
    reference_log.seek(0)
    if code != 0:
        report.failures.append(f"reference run failed: {reference_log.read().decode(errors='replace')[-600:]}")
    elif not report.failures or report.survived:
        _compare(reference_out, out, report)
    reference_log.close()
    if report.kills < kills:
        report.failures.append(f"the run finished after {report.kills} of the {kills} kills planned: "
                               "give it more --epochs")
    report.seconds = time.monotonic() - started
    if own_dir and not report.failures:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    elif report.failures:
        say(f"run directories kept in {root}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="checkpoint_every_steps (K)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of 22 steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", type=Path, help="keep the run directories here")
    args = parser.parse_args()
    report = run(args.kills, args.every, args.epochs, args.seed, args.workdir)
    print("\n".join(report.lines()))
    return 1 if report.failures or report.survived < report.kills else 0


if __name__ == "__main__":
    sys.exit(main())
