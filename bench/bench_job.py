"""Benchmark the scoring JOB at scale: ingest, planning, time to the first committed batch, steady throughput.

The engine itself is benchmarked by ``bench/bench_score.py``; this one measures what is around
it (issue 15). For each size (default 1k, 100k and 665k synthetic LLaVA records: a handful of
small toy images, 2-6-turn conversations, ~290 bytes of JSON per record (~360 in
``llava_v1_5_mix665k.json``)):

1. **ingest**: ``rglf ingest`` in its own process; wall time and peak RSS (``VmHWM``). The
   peak should not grow with the file (goal: 66k vs 665k within 20%).
2. **score**: ``rglf score`` with the defaults on a local Ray instance of ``--cpus`` CPUs (2),
   in its own process, for ``--score-seconds`` after its first committed batch, then Ctrl-C
   (SIGINT, as a terminal sends it). Printed: time from the command's start to the first
   committed feedback part (goal: within 2x of the 1k case at every size), steady samples/s
   after the first batch (goal: within 10% of the 1k case), the scheduler idle share (share
   of the scorer actors' available time spent waiting for a batch, from ``run.json``), and
   that the interrupt came back within seconds with exit 130.
3. **planning**: ``plan_run`` (index load + pending filter) on the run folder at 0%, 50% and
   100% done; the done parts are synthesised (feedback / router-input part files of 16 samples,
   as the scorer writes them) so 665k samples need no hours of scoring. Printed for a fresh
   index (every part read once, as after a killed run that never flushed its index) and for a
   warm one (the index covers every part: what every resume after a normal run sees).

Other work on the machine shifts absolute times; the ratios between sizes, measured in one
run, are the figures to read.

    python -m bench.bench_job                              # 1k, 100k, 665k
    python -m bench.bench_job --sizes 1000,24000 --score-seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RGLF = [sys.executable, "-m", "rglf.cli"]
QUESTIONS_EXTRA = ("Describe the picture.", "What colour is the big block?", "Is the square checkered or plain?")


# --------------------------------------------------------------------------------------
# Synthetic LLaVA records
# --------------------------------------------------------------------------------------


def write_records(out: Path, n: int, *, n_images: int = 8, seed: int = 0, jsonl: bool = False) -> Path:
    """``out/data.json`` (or ``.jsonl``): ``n`` LLaVA records over ``n_images`` toy images in ``out/images/``.

    Each record has 2, 4 or 6 turns (1-3 question/answer pairs) about its image, in the toy's
    vocabulary, ~290 bytes of JSON on average. Written incrementally (memory independent of ``n``).
    """
    from rglf.model.toy.task import families_for, question_answer, render, sample_scene

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = []
    for k in range(n_images):
        scene = sample_scene(np.random.default_rng([seed, k]))
        render(scene).save(out / "images" / f"img{k:03d}.png")
        scenes.append(scene)
    rng = np.random.default_rng(seed)
    pairs = rng.integers(1, 4, size=n)
    path = out / ("data.jsonl" if jsonl else "data.json")
    width = len(str(max(n - 1, 1)))
    with path.open("w", encoding="utf-8") as fh:
        if not jsonl:
            fh.write("[\n")
        for i in range(n):
            k = i % n_images
            families = families_for(scenes[k])
            conversations = []
            for t in range(int(pairs[i])):
                question, answer = question_answer(scenes[k], families[(i + t) % len(families)])
                if t == 0:
                    question = f"<image>\n{question}"
                conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record = {"id": f"s{i:0{width}d}", "image": f"images/img{k:03d}.png", "conversations": conversations,
                      "source": "synthetic"}
            text = json.dumps(record)
            fh.write(text + "\n" if jsonl else ("," if i else "") + text + "\n")
        if not jsonl:
            fh.write("]\n")
    return path


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MiB, exit code, stderr tail) of a command: its exact ``ru_maxrss`` from ``wait4``."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace").strip()[-500:]
    return seconds, usage.ru_maxrss / 1024, proc.returncode, tail


def ingest(data: Path, run: Path) -> tuple[float, float]:
    """``rglf ingest`` in its own process: (seconds, peak RSS MiB)."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [*RGLF, "ingest", str(data), "--image-root", str(data.parent), "--run", str(run), "--quiet"]
    seconds, peak, code, tail = peak_rss_mb(cmd)
    if code != 0:
        raise RuntimeError(f"ingest failed ({code}): {' '.join(cmd)}\n{tail}")
    return seconds, peak


def feedback_parts(run: Path) -> int:
    folder = run / "feedback"
    return sum(1 for p in folder.iterdir() if p.name.startswith("part-")) if folder.is_dir() else 0


def score_until(run: Path, *, cpus: int, seconds_after_first: float, timeout: float, extra: Sequence[str] = ()) -> dict:
    """Start ``rglf score``, time its first committed part, let it run, Ctrl-C it; return the figures."""
    temp = tempfile.mkdtemp(prefix="/tmp/rglf-bj-")
    from rglf.model.toy import DEFAULT_CHECKPOINT

    cmd = [*RGLF, "score", "--run", str(run), "--model", str(DEFAULT_CHECKPOINT), "--num-cpus", str(cpus),
           "--object-store-mb", "300",
           "--ray-temp-dir", temp, *extra]
    before = feedback_parts(run)  # a resumed run (a later round) counts only its own new parts
    start = time.perf_counter()
    # SIGINT back to its default in the child: a benchmark started in the background of a
    # non-interactive shell (`nohup ... &`) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler -- the Ctrl-C below would be lost and the run go on to the end
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = latest = None  # seconds from the start to the first / the latest new part seen
    parts = parts_at_first = before
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout:
            now_parts = feedback_parts(run)
            if now_parts > parts:
                parts, latest = now_parts, time.perf_counter() - start
                if first is None:
                    first, parts_at_first = latest, now_parts
            if first is not None and time.perf_counter() - start - first >= seconds_after_first:
                break
            time.sleep(0.05)
        interrupted = time.perf_counter()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        stop_s = time.perf_counter() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    last = (record.get("history") or [{}])[-1]
    # steady rate: the parts committed after the first one, over the time between the first and the
    # last one seen (a run that finishes inside the window is not charged its end-of-job work)
    batch = 16
    rate = (parts - parts_at_first) * batch / (latest - first) if first is not None and latest > first else None
    return {
        "first_batch_s": first, "samples_per_s": rate, "idle_share": last.get("idle_share"),
        "planning_s": last.get("planning_seconds"), "exit": proc.returncode, "stop_s": stop_s,
        "status": last.get("status"), "stderr_tail": err.decode(errors="replace").strip().splitlines()[-1:],
    }


def synthesize_done(run: Path, fraction: float, batch: int = 16, start_at: int = 0) -> int:
    """Mark samples ``[start_at, fraction * n)`` done by writing feedback / router-input parts like the scorer's.

    The router features are a few bytes (planning never reads them; the index computes their size
    from ``n_crops``, ``grid``, ``vision_hidden``); files are written without fsync (a benchmark).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rglf.model.tables import FEEDBACK_SCHEMA, ROUTER_INPUTS_SCHEMA
    from rglf.pipeline.writer import part_path

    ids = pq.read_table(run / "samples", columns=["sample_id"]).column("sample_id").to_pylist()
    n = int(len(ids) * fraction)
    levels = (36, 72, 144, 288, 576)
    (run / "feedback").mkdir(parents=True, exist_ok=True)
    (run / "router_inputs").mkdir(parents=True, exist_ok=True)
    features = b"\0" * 8
    for start in range(start_at - start_at % batch, n, batch):
        chunk = ids[start : start + batch]
        key = f"bench{start:012d}"
        fb = pa.table({
            "sample_id": [s for s in chunk for _ in levels], "source": ["synthetic"] * (len(chunk) * 5),
            "split": [None] * (len(chunk) * 5), "level_tokens": [t for _ in chunk for t in levels],
            "level_grid": ["6x6"] * (len(chunk) * 5), "n_crops": [2] * (len(chunk) * 5),
            "n_visual_tokens": [100] * (len(chunk) * 5), "answer_tokens": [3] * (len(chunk) * 5),
            "nll_sum": [0.3] * (len(chunk) * 5), "nll_mean": [0.1] * (len(chunk) * 5),
            "greedy_match": [True] * (len(chunk) * 5), "model_id": ["bench"] * (len(chunk) * 5),
        }, schema=FEEDBACK_SCHEMA)
        ri = pa.table({
            "sample_id": chunk, "n_crops": [2] * len(chunk), "grid": [24] * len(chunk),
            "vision_hidden": [64] * len(chunk), "vision_features": [features] * len(chunk),
            "instruction_ids": [[1, 2, 3]] * len(chunk), "image_size": [[96, 96]] * len(chunk),
        }, schema=ROUTER_INPUTS_SCHEMA)
        pq.write_table(ri, part_path(run, "router_inputs", key))
        pq.write_table(fb, part_path(run, "feedback", key))
    return n


def planning_seconds(run: Path) -> tuple[float, float, int]:
    """(fresh index, warm index, parts read when fresh): ``RunIndex.load`` + ``plan_run``, in this process."""
    from rglf.pipeline.score import plan_run
    from rglf.pipeline.writer import INDEX_DIR, RunIndex

    shutil.rmtree(run / INDEX_DIR, ignore_errors=True)
    levels = [36, 72, 144, 288, 576]
    times = []
    parts = 0
    for _ in range(2):
        start = time.perf_counter()
        index = RunIndex.load(run)
        plan_run(run, index, levels, lambda _: None)
        times.append(time.perf_counter() - start)
        parts = parts or index.parts_read
    return times[0], times[1], parts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,665000", help="Record counts, comma-separated.")
    parser.add_argument("--rss-sizes", default="66000,665000", help="Record counts of the ingest peak-RSS comparison.")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance.")
    parser.add_argument("--score-seconds", type=float, default=60.0, help="Scoring time after the first batch.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up waiting for a first batch after this.")
    parser.add_argument("--rounds", type=int, default=2, help="Scoring measurements per size, interleaved.")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args(list(argv) if argv is not None else None)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    work = Path(args.work or tempfile.mkdtemp(prefix="rglf-bench-job-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_job: sizes {sizes}, {args.cpus} CPUs, {args.score_seconds:.0f} s of scoring each; work folder {work}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    try:
        rows = {}
        for n in sorted(set(sizes) | set(rss_sizes)):
            data = write_records(work / f"data-{n}", n)
            run = work / f"run-{n}"
            seconds, peak = ingest(data, run)
            rows[n] = {"ingest_s": seconds, "ingest_rss_mb": peak, "json_mb": data.stat().st_size / 2**20}
            print(f"  {n:>7,} records ({rows[n]['json_mb']:.0f} MB JSON): ingest {seconds:.1f} s, peak RSS {peak:.0f} MiB",
                  flush=True)
        # scoring: the sizes in turn, ``--rounds`` times (a shared machine's load drifts: each size
        # sees every phase of it); figures are the means over the rounds
        for rnd in range(args.rounds):
            for n in sizes:
                r = score_until(work / f"run-{n}", cpus=args.cpus, seconds_after_first=args.score_seconds,
                                timeout=args.timeout)
                rows[n].setdefault("rounds", []).append(r)
                rate = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.2f}"
                first = "none" if r["first_batch_s"] is None else f"{r['first_batch_s']:.1f} s"
                idle = "-" if r["idle_share"] is None else f"{100 * r['idle_share']:.0f}%"
                print(f"  {n:>7,} (round {rnd + 1}): first committed batch {first}, {rate} samples/s, scheduler idle "
                      f"{idle}, Ctrl-C -> exit {r['exit']} in {r['stop_s']:.1f} s ({r['status']}; load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
        for n in sizes:
            for key in ("first_batch_s", "samples_per_s", "idle_share"):
                values = [r[key] for r in rows[n]["rounds"] if r[key] is not None]
                rows[n][key] = sum(values) / len(values) if values else None
        for n in sizes:
            run = work / f"run-{n}"
            for sub in ("feedback", "router_inputs", "errors", "index"):
                shutil.rmtree(run / sub, ignore_errors=True)
            (run / "run.json").unlink(missing_ok=True)
            done = 0
            for fraction in (0.0, 0.5, 1.0):
                done = synthesize_done(run, fraction, start_at=done)
                fresh, warm, parts = planning_seconds(run)
                rows[n][f"plan_{int(fraction * 100)}"] = (fresh, warm)
                print(f"  {n:>7,}: planning at {100 * fraction:.0f}% done: {warm:.2f} s (index warm), "
                      f"{fresh:.2f} s (index rebuilt from {parts:,} parts)", flush=True)
        base = rows[sizes[0]]
        print("\nsize      first batch  vs 1k   samples/s  vs 1k   idle   plan 0/50/100% (warm)   ingest RSS")
        for n in sizes:
            r = rows[n]
            fb = r.get("first_batch_s")
            ratio = f"{fb / base['first_batch_s']:.2f}x" if fb and base.get("first_batch_s") else "-"
            sps = r.get("samples_per_s")
            sratio = f"{sps / base['samples_per_s']:.2f}x" if sps and base.get("samples_per_s") else "-"
            plans = "/".join(f"{r[f'plan_{p}'][1]:.2f}" for p in (0, 50, 100))
            print(f"{n:>7,}   {fb or float('nan'):>8.1f} s  {ratio:>6}  {sps or float('nan'):>9.2f}  {sratio:>6}   "
                  f"{100 * (r.get('idle_share') or 0):>3.0f}%   {plans:>20} s   {r['ingest_rss_mb']:>6.0f} MiB")
        print(f"(load average at the end {os.getloadavg()[0]:.1f}, 15-minute {os.getloadavg()[2]:.1f})")
        if len(rss_sizes) == 2:
            a, b = (rows[n]["ingest_rss_mb"] for n in rss_sizes)
            print(f"ingest peak RSS {rss_sizes[0]:,} vs {rss_sizes[1]:,} records: {a:.0f} vs {b:.0f} MiB "
                  f"({b / a:.2f}x; goal <= 1.20x)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
