#!/usr/bin/env python
"""Regenerate link/hot-symbols.txt: the supervisor's functions that steady work runs, which
build.rs has the linker place side by side (docs/architecture.md, "Resident code").

Runs celeriac alone through the benchmark's scenarios (bench/run.py: drain, results, latency,
round trips, I/O-bound, idle at -c 8) on Redis and RabbitMQ while `perf record` samples the
whole machine, then lists every function of the celeriac executable that was sampled, hottest
first. Needs `perf` and a release build; takes about a minute. Re-run it after a Rust toolchain or
dependency update: symbol names carry hashes that change with them, and names the linker no
longer finds are skipped without a word (the code still works, only less of it is packed).

    .venv/bin/python bench/hot_symbols.py [--bin target/release/celeriac]
"""

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

SCENARIOS = ["drain", "result", "latency", "roundtrip", "io", "memory"]
OUT = run.ROOT / "link" / "hot-symbols.txt"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=run.ROOT / "target" / "release" / "celeriac")
    args = ap.parse_args()
    ctx = run.Context()
    ctx.binary, ctx.logdir = args.bin, tempfile.mkdtemp(prefix="celeriac-hot-")
    ctx.tasks, ctx.io_tasks, ctx.cpu_tasks, ctx.result_tasks, ctx.roundtrips = 50_000, 300, 300, 2000, 200
    ctx.backend = run.redis_client()
    data = Path(ctx.logdir) / "perf.data"
    # The whole machine: the supervisor's threads (lapin's I/O thread among them) come and go
    # with each worker; samples are picked by executable afterwards.
    perf = subprocess.Popen(["perf", "record", "-a", "-F", "4000", "-e", "cpu-clock", "-o", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for broker_kind in ("redis", "amqp"):
            ctx.app = run.benchapp(run.BROKER_URLS[broker_kind])
            broker = run.RedisBroker(ctx.app) if broker_kind == "redis" else run.AmqpBroker(ctx.app)
            for scenario in SCENARIOS:
                getattr(run, scenario)(broker, ctx, "celeriac")
                print(f"{broker_kind} {scenario} done", flush=True)
    finally:
        perf.send_signal(2)
        perf.wait(120)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--no-demangle",
                             "--dsos", args.bin.name, "--sort", "sym", "--stdio", "-F", "sample,sym"],
                            capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in report.splitlines():
        fields = line.split()
        # "  1234  [.] _ZN8celeriac..."
        if len(fields) >= 3 and fields[1] == "[.]" and fields[0].isdigit() and not fields[2].startswith("0x"):
            counts[fields[2]] += int(fields[0])
    defined = set(subprocess.run(["nm", "--defined-only", "-j", str(args.bin)], capture_output=True, text=True,
                                 check=True).stdout.split())
    names = [name for name, _ in counts.most_common() if name in defined]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(f"{name}\n" for name in names))
    print(f"{len(names)} functions written to {OUT.relative_to(run.ROOT)}")


if __name__ == "__main__":
    main()
