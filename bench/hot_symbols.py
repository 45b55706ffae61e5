#!/usr/bin/env python
"""Regenerate link/hot-symbols.txt: every function of the supervisor that steady work runs,
which build.rs has the linker place side by side (docs/architecture.md, "Resident code").

Runs the release supervisor under valgrind's callgrind, on Redis and then on RabbitMQ, with
instrumentation off through start-up and on for a fixed round of steady work: a no-op drain,
tasks storing results, round trips, a paced trickle, a remote-control ping and idle seconds
(heartbeats, gossip, timers). callgrind sees every function that runs, not only the ones a
sampling profiler happens to hit: one missing function costs a whole 64 KiB run of the binary
resident. The list puts the functions both brokers run first, then the Redis-only ones, then
the RabbitMQ-only ones, each group hottest first, so a worker maps only its own broker's part.

Needs valgrind and a release build; takes about two minutes. Re-run it after a Rust toolchain
or dependency update: symbol names carry hashes that change with them, and names the linker no
longer finds are skipped without a word (the code still works, only less of it is packed).

    .venv/bin/python bench/hot_symbols.py [--bin target/release/celeriac]
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

OUT = run.ROOT / "link" / "hot-symbols.txt"
# `fn=(id) name`, `ob=(id) path` and their call-site twins, names given once per id.
NAME_LINE = re.compile(r"^(ob|cob|fn|cfn|fl|fi|fe|cfl|cfi)=\((\d+)\)(?: (.*))?$")


def steady_work(app, broker):
    broker.append("noop", (0,), 3000)
    while broker.ready() > 0:
        time.sleep(0.1)
    for r in [app.add.delay(i, i) for i in range(300)]:
        r.get(timeout=120)
    for r in [app.result_10k.delay(i) for i in range(100)]:
        r.get(timeout=120)
    for _ in range(50):
        app.add.delay(1, 1).get(timeout=30)
    for _ in range(200):
        app.stamp.delay()
        time.sleep(0.02)
    app.app.control.ping(timeout=2)
    time.sleep(12)


def callgrind_control(pid, *flags):
    subprocess.run(["callgrind_control", *flags, str(pid)], check=True, capture_output=True)


def profile(binary, broker_kind, outdir):
    """callgrind's output file for one round of steady work on one broker."""
    app = run.benchapp(run.BROKER_URLS[broker_kind])
    broker = run.RedisBroker(app) if broker_kind == "redis" else run.AmqpBroker(app)
    broker.fill("noop", (0,), 1)  # makes the message template
    broker.purge()
    out = Path(outdir) / f"{broker_kind}.callgrind"
    wrapper = Path(outdir) / "celeriac"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --demangle=no "
                       f"--callgrind-out-file={out} {binary.resolve()} \"$@\"\n")
    wrapper.chmod(0o755)
    w = run.Worker("celeriac", wrapper, broker.url, outdir)
    try:
        assert app.add.delay(1, 1).get(timeout=180) == 2, "the worker under valgrind did not start"
        time.sleep(2)
        callgrind_control(w.proc.pid, "-i", "on")
        steady_work(app, broker)
        callgrind_control(w.proc.pid, "-i", "off")
        callgrind_control(w.proc.pid, "-d")
    finally:
        w.stop()
    dumps = sorted(Path(outdir).glob(f"{out.name}.*"))
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump for {broker_kind}: see {w.logpath}")
    return dumps[-1]


def self_cost(path, executable):
    """{mangled function name: instructions run in it} for the functions of `executable`."""
    objects, names, cost = {}, {}, collections.Counter()
    current_object = current = None
    after_call = False
    for line in Path(path).read_text(errors="replace").splitlines():
        m = NAME_LINE.match(line)
        if m:
            kind, ident, name = m.groups()
            if kind in ("ob", "cob"):
                objects[ident] = name or objects.get(ident)
                if kind == "ob":
                    current_object = objects[ident]
            elif kind in ("fn", "cfn"):
                names[ident] = name or names.get(ident)
                if kind == "fn":
                    current, after_call = (current_object, names[ident]), False
            continue
        if line.startswith("calls="):
            after_call = True  # the next cost line is the callee's, not this function's
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            if after_call:
                after_call = False
            elif len(fields) >= 2 and current and current[0] == executable:
                # callgrind marks recursion depth with 'N; the symbol is the same.
                cost[re.sub(r"'\d+$", "", current[1])] += int(fields[1])
    return cost


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=run.ROOT / "target" / "release" / "celeriac")
    args = ap.parse_args()
    executable = str(args.bin.resolve())
    outdir = tempfile.mkdtemp(prefix="celeriac-hot-")
    redis = self_cost(profile(args.bin, "redis", outdir), executable)
    amqp = self_cost(profile(args.bin, "amqp", outdir), executable)
    both = collections.Counter({n: redis[n] + amqp[n] for n in redis.keys() & amqp.keys()})
    groups = [both, collections.Counter({n: c for n, c in redis.items() if n not in amqp}),
              collections.Counter({n: c for n, c in amqp.items() if n not in redis})]
    defined = set(subprocess.run(["nm", "--defined-only", "-j", executable], capture_output=True, text=True,
                                 check=True).stdout.split())
    names = [name for group in groups for name, c in group.most_common() if c > 0 and name in defined]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(f"{name}\n" for name in names))
    print(f"{len(names)} functions written to {OUT.relative_to(run.ROOT)} "
          f"({len(groups[0])} both brokers, {len(groups[1])} Redis only, {len(groups[2])} RabbitMQ only)")


if __name__ == "__main__":
    main()
