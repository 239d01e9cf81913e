"""The memory check of a bank larger than what may sit in RAM: the `bigbank` config (seeded random weights, a
1.15 GiB bank) compiled for this host, then a stream of documents scored in the artifact's own process, each
document fetching its block from the bank first.

    python examples/memlm/bigbank.py --out /tmp/edgekit-bigbank --documents 400 --report /tmp/bigbank.json

Reported: bank bytes; the artifact process's resident memory after start-up, at T/10 and T of the stream and its
peak (VmHWM), against the bank's size; distinct nodes and paths fetched; fetch latency p50/p99 (embedding, tree
walk, memory-mapped read and sha256 check of each node, copy to the device tensor), measured inside the artifact's
process. The bank's pages are dropped from the page cache first (posix_fadvise, this file only), so first reads
of a node come from disk. Checks: peak RSS <= 0.25 x bank bytes, RSS at T within 5 MiB of T/10.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from edgekit import Session, measure
from edgekit.artifact import is_bundle, load
from edgekit.compile import compile
from edgekit.errors import BundleError


def bigbank_bundle(out: Path) -> object:
    """The bigbank bundle at `out`: reused when it is one, else compiled (replacing only an edgekit bundle)."""
    try:
        bundle = load(out)
        if bundle.manifest["model"]["config_name"] == "bigbank":
            return bundle
    except BundleError:
        pass
    t0 = time.perf_counter()
    bundle = compile("memlm", "host", out, config="bigbank", force=is_bundle(out), progress=print)
    print(f"compiled in {time.perf_counter() - t0:.0f} s")
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgekit-bigbank"))
    ap.add_argument("--documents", type=int, default=400)
    ap.add_argument("--document-segments", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", type=Path, default=Path("/tmp/edgekit-bigbank.json"))
    args = ap.parse_args()

    bundle = bigbank_bundle(args.out)
    memory, L = bundle.manifest["memory"], bundle.manifest["segment"]
    bank = bundle.path / memory["bank"]
    fd = os.open(bank, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    session = Session(bundle, isolated=True)
    source, per_doc = measure.TokenSource(args.seed), args.document_segments * L
    marks = measure.rss_marks(args.documents)
    started, rss, seconds, paths = measure.rss_bytes(session.pid), {}, [], []
    t0 = time.perf_counter()
    for doc in range(args.documents):
        tokens = source.tokens(doc * per_doc, (doc + 1) * per_doc)
        got = session.fetch(tokens)
        session.score(tokens)
        seconds.append(float(got["seconds"]))
        paths.append(tuple(int(n) for n in got["path"]))
        if doc + 1 in marks:
            rss[doc + 1] = measure.rss_bytes(session.pid)
    peak = measure.peak_rss_bytes(session.pid)
    mem = measure.memory(rss, args.documents)
    cold = [s for i, s in enumerate(seconds) if paths[i] not in paths[:i]]
    report = {
        "bundle": str(bundle.path), "bank_bytes": memory["bank_bytes"], "nodes": memory["nodes"],
        "node_bytes": memory["node_bytes"], "block_bytes": memory["depth"] * memory["node_bytes"],
        "documents": args.documents, "bytes_per_document": per_doc, "seconds": round(time.perf_counter() - t0, 1),
        "distinct_paths": len(set(paths)), "distinct_nodes": len({n for p in paths for n in p}),
        "rss_bytes": {"after_start": started, **mem["rss_bytes"], "peak": peak},
        "peak_rss_over_bank": peak / memory["bank_bytes"],
        "fetch_us": {q: float(np.percentile(seconds, p) * 1e6) for q, p in (("p50", 50), ("p99", 99))},
        "fetch_us_first_time_paths": {q: float(np.percentile(cold, p) * 1e6) for q, p in (("p50", 50), ("p99", 99))},
        "checks": {"peak_rss_below_quarter_bank": peak <= 0.25 * memory["bank_bytes"], **mem["checks"]},
    }
    report["passed"] = all(report["checks"].values())
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
