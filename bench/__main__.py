"""``python -m bench`` (= ``make bench``): run every benchmark's ``main()`` in turn, at its defaults.

A benchmark module is imported only when its turn comes (each pulls in heavy dependencies);
one that does not exist yet is skipped with a note, and one that fails is reported without
stopping the others. Exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

# In the order they run: scoring (the LMM), the scoring job at scale, ranking (SQL), router training (vs in-loop
# RGLF, the step vs the matmul peak, peak memory N vs 8N, router-input modes).
BENCHES = ("bench.bench_score", "bench.bench_job", "bench.bench_rank", "bench.bench_train", "bench.bench_step",
           "bench.bench_stream", "bench.bench_modes")


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                print(f"(skipped: {name.replace('.', '/')}.py does not exist yet)")
            else:  # the bench exists but something it imports does not
                traceback.print_exc()
                failed.append(name)
            continue
        start = time.perf_counter()
        try:
            module.main([])
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
