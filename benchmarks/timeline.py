"""Where a deep method's training time went, from its run's train.log.jsonl.

    python benchmarks/timeline.py RUN/train.log.jsonl

One line per phase: its epochs, the seconds they took (sum, first epoch apart: CUDA graph
captures and cuDNN's autotuning land there), then the time no epoch counts, from the lines'
``elapsed`` (seconds since the fit began): the set-up before the first epoch, each gap
between phases (one-off passes such as AC-PIC, checkpoints), and the rest of the final
``done`` line's ``timings.fit``: the wait for ``train``'s warm-up thread before the fit's
clock starts, and the end of the fit after its last line. A log written
before ``elapsed`` existed gets the per-phase sums only. A resumed run's log holds lines of
several processes: only the last process's lines are timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _last_process(rows: list[dict]) -> list[dict]:
    """The lines written by the last process (``elapsed`` starts again in a resumed one)."""
    start = 0
    for i in range(1, len(rows)):
        before, now = rows[i - 1].get("elapsed"), rows[i].get("elapsed")
        if before is not None and now is not None and now < before:
            start = i
    return rows[start:]


def timeline(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    phases: dict[str, list[dict]] = {}
    for r in rows:
        if "epoch" in r:
            phases.setdefault(r["phase"], []).append(r)
    for name, epochs in phases.items():
        secs = [float(r["seconds"]) for r in epochs]
        rest = f", then {sum(secs[1:]) / (len(secs) - 1):.2f} s an epoch" if len(secs) > 1 else ""
        lines.append(
            f"{name:10s} {len(secs):4d} epochs {sum(secs):9.1f} s (first {secs[0]:.1f} s{rest})"
        )
        rotation = [float(r["rotation_s"]) for r in epochs[1:] if "rotation_s" in r]
        if rotation:  # MMDC: the rotation passes' share
            lines.append(
                f"{'':10s} each rotation pass {sum(rotation) / len(rotation):.2f} s of it "
                f"(mean of {len(rotation)} after the first epoch)"
            )
    for r in rows:
        if "epoch" not in r and r.get("phase") != "done" and "seconds" in r:
            lines.append(f"{r['phase']:10s}             {float(r['seconds']):9.1f} s (one-off)")
    last = _last_process(rows)
    timed = [r for r in last if "elapsed" in r]
    if not timed:
        lines.append("no `elapsed` in this log: the time between epochs is not known")
        return lines
    previous, untimed = 0.0, 0.0
    for r in timed:
        began = float(r["elapsed"]) - float(r.get("seconds", 0.0))
        gap = began - previous
        if gap > 0.05:
            what = "set-up" if previous == 0.0 else "gap"
            where = f"{r['phase']} {r['epoch']}" if "epoch" in r else r["phase"]
            lines.append(f"{what:10s} before {where}: {gap:.2f} s")
        untimed += max(gap, 0.0)
        previous = float(r["elapsed"])
    done = [r for r in rows if r.get("phase") == "done"]
    fit = done[-1].get("timings", {}).get("fit") if done else None
    if fit is not None and len(last) == len(rows):  # one process: its fit time is known
        tail = float(fit) - previous
        rest = f"{tail:.2f} s (warm-up wait, end)"
        lines.append(f"rest       of the fit's {float(fit):.1f} s: {rest}")
        untimed += max(tail, 0.0)
    lines.append(f"untimed    {untimed:.2f} s in all")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a run folder's train.log.jsonl")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    print("\n".join(timeline(rows)))


if __name__ == "__main__":
    main()
