"""Where a workflow run's wall time went: job time summed per rule, from Snakemake's own run log.

    python bench/stage_times.py                 # the newest run in this folder (.snakemake/log/)
    python bench/stage_times.py --workdir W --log .snakemake/log/2026-...snakemake.log --markdown

Snakemake logs each job's start ("[date]" then "rule NAME:" ... "jobid: N") and end ("[date]" then
"Finished jobid: N (Rule: NAME)") to one second. Per rule: jobs, their summed wall seconds (start to
finish, so the Snakemake and Python start-up of each job is counted: that is what a user waits for),
the mean per job, and beside it the seconds the rule's commands measured themselves where the rule
has a `benchmark:` file (results/benchmarks/{rule}/*.tsv). On several cores jobs overlap, so the
per-rule sums add up to more than the run's wall time, which is printed last.
"""

from __future__ import annotations

import argparse
import csv
import re
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def parse_log(path: Path) -> tuple[dict[str, list[float]], float]:
    """Rule -> wall seconds of each finished job, and the run's wall seconds (first to last stamp)."""
    when = None
    first = last = None
    pending_rule = None
    started: dict[str, tuple[str, datetime]] = {}
    per_rule: dict[str, list[float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stamp = STAMP.match(line)
        if stamp:
            when = datetime.strptime(stamp.group(1), "%a %b %d %H:%M:%S %Y")
            first = first or when
            last = when
            continue
        start = START.match(line)
        if start:
            pending_rule = start.group(1)
            continue
        jobid = JOBID.match(line)
        if jobid and pending_rule is not None:
            started[jobid.group(1)] = (pending_rule, when)
            pending_rule = None
            continue
        done = FINISHED.match(line)
        if done and done.group(1) in started:
            rule, begun = started.pop(done.group(1))
            per_rule.setdefault(rule, []).append((when - begun).total_seconds())
    wall = (last - first).total_seconds() if first and last else 0.0
    return per_rule, wall


def command_seconds(workdir: Path) -> dict[str, float]:
    """Rule -> seconds its commands measured (Snakemake benchmark files), where it has them."""
    out: dict[str, float] = {}
    for path in sorted((workdir / "results" / "benchmarks").glob("*/**/*.tsv")):
        rule = path.relative_to(workdir / "results" / "benchmarks").parts[0]
        with open(path) as fh:
            out[rule] = out.get(rule, 0.0) + sum(float(row["s"]) for row in csv.DictReader(fh, delimiter="\t"))
    return out


def table(per_rule: dict[str, list[float]], measured: dict[str, float], wall: float) -> str:
    total = sum(sum(v) for v in per_rule.values()) or 1.0
    rows = [
        "| rule | jobs | job wall s (sum) | mean s/job | share | command s (benchmark) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rule, times in sorted(per_rule.items(), key=lambda kv: -sum(kv[1])):
        bench = f"{measured[rule]:.0f}" if rule in measured else ""
        rows.append(
            f"| {rule} | {len(times)} | {sum(times):.0f} | {sum(times) / len(times):.1f} | "
            f"{sum(times) / total:.0%} | {bench} |"
        )
    n_jobs = sum(len(v) for v in per_rule.values())
    rows.append(f"| **all** | {n_jobs} | {total:.0f} |  |  |  |")
    return "\n".join(rows) + f"\n\nRun wall time (first to last log stamp): {wall:.0f} s = {wall / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--log", type=Path, help="a Snakemake run log (default: the newest under .snakemake/log)")
    parser.add_argument(
        "--all-logs", action="store_true", help="add up every run log of the folder (a run resumed after a stop)"
    )
    args = parser.parse_args()
    logs = sorted((args.workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if args.log:
        logs = [args.log]
    elif not args.all_logs:
        logs = logs[-1:]
    if not logs:
        raise SystemExit(f"no Snakemake run log under {args.workdir / '.snakemake' / 'log'}")
    per_rule: dict[str, list[float]] = {}
    wall = 0.0
    for log in logs:
        rules, seconds = parse_log(log)
        wall += seconds
        for rule, times in rules.items():
            per_rule.setdefault(rule, []).extend(times)
    print(f"logs: {', '.join(str(p) for p in logs)}\n")
    print(table(per_rule, command_seconds(args.workdir), wall))


if __name__ == "__main__":
    main()
