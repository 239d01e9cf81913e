"""Aaren over long streams: the compiled artifact's state after many tokens, and what fp32 does to the
running sums past 2^24 = 16,777,216 tokens.

Each layer and head carries m (running max score), c (sum of e^{s-m}: at most the token count) and a (sum of
v e^{s-m}). In fp32, c + w rounds w to a multiple of ulp(c) = c * 2^-23 (roughly); once c reaches 2^24 an
increment of 1 (a token at the running max) is a tie and rounds back down: c stops counting. a does not stop
with it when the values average near zero (|a| stays far below c), so the output a / c drifts. The model keeps
c and a as Kahan pairs (c = sum.c{j} - carry.c{j}, likewise a), the carry holding what rounding dropped, so
they go on counting; the checks below read the pairs' values, and the simulation runs the plain fp32 sums
(the model before the pairs) next to the compensated ones.

    python examples/aaren/long_stream_probe.py BUNDLE [--frames N] [--chunk K]   # prints the JSON of all three checks
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from edgekit.artifact import load
from edgekit.runtime import Session
from edgekit.measure import WINDOW, FrameSource

FP32_EXACT_COUNT = 2**24  # 16,777,216: the last integer n with n + 1 exact in float32


def _read_state(session) -> dict[str, np.ndarray]:
    return session.read_state()


def _write_state(session, state: dict[str, np.ndarray]) -> None:
    session.write_state(state)


def _layers(state: dict[str, np.ndarray]) -> list[int]:
    return sorted(int(k[1:]) for k in state if k.startswith("m") and k[1:].isdigit())


def _pair(state: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The value of the Kahan pair sum.<name>, carry.<name> (c{j}, a{j}, a running mean's sum or count), float64."""
    return state[f"sum.{name}"].astype(np.float64) - state[f"carry.{name}"].astype(np.float64)


def _set_pair(state: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
    """The pair set to value rounded to fp32, nothing carried."""
    state[f"sum.{name}"] = value.astype(np.float32)
    state[f"carry.{name}"] = np.zeros_like(state[f"sum.{name}"])


def summarize_state(state: dict[str, np.ndarray], tokens: int) -> dict:
    """Per layer: range of m, range of c (and c / tokens, the mean weight e^{s-m}), max |a| and |a / c|."""
    out = {"tokens": tokens, "finite": bool(all(np.isfinite(v).all() for v in state.values())), "layers": {}}
    for j in _layers(state):
        m, c, a = state[f"m{j}"], _pair(state, f"c{j}"), _pair(state, f"a{j}")
        out["layers"][j] = {"m": [float(m.min()), float(m.max())], "c": [float(c.min()), float(c.max())],
                            "c_per_token": [float(c.min()) / tokens, float(c.max()) / tokens],
                            "max_abs_a": float(np.abs(a).max()),
                            "max_abs_a_over_c": float(np.abs(a / c[..., None]).max())}
    if "sum.count" in state:
        out["count"] = float(_pair(state, "count").reshape(-1)[0])
    return out


def _vs_float64(got: dict[str, np.ndarray], want: dict[str, np.ndarray], j: int) -> dict:
    """Layer j's c (relative), output a / c and m (absolute) against the float64 state, max over heads."""
    c, c64 = _pair(got, f"c{j}"), _pair(want, f"c{j}")
    return {"c_rel_error": float(np.abs(c / c64 - 1).max()),
            "output_abs_error": float(np.abs(_pair(got, f"a{j}") / c[..., None]
                                             - _pair(want, f"a{j}") / c64[..., None]).max()),
            "m_abs_error": float(np.abs(got[f"m{j}"] - want[f"m{j}"]).max())}


def long_stream_state(bundle_path: Path, frames: int = 1_000_000, chunk: int = 16, seed: int = 0,
                      marks: tuple[int, ...] = (100_000, 1_000_000), reference: bool = True) -> dict:
    """Stream the compiled artifact over `frames` frames; at each mark, its state (finite? c, m, a ranges) and,
    with `reference`, the relative error of c and of the attention output a / c against the float64 model
    carried through the same stream. Also whether every output along the way was finite."""
    import torch

    bundle = load(Path(bundle_path))
    session, source = Session(bundle), FrameSource(bundle.manifest["input"]["shape"][-1], seed)
    net = state64 = None
    if reference:
        from edgekit.models import from_bundle as reference_model

        net = reference_model(bundle)
        state64 = net.init_state(1)
    outputs_finite, results, step = True, [], max(chunk, WINDOW // chunk * chunk)
    for start in range(0, frames, step):
        stop = min(frames, start + step)
        x = source.frames(start, stop)
        y = session.feed(x, chunk)
        outputs_finite &= bool(all(np.isfinite(v).all() for v in y.values()))
        if net is not None:
            with torch.no_grad():
                _, state64 = net.step_chunk(torch.from_numpy(x).double(), state64)
        for mark in marks:
            if start < mark <= stop:
                got = _read_state(session)
                row = summarize_state(got, stop)
                if net is not None:
                    want = {k: v.numpy() for k, v in state64.items()}
                    row["vs_float64"] = {f"layer{j}": _vs_float64(got, want, j) for j in row["layers"]}
                results.append(row)
    return {"bundle": str(bundle.path), "frames": frames, "chunk": chunk, "seed": seed,
            "outputs_finite": outputs_finite, "checkpoints": results}


def saturation_probe(bundle_path: Path, c_value: float = FP32_EXACT_COUNT, tokens: int = 256, prefix: int = 4096,
                     seed: int = 0) -> dict:
    """The compiled artifact with its sums set as if ~c_value tokens had been seen: after `prefix` real frames,
    every head's c is set to c_value with a scaled to keep a / c (the outputs) unchanged, and the running mean's
    count to c_value with its sum scaled alike. Then `tokens` more frames, by the step entry and by the largest
    chunk entry, each from that same state; how much c and count grew, against the float64 model from the same
    state, and the logits' max error against it."""
    import torch

    from edgekit.models import from_bundle as reference_model

    bundle = load(Path(bundle_path))
    session, source = Session(bundle), FrameSource(bundle.manifest["input"]["shape"][-1], seed)
    chunks = sorted(e["frames"] for e in bundle.manifest["entries"].values() if e["frames"])
    session.feed(source.frames(0, prefix), chunks[-1])
    state = _read_state(session)
    layers = _layers(state)
    for j in layers:
        scale = c_value / _pair(state, f"c{j}")
        _set_pair(state, f"a{j}", _pair(state, f"a{j}") * scale[..., None])
        _set_pair(state, f"c{j}", np.full_like(scale, c_value))
    if "sum.count" in state:
        count = _pair(state, "count").reshape(-1)[0]
        attention = {f"{x}{j}" for x in "ca" for j in layers}
        for name in {k.removeprefix("sum.") for k in state if k.startswith("sum.")} - attention:  # count, mean sums
            _set_pair(state, name, _pair(state, name) * c_value / count)
    x = source.frames(prefix, prefix + tokens)
    net = reference_model(bundle)
    with torch.no_grad():
        y64, after64 = net.step_chunk(torch.from_numpy(x).double(),
                                      {k: torch.from_numpy(v.astype(np.float64)) for k, v in state.items()})
    after64 = {k: v.numpy() for k, v in after64.items()}

    def growth(after: dict[str, np.ndarray]) -> dict:
        count = {"count_growth": float(_pair(after, "count").reshape(-1)[0]) - c_value} if "sum.count" in state else {}
        return {"c_growth": {f"c{j}": (_pair(after, f"c{j}") - c_value).tolist() for j in layers}, **count}

    result = {"c_value": c_value, "tokens": tokens, "prefix": prefix, "entries": {}, "float64": growth(after64)}
    for chunk in sorted({1, chunks[-1]}):
        _write_state(session, state)
        y = session.feed(x, chunk)
        after = _read_state(session)
        result["entries"][f"chunk{chunk}"] = {
            **growth(after),
            "max_abs_error": {k: float(np.abs(v - y64[k].numpy()).max()) for k, v in y.items()},
            "finite": bool(all(np.isfinite(v).all() for v in [*y.values(), *after.values()]))}
    return result


def _running_sums(total: np.float32, carry: np.float32, terms: np.ndarray, compensated: bool
                  ) -> tuple[np.ndarray, np.float32]:
    """The fp32 sums after each of `terms` added in order to `total`, and the carry after the last: plain
    (np.cumsum in float32 accumulates in order, in float32; the carry stays as it is) or Kahan-compensated as the
    model's state is (a Python loop, about 0.3 us a term)."""
    if not compensated:
        return np.cumsum(np.concatenate([[total], terms]), dtype=np.float32)[1:], carry
    out = np.empty(len(terms), np.float32)
    for i, x in enumerate(terms):
        v = x - carry
        t = total + v
        carry, total = (t - total) - v, t
        out[i] = t
    return out, carry


def simulate_head(tokens: int = 2**25, sigma: float = 1.0, equal_scores: bool = False, mean_value: float = 0.0,
                  shift_at: int | None = None, shifted_mean: float = 1.0, seed: int = 0, block: int = 2**22,
                  chunk: int = 1, compensated: bool = True,
                  checkpoints: tuple[int, ...] = (10**6, 10**7, FP32_EXACT_COUNT, 2**25)) -> dict:
    """One head's step recurrence run as the compiled step does it in fp32 (with `compensated`; without, as it
    did before c and a became Kahan pairs), next to float64, over `tokens` tokens: scores N(0, sigma^2) (or all
    equal), scalar values N(mean_value, 1) (mean `shifted_mean` from token `shift_at` on). While the running max
    stays put the fp32 update is c + w, a + w v in sequence; at a new max both (and their carries) are rescaled
    first. With chunk K > 1, the K weights of each chunk (aligned to multiples of K) are summed in fp32 first and
    that sum is added to c, as the chunk entry does (it scans the chunk, then combines); checkpoints should be
    multiples of K. Returns, at each checkpoint, c in both precisions and the output a / c's error."""
    rng = np.random.default_rng(seed)
    m = -math.inf
    c32 = a32 = dc = da = np.float32(0)
    c64 = a64 = 0.0
    rows, done, marks = [], 0, sorted(k for k in checkpoints if k <= tokens)
    while done < tokens:
        n = min(block, tokens - done)
        s = np.zeros(n) if equal_scores else rng.normal(0.0, sigma, n)
        mu = np.full(n, mean_value)
        if shift_at is not None:
            mu[max(0, shift_at - done):] = shifted_mean
        v = rng.normal(mu, 1.0)
        run_max = np.maximum.accumulate(np.maximum(s, m))
        starts = [0, *np.flatnonzero(np.diff(run_max) > 0) + 1]  # a new running max at each start (but 0)
        c32_all, a32_all = np.empty(n, np.float32), np.empty(n, np.float32)
        c64_all, a64_all = np.empty(n), np.empty(n)
        for i, lo in enumerate(starts):
            hi = starts[i + 1] if i + 1 < len(starts) else n
            new_m = run_max[lo]
            if new_m > m:  # rescale the carried sums to the new max (exp of a non-positive number)
                e = math.exp(m - new_m) if m > -math.inf else 0.0
                c32, a32, dc, da = (np.float32(y * np.float32(e)) for y in (c32, a32, dc, da))
                c64, a64 = c64 * e, a64 * e
                m = new_m
            w32 = np.exp((s[lo:hi] - m).astype(np.float32))
            wv32 = w32 * v[lo:hi].astype(np.float32)
            ends = np.arange(hi - lo)
            if chunk > 1:  # one addition per chunk, at the chunk's last token (the others are not reported)
                ends = np.flatnonzero((np.arange(done + lo, done + hi) + 1) % chunk == 0)
                if not len(ends) or ends[-1] != hi - lo - 1:
                    ends = np.append(ends, hi - lo - 1)
                starts_k = np.concatenate([[0], ends[:-1] + 1])
                w32, wv32 = (np.add.reduceat(w32, starts_k, dtype=np.float32),
                             np.add.reduceat(wv32, starts_k, dtype=np.float32))
                c32_all[lo:hi], a32_all[lo:hi] = np.nan, np.nan
            c_run, dc = _running_sums(c32, dc, w32, compensated)
            a_run, da = _running_sums(a32, da, wv32, compensated)
            c32_all[lo + ends], a32_all[lo + ends] = c_run, a_run
            w64 = np.exp(s[lo:hi] - m)
            c64_all[lo:hi] = c64 + np.cumsum(w64)
            a64_all[lo:hi] = a64 + np.cumsum(w64 * v[lo:hi])
            c32, a32, c64, a64 = c32_all[hi - 1], a32_all[hi - 1], c64_all[hi - 1], a64_all[hi - 1]
        for mark in marks:
            if done < mark <= done + n:
                i = mark - done - 1
                o32, o64 = float(a32_all[i]) / float(c32_all[i]), a64_all[i] / c64_all[i]
                rows.append({"tokens": mark, "c_fp32": float(c32_all[i]), "c_float64": float(c64_all[i]),
                             "c_rel_error": float(c32_all[i]) / c64_all[i] - 1, "output_fp32": o32,
                             "output_float64": o64, "output_abs_error": abs(o32 - o64)})
        done += n
    return {"tokens": tokens, "sigma": sigma, "equal_scores": equal_scores, "mean_value": mean_value,
            "shift_at": shift_at, "shifted_mean": shifted_mean, "seed": seed, "chunk": chunk,
            "compensated": compensated, "checkpoints": rows}


def simulations(tokens: int = 2**25) -> list[dict]:
    """The cases reported: all scores equal (c counts tokens), log-normal weights (sigma 1 and 3), each by the
    step (chunk 1) and the chunk-16 entry, with plain and with compensated sums; the value mean shifting 0 -> 1
    at 2^24 + 2^22 tokens shows whether the state still follows its input."""
    shift = FP32_EXACT_COUNT + 2**22
    cases = [{"equal_scores": True}, {"equal_scores": True, "shift_at": shift}, {"sigma": 1.0},
             {"sigma": 1.0, "shift_at": shift}, {"sigma": 3.0}]
    return [simulate_head(tokens, chunk=chunk, compensated=compensated, **kw)
            for compensated in (False, True) for chunk in (1, 16) for kw in cases]


def main(argv: list[str]) -> None:
    import argparse

    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="examples/aaren/long_stream_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--no-reference", action="store_true", help="skip the float64 state carried alongside")
    p.add_argument("--simulate-tokens", type=int, default=2**25)
    args = p.parse_args(argv)
    marks = tuple(sorted({max(1, args.frames // 10), args.frames}))
    report = {"long_stream": long_stream_state(args.bundle, args.frames, args.chunk, marks=marks,
                                               reference=not args.no_reference),
              "saturation_probe": saturation_probe(args.bundle),
              "simulated_head": simulations(args.simulate_tokens)}
    load(args.bundle).record("long_stream.json", report)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
