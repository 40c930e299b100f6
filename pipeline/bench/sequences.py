"""The sequence benchmark (``configs/bench-seq.toml``): samples of their own length through a small
transformer encoder, fed every way a user would, on the same samples and weights.

  serial             one process, input order, each batch of B padded to its longest (a padding collate)
  serial.sorted      one process, timed whole: lengths, a sort, batches of B, padding, compute, unsort
  pipeline           the pipeline, ``order = "input"``, batches of B
  pipeline.length    the pipeline, ``order = "length"``, batches of B
  pipeline.tokens    the pipeline, ``order = "length"`` and ``max_tokens`` (no row cap)
  DataLoader         ``DataLoader(num_workers=N, batch_size=B, collate_fn=pad)``; the main computes
  DataLoader.grouped the same with a length-grouped batch sampler (HF Trainer's ``group_by_length``:
                     mega-batches of 50 x B shuffled (seeded), each sorted by length)
  ray.data           Ray Data: ``range(n)`` -> ``map_batches`` (fetch and pad B samples) -> ``map_batches``
                     (the model) on an actor pool of N actors (if ``ray[data]`` is installed)

The model alone: the pipeline.tokens batches built beforehand, computed in one process with one thread
(times N workers), and with every usable thread; the better is the ceiling the pipeline is held to on this
machine. Per-batch compute times of the same, and of batches of B sorted by length, give the p90/p10 spread.
Rows: real tokens/s, docs/s, the padding share of computed tokens, agreement with serial (the embeddings,
in input order). Worker start-up is kept out of every timing (each mode warms up first).
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from .. import devices, kernels
from ..compute import Computer
from ..outputs import max_rel_diff
from ..sources.plan import Sequences, make_plan
from .ray_modes import rows_after_warmup
from .report import machine

DEVICE = [torch.device("cpu")]  # where serial, DataLoader and the model alone compute (the run's device)
GOALS = {"padding_length": 0.05, "vs_DataLoader": 3.0, "vs_grouped": 1.1, "vs_serial_sorted": 1.1,
         "vs_model_alone": 0.9, "p90_p10": 2.0}
DATASET = "pipeline.bench.sequences:SeqDataset"
MODES = ("serial", "serial.sorted", "pipeline", "pipeline.length", "pipeline.tokens", "DataLoader",
         "DataLoader.grouped", "ray.data")


class SeqDataset(torch.utils.data.Dataset):
    """``n`` token sequences, lengths lognormal in ``lo .. hi`` (like text: most short, a long tail); sample i
    is ``{"input_ids": int64 (L,)}``, a function of (seed, i); ``lengths()`` without building one."""

    def __init__(self, n: int = 20000, vocab: int = 8000, lo: int = 5, hi: int = 512, median: float = 60.0,
                 sigma: float = 0.9, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.L = np.clip(rng.lognormal(math.log(median), sigma, n).astype(np.int64), lo, hi)
        self.vocab, self.seed = vocab, seed

    def __len__(self):
        return len(self.L)

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        return {"input_ids": rng.integers(1, self.vocab, int(self.L[i]), dtype=np.int64)}

    def lengths(self):
        return self.L


class Encoder:
    """A seeded ``torch.nn.TransformerEncoder`` with the key padding mask, mean-pooled over each row's real
    tokens: ``{"input_ids": (B, L), "lengths": (B,)}`` -> ``{"embedding": (B, d_model)}``. The nested-tensor
    fast path is off, so padding costs what it costs in a Hugging Face BERT."""

    def setup(self, device, d_model: int = 128, heads: int = 4, layers: int = 2, vocab: int = 8000, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(vocab, d_model, padding_idx=0).to(device).eval()
            layer = torch.nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device).eval()

    @torch.inference_mode()
    def __call__(self, batch):
        ids, lengths = batch["input_ids"], batch["lengths"]
        pad = torch.arange(ids.shape[1], device=ids.device)[None, :] >= lengths[:, None]
        h = self.enc(self.embed(ids), src_key_padding_mask=pad)
        h = h.masked_fill(pad[..., None], 0.0)
        return {"embedding": h.sum(1) / lengths[:, None].clamp(min=1).to(h.dtype)}


def pad(samples: list) -> dict:
    """A padding collate (as ``DataCollatorWithPadding``): each batch padded to its longest, with lengths."""
    n = [len(s["input_ids"]) for s in samples]
    ids = np.zeros((len(samples), max(n)), np.int64)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = s["input_ids"]
    return {"input_ids": ids, "lengths": np.asarray(n, np.int64)}


def grouped(lengths: np.ndarray, batch_size: int, seed: int = 0, mega: int = 50) -> list[list[int]]:
    """HF Trainer's length-grouped batches: a seeded shuffle, mega-batches of ``mega`` x B, each sorted by
    length (longest first), cut into batches of B."""
    perm = np.random.default_rng(seed).permutation(len(lengths))
    out = []
    for lo in range(0, len(perm), mega * batch_size):
        chunk = perm[lo:lo + mega * batch_size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return out


def _computer(spec, threads: int):
    torch.set_num_threads(threads)
    return Computer(spec, DEVICE[0], False)


def _embeddings(parts: list, order=None) -> np.ndarray:
    e = np.concatenate([p["embedding"] for p in parts])
    if order is None:
        return e
    out = np.empty_like(e)
    out[order] = e
    return out


def _padded(batches: list[list[int]], lengths: np.ndarray) -> tuple[int, int]:
    """(real, computed) tokens of batches padded to their longest."""
    real = int(lengths.sum())
    return real, int(sum(len(b) * lengths[b].max() for b in batches))


def serial(ds, spec, B: int, threads: int, sort: bool):
    comp = _computer(spec, threads)
    comp(pad([ds[0]]))
    t0 = time.perf_counter()
    order = np.argsort(ds.lengths(), kind="stable") if sort else np.arange(len(ds))
    batches = [order[i:i + B].tolist() for i in range(0, len(ds), B)]
    parts = [comp(pad([ds[i] for i in b]))[0] for b in batches]
    emb = _embeddings(parts, order if sort else None)
    return emb, time.perf_counter() - t0, _padded(batches, ds.L)


def run_pipeline(ds, spec, B: int, workers: int, order: str, max_tokens: int):
    import pipeline
    kw = dict(source=ds, batch_size=B if not max_tokens else 0, order=order, max_tokens=max_tokens,
              progress=False)
    with pipeline.Pipeline(kernel=spec.name, workers=workers, **{"kernel.params": dict(spec.params)}) as p:
        p.run(source=_Head(ds, 4 * B * workers), batch_size=B, progress=False)  # the workers' kernels set up
        t0 = time.perf_counter()
        r = p.run(**kw)
        seconds = time.perf_counter() - t0
    s = r.summary["sequences"]
    return _embeddings(r.results), seconds, (s["real_tokens"], s["padded_tokens"])


class _Head(torch.utils.data.Dataset):
    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]

    def lengths(self):
        return self.ds.L[:self.n]


def dataloader(ds, spec, B: int, workers: int, threads: int, group: bool):
    comp = _computer(spec, threads)
    sampler = grouped(ds.L, B) if group else [list(range(i, min(i + B, len(ds)))) for i in range(0, len(ds), B)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=pad,
                                         persistent_workers=True, prefetch_factor=4)
    it = iter(loader)
    comp(next(it))  # warm: the loader's workers up, the kernel set up
    del it
    t0 = time.perf_counter()
    parts = [comp(b)[0] for b in loader]
    order = np.concatenate(sampler)
    return _embeddings(parts, order), time.perf_counter() - t0, _padded(sampler, ds.L)


def ray_data(ds, spec, B: int, workers: int):
    import ray
    import ray.data
    from ..ray_backend import start_local_ray
    start_local_ray(workers + 2)  # (the actors take one CPU each; the fetch tasks need some too)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False

    def fetch(batch):
        samples = [ds[int(i)] for i in batch["id"]]
        out = pad(samples)
        return {"input_ids": list(out["input_ids"]), "lengths": out["lengths"], "id": batch["id"]}

    class Model:
        def __init__(self):
            self.comp = _computer(spec, 1)

        def __call__(self, batch):
            ids = np.stack(batch["input_ids"]) if batch["input_ids"].dtype == object else batch["input_ids"]
            e = self.comp({"input_ids": ids, "lengths": batch["lengths"]})[0]["embedding"]
            return {"embedding": e, "id": batch["id"]}

    warm = list(range(2 * B * workers))  # (the actors start and warm up before the timing)
    out, seconds, _ = rows_after_warmup(ray.data.from_items([{"id": i} for i in warm + list(range(len(ds)))])
                                        .map_batches(fetch, batch_size=B).map_batches(
        Model, batch_size=B, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1), len(warm))
    ray.shutdown()
    emb = np.stack([r["embedding"] for r in out])
    ids = np.asarray([r["id"] for r in out])
    e = np.empty_like(emb)
    e[ids] = emb
    batches = [list(range(i, min(i + B, len(ds)))) for i in range(0, len(ds), B)]
    return e, seconds, _padded(batches, ds.L)


def model_alone(ds, spec, seq: Sequences, B: int, workers: int, threads: int, fixed: bool = True) -> dict:
    """The model on the pipeline.tokens batches built beforehand: tokens/s on one thread x workers, and on
    every thread; per-batch compute times (p90/p10) for those batches and for sorted batches of B."""
    out = {}
    plans = [("tokens", make_plan(ds.L, seq, 0))]
    if fixed:  # (batches of B sorted by length: their per-batch spread, once)
        plans.append(("fixed", make_plan(ds.L, Sequences(order="length"), B)))
    for name, plan in plans:
        batches = []
        for k in range(plan.n):
            ids = plan.ids(k)
            w = int(plan.widths[k])
            x = np.zeros((len(ids), w), np.int64)
            for row, i in enumerate(ids):
                x[row, :ds.L[i]] = ds[i]["input_ids"]
            batches.append({"input_ids": x, "lengths": ds.L[ids].copy()})
        real = int(ds.L.sum())
        for t in sorted({1, threads}) if name == "tokens" else [1]:
            comp = _computer(spec, t)
            comp(batches[0])
            times = []
            for b in batches:
                t0 = time.perf_counter()
                comp(b)
                times.append(time.perf_counter() - t0)
            out[f"{name}_threads{t}_tokens_per_s"] = round(real / sum(times), 1)
            if t == 1:
                q = np.percentile(times, [10, 90])
                out[f"{name}_p90_p10"] = round(float(q[1] / q[0]), 2)
    out["ceiling_tokens_per_s"] = max(out["tokens_threads1_tokens_per_s"] * workers,
                                      out[f"tokens_threads{threads}_tokens_per_s"])
    return out


SLOW = ("serial", "pipeline", "DataLoader", "ray.data")  # mostly padding: run once (the others --repeat times)


def interleaved(modes: list[str], one, alone, repeat: int, slow: tuple) -> dict:
    """Each slow mode once, then ``repeat`` rounds of the model alone and every other mode, one after the
    other (this machine's speed drifts: the ratios that matter are measured side by side), then ray.data
    (Ray's processes take a while to go after it); each mode's median seconds, with its first run's
    embeddings and padding."""
    got: dict = {m: [one(m)] for m in modes if m in slow and m != "ray.data"}
    for _ in range(repeat):
        alone()
        for m in modes:
            if m not in slow:
                got.setdefault(m, []).append(one(m))
    if "ray.data" in modes:
        got["ray.data"] = [one("ray.data")]
    return {m: (r[0][0], statistics.median(x[1] for x in r), r[0][2]) for m, r in got.items()}


def run_seq_bench(cfg, modes: list[str], workers: int, repeat: int = 1) -> dict:
    params = dict(cfg.source.params)
    ds = SeqDataset(**params)
    spec = kernels.spec_for(cfg.kernel.name, dict(cfg.kernel.params), cfg.kernel.precision)
    B, T = cfg.source.batch_size or 32, cfg.source.max_tokens or 4096
    threads = devices.usable_cpus()
    DEVICE[0] = devices.choose(cfg.workers.device, 0)
    def one(mode):
        if mode in ("serial", "serial.sorted"):
            return serial(ds, spec, B, threads, mode == "serial.sorted")
        if mode.startswith("pipeline"):
            order = "input" if mode == "pipeline" else "length"
            return run_pipeline(ds, spec, B, workers, order, T if mode == "pipeline.tokens" else 0)
        if mode.startswith("DataLoader"):
            return dataloader(ds, spec, B, workers, threads, mode == "DataLoader.grouped")
        return ray_data(ds, spec, B, workers)

    alone_runs = []

    def alone():
        alone_runs.append(model_alone(ds, spec, Sequences(max_tokens=T, order="length"), B, workers, threads,
                                      fixed=not alone_runs))
    runs = interleaved(modes, one, alone, repeat, SLOW)
    alone_fig = {k: statistics.median(a[k] for a in alone_runs if k in a) for k in alone_runs[0]}
    ref = runs.get("serial", next(iter(runs.values())))[0]
    real = int(ds.L.sum())
    rows = []
    for mode, (emb, seconds, (r, padded)) in runs.items():
        rows.append({"mode": mode, "workers": 0 if mode.startswith("serial") else workers,
                     "seconds": round(seconds, 3), "docs_per_s": round(len(ds) / seconds, 1),
                     "tokens_per_s": round(real / seconds, 1), "padding_share": round(1 - r / padded, 4),
                     "max_rel_diff_vs_serial": max_rel_diff([emb], [ref]),
                     "agrees": max_rel_diff([emb], [ref]) <= 1e-3})
    alone = alone_fig
    return {"repeat": repeat, "machine": machine(), "config": cfg.to_dict(), "samples": len(ds), "real_tokens": real,
            "median_length": float(np.median(ds.L)), "batch_size": B, "max_tokens": T, "workers": workers,
            "results": rows, "model_alone": alone, "goals": goals(rows, alone)}


def goals(rows: list[dict], alone: dict) -> dict:
    by = {r["mode"]: r for r in rows}
    out = {}
    best = by.get("pipeline.tokens")
    if "pipeline.length" in by:
        out["padding_length"] = (by["pipeline.length"]["padding_share"], GOALS["padding_length"])
    if best:
        for key, peer in (("vs_DataLoader", "DataLoader"), ("vs_grouped", "DataLoader.grouped"),
                          ("vs_serial_sorted", "serial.sorted")):
            if peer in by:
                out[key] = (round(best["tokens_per_s"] / by[peer]["tokens_per_s"], 3), GOALS[key])
        out["vs_model_alone"] = (round(best["tokens_per_s"] / alone["ceiling_tokens_per_s"], 3),
                                 GOALS["vs_model_alone"])
    out["p90_p10"] = (alone["tokens_p90_p10"], GOALS["p90_p10"])
    return {k: {"measured": v, "goal": g, "met": (v <= g) if k in ("padding_length", "p90_p10") else v >= g}
            for k, (v, g) in out.items()}


def table(report: dict) -> str:
    lines = [f"{report['samples']} samples, {report['real_tokens']} real tokens (median length "
             f"{report['median_length']:.0f}), batch {report['batch_size']}, max_tokens {report['max_tokens']}, "
             f"{report['workers']} workers",
             f"{'mode':<20}{'tokens/s':>11}{'docs/s':>9}{'padding':>9}{'agrees':>8}{'seconds':>9}"]
    for r in report["results"]:
        lines.append(f"{r['mode']:<20}{r['tokens_per_s']:>11,.0f}{r['docs_per_s']:>9,.1f}"
                     f"{r['padding_share']:>8.1%}{'yes' if r['agrees'] else 'NO':>8}{r['seconds']:>9.2f}")
    a = report["model_alone"]
    lines.append(f"model alone on the pipeline.tokens batches: {a['ceiling_tokens_per_s']:,.0f} tokens/s (ceiling); "
                 f"per-batch p90/p10 {a['tokens_p90_p10']} with max_tokens, {a['fixed_p90_p10']} with batches of "
                 f"{report['batch_size']}")
    for k, g in report["goals"].items():
        lines.append(f"goal {k}: {g['measured']} (goal {g['goal']}) {'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)

