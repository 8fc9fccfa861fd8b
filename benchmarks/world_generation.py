"""Demo-world generation speed: documents per minute with and without speech.

Run under the CPU lock so timings are honest on the shared machine:
    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/world_generation.py --docs 2000
Prints one JSON object: median docs/min over --repeats runs, for audio on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from anymodal.data.speech import espeak_available
from anymodal.data.world import generate_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    result = {"docs": args.docs, "repeats": args.repeats, "cpus": os.cpu_count(),
              "espeak": espeak_available()}
    for label, audio in (("with_audio", True), ("without_audio", False)):
        if audio and not result["espeak"]:
            continue
        rates, sizes, counts = [], [], None
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                s = generate_world(d, args.split, docs=args.docs, seed=r, progress=False, audio=audio)
                dt = time.perf_counter() - t0
                rates.append(args.docs / dt * 60)
                sizes.append(sum(os.path.getsize(os.path.join(d, f)) for f in s["shards"]))
                counts = s["counts"]
        result[label] = {"docs_per_minute_median": round(statistics.median(rates)),
                         "docs_per_minute_all": [round(x) for x in rates],
                         "mb_per_1000_docs": round(statistics.median(sizes) / args.docs * 1000 / 1e6, 2),
                         "counts_last_run": counts}
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
