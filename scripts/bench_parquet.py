"""Parquet in, Parquet out: the pipeline against serial, DataLoader and Ray Data on the same table.

    python scripts/bench_parquet.py [--rows 32768] [--batch-size 1024] [--workers 2]
                                    [--modes serial,pipeline,dataloader,ray.data] [--json PATH]
    python scripts/bench_parquet.py --big [--big-gb 4]     # bigger than memory: the main's peak RSS

The input (written once, deterministic, to ``~/.cache/pipeline-bench/``) is N rows of a 1024-float32
vector (a fixed-size list column ``vec``) and an int64 ``id``, in row groups of 8192 rows. Every mode runs
the ``mlp`` kernel (configs/bench-parquet.toml: hidden 1024) on ``vec`` and writes one Parquet file per
batch (the result and the ``id`` of its rows) into a fresh directory:

  serial      ``pipeline.run(workers=0)``: read, compute and write in this process
  pipeline    ``pipeline.run(workers=W)``: build threads read row groups into the slots, W workers compute,
              the main writes ``part-N.parquet`` (``--output-format parquet --keep-columns id``)
  dataloader  torch DataLoader over a Dataset whose ``__getitem__`` reads one row from pyarrow (each
              worker keeps the row group it read last), batch_size B, num_workers=W, default collate; the
              main computes (W torch threads) and writes a Parquet file per batch
  ray.data    ``ray.data.read_parquet -> map_batches(callable class, concurrency=W, batch_size=B) ->
              write_parquet``, the recipe of Ray Data's docs; the class holds the same ``Computer``
              (ray.init is not timed; the actor pool's start is, as the others' workers' start is)

Each mode's time is its whole call (worker or actor start-up included); rows/s and the ratios of the
pipeline to each mode are printed, and written as JSON with ``--json``. ``--big`` writes a ~4 GB input
(``--big-gb``) and runs ``python -m pipeline run --output-format parquet`` on it (kernel ``sum``, which
keeps it quick: memory is the question) under the RSS wrapper of scripts/bench_rss.py, reporting the main's
peak RSS (goal < 1.5 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.expanduser("~/.cache/pipeline-bench")
DIM, GROUP = 1024, 8192
CONFIG = os.path.join(ROOT, "configs", "bench-parquet.toml")


def make_input(rows: int) -> str:
    """``vectors-<rows>.parquet`` in the cache (written once, row group by row group: bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"vectors-{rows}.parquet")
    if os.path.exists(path):
        return path
    schema = pa.schema([("id", pa.int64()), ("vec", pa.list_(pa.float32(), DIM))])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema, compression="none") as w:
        for lo in range(0, rows, GROUP):
            n = min(GROUP, rows - lo)
            vec = np.random.default_rng([0, lo]).random((n, DIM), dtype=np.float32)
            w.write_table(pa.table({"id": np.arange(lo, lo + n),
                                    "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM)},
                                   schema=schema), row_group_size=GROUP)
    os.replace(tmp, path)
    return path


def run_pipeline(path, out, workers, batch_size):
    import pipeline
    r = pipeline.run(CONFIG, input=path, columns=["vec"], batch_size=batch_size, workers=workers,
                     output=out, output_format="parquet", keep_columns=["id"], progress=False,
                     keep_results=False, overwrite=True)
    return r.summary["checksum"]


class RowDataset:
    """What a DataLoader user writes: one row per ``__getitem__``, read from pyarrow (the row group last
    read kept, so a batch of consecutive rows reads its group once per worker)."""

    def __init__(self, path):
        import pyarrow.parquet as pq
        self.path = path
        self.n = pq.ParquetFile(path).metadata.num_rows
        self.pf, self.group, self.table = None, -1, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import pyarrow.parquet as pq
        if self.pf is None:
            self.pf = pq.ParquetFile(self.path)
        g = i // GROUP
        if g != self.group:
            t = self.pf.read_row_group(g, columns=["id", "vec"])
            self.group = g
            self.table = {"id": t.column("id").to_numpy(),
                          "vec": t.column("vec").combine_chunks().flatten().to_numpy().reshape(-1, DIM)}
        j = i - g * GROUP
        return {"id": self.table["id"][j], "vec": self.table["vec"][j]}


def _spec():
    import tomllib

    from pipeline import kernels
    with open(CONFIG, "rb") as f:
        k = tomllib.load(f)["kernel"]
    return kernels.spec_for(k["name"], k.get("params", {}))


def _write_part(out, k, result, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq
    r = np.ascontiguousarray(result)
    col = pa.FixedSizeListArray.from_arrays(pa.array(r.reshape(-1)), r.shape[1]) if r.ndim == 2 else r
    pq.write_table(pa.table({"vec": col, "id": np.asarray(ids)}), os.path.join(out, f"part-{k:06d}.parquet"))


def run_dataloader(path, out, workers, batch_size):
    import torch
    from torch.utils.data import DataLoader

    from pipeline import devices
    from pipeline.compute import Computer
    torch.set_num_threads(workers)
    computer = Computer(_spec(), devices.choose("cpu", 0), False)
    loader = DataLoader(RowDataset(path), batch_size=batch_size, num_workers=workers,
                        multiprocessing_context="spawn", persistent_workers=False)
    for k, b in enumerate(loader):
        res = computer({"vec": b["vec"].numpy()}, k)[0]
        _write_part(out, k, res["vec"], b["id"].numpy())


class RayCompute:
    """Ray Data's callable class: the same Computer, once per actor."""

    def __init__(self, threads):
        import torch

        from pipeline import devices
        from pipeline.compute import Computer
        torch.set_num_threads(threads)
        self.computer = Computer(_spec(), devices.choose("cpu", 0), False)

    def __call__(self, batch):
        vec = batch["vec"]
        if vec.dtype == object:
            vec = np.stack(vec)
        res = self.computer({"vec": np.ascontiguousarray(vec, dtype=np.float32)})[0]
        return {"vec": res["vec"], "id": batch["id"]}


def run_ray_data(path, out, workers, batch_size):
    import ray
    ds = ray.data.read_parquet(path)
    ds = ds.map_batches(RayCompute, fn_constructor_args=(1,), concurrency=workers, num_cpus=1,
                        batch_size=batch_size, batch_format="numpy")
    ds.write_parquet(out)


MODES = {"serial": lambda p, o, w, b: run_pipeline(p, o, 0, b), "pipeline": run_pipeline,
         "dataloader": run_dataloader, "ray.data": run_ray_data}


def bench(args) -> dict:
    path = make_input(args.rows)
    rows = {}
    for mode in args.modes.split(","):
        if mode == "ray.data":
            import logging

            import ray
            ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            ray.data.DataContext.get_current().enable_progress_bars = False
        out = tempfile.mkdtemp(prefix=f"bench-parquet-{mode}-")
        try:
            t0 = time.perf_counter()
            MODES[mode](path, out, args.workers, args.batch_size)
            wall = time.perf_counter() - t0
            import pyarrow.dataset as pds
            got = pds.dataset(out, format="parquet", ignore_prefixes=[".", "_"]).count_rows()
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if mode == "ray.data":
                import ray
                ray.shutdown()
        rows[mode] = {"wall_s": round(wall, 3), "rows_per_s": round(args.rows / wall, 1), "rows_out": got}
        print(json.dumps({"mode": mode, **rows[mode]}), flush=True)
    p = rows.get("pipeline")
    if p:
        for mode, r in rows.items():
            r["pipeline_x"] = round(p["rows_per_s"] / r["rows_per_s"], 2)
    return {"rows": args.rows, "dim": DIM, "batch_size": args.batch_size, "workers": args.workers,
            "cpus": os.cpu_count(), "modes": rows}


def big(args) -> dict:
    """A ~``big_gb`` GB input through the CLI with Parquet output: the main's peak RSS."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_rss import WRAPPER
    n = int(args.big_gb * 2**30 // (DIM * 4 + 8))
    t0 = time.perf_counter()
    path = make_input(n)
    made = time.perf_counter() - t0
    out = tempfile.mkdtemp(prefix="bench-parquet-big-")
    report = os.path.join(out, "_rss.json")
    cmd = [sys.executable, "-c", WRAPPER, report, "run", "--input", path, "--columns", "vec",
           "--batch-size", str(args.batch_size), "--kernel", "sum", "--workers", str(args.workers),
           "--output", os.path.join(out, "parts"), "--output-format", "parquet", "--keep-columns", "id",
           "--no-progress", "--json"]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"the run failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        with open(report) as f:
            got = json.load(f)
            peak = got.get("VmHWM", got["ru_maxrss_mb"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {"input_gb": round(os.path.getsize(path) / 2**30, 2), "rows": n, "input_written_s": round(made, 1),
              "wall_s": round(wall, 1), "main_peak_rss_mb": round(peak, 1), "goal_mb": 1536,
              "ok": peak < 1536}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="serial,pipeline,dataloader,ray.data")
    ap.add_argument("--big", action="store_true", help="bigger than memory: a ~4 GB input, the main's RSS")
    ap.add_argument("--big-gb", type=float, default=4.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    result = big(args) if args.big else bench(args)
    if not args.big:
        m = result["modes"]
        for name, r in m.items():
            print(f"{name:11} {r['rows_per_s']:>10.0f} rows/s  {r['wall_s']:>7.2f} s  pipeline x{r.get('pipeline_x')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
