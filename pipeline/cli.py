"""Command line: ``python -m pipeline run | bench | devices``. ``main(argv) -> int`` is testable in-process."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback

from . import verdict
from .config import OVERRIDES, parse_value
from .errors import ConfigError, ExitCode, HandoffError, Interrupted, KernelError

EXIT_CODES = """exit codes:
  0    ok
  1    failed (a kernel error, a worker that could not start, an I/O error)
  2    usage or config error (bad flag, key, value, file; --device cuda without CUDA; fork)
  3    finished, but some batches failed (quarantined or skipped): see "failed" in the summary
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)"""


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run settings (override the config file)")
    g.add_argument("--config", metavar="PATH", help="TOML config (default: built-in, = configs/default.toml)")
    g.add_argument("--workers", type=int, metavar="N", help="worker processes; 0 = serial in this process")
    g.add_argument("--input", metavar="PATH",
                   help="read batches from a .npy file (memory-mapped, slices of --rows along axis 0), "
                        "one array of a .npz (see --input-key), or a directory of .npy files (one batch "
                        "each, in name order); or Parquet: a .parquet file, a directory or a glob of them "
                        "(--batch-size rows per batch, see --columns); --batches, --cols, --dtype and "
                        "--seed are then ignored")
    g.add_argument("--columns", metavar="A,B", type=_names,
                   help="Parquet input: the columns of a batch (default: every numeric, bool and "
                        "fixed-size-list column)")
    g.add_argument("--keep-columns", metavar="A,B", type=_names,
                   help="Parquet input and output: input columns (any type) carried into each output part "
                        "beside the kernel's outputs; never sent to the workers")
    g.add_argument("--input-key", metavar="KEY",
                   help="the array to read from a .npz that holds several")
    g.add_argument("--source", metavar="NAME", dest="source_object",
                   help="your map-style dataset (__len__, __getitem__): package.module:name of a dataset "
                        "object, or of a class or function that returns one, called with --source-param")
    g.add_argument("--source-param", action="append", default=[], metavar="K=V",
                   help="keyword argument (TOML value) for --source, repeatable")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="with --source: B samples per batch (default 0: each item is a batch); with "
                        "Parquet input: B rows per batch (default 0 = 1024)")
    g.add_argument("--drop-last", action="store_true", default=None,
                   help="with --batch-size: drop a short last batch")
    g.add_argument("--image-size", type=int, metavar="S",
                   help="--input of a folder of images: the S x S centre crop (default 224; batch size default 64)")
    g.add_argument("--resize", type=int, metavar="R",
                   help="images: resize the shorter side to R before the crop (default round(S x 256 / 224))")
    g.add_argument("--layout", metavar="nhwc|nchw", help="images: (B, S, S, 3) (default) or (B, 3, S, S)")
    g.add_argument("--bad-samples", metavar="fail|skip",
                   help="images: a file that can't be decoded fails its batch (default) or becomes a zero "
                        "image with valid = False, listed in the summary's bad_samples")
    g.add_argument("--decode", metavar="main|device",
                   help="images: decode on the main's build threads (default: simplejpeg for plain JPEGs, "
                        "Pillow for the rest), or send the files' bytes and decode in each worker (nvJPEG on "
                        "CUDA, simplejpeg or Pillow on the CPU), then resize and crop on its device")
    g.add_argument("--ragged", metavar="A,B", type=_names,
                   help="samples of their own length: the fields whose first axis varies (default: found by "
                        "comparing a few samples); each batch is padded to its longest row and gets 'lengths'")
    g.add_argument("--max-length", type=int, metavar="N",
                   help="a bound on a sample's length: longer ones are cut (counted) or fail (--on-long)")
    g.add_argument("--max-tokens", type=int, metavar="T",
                   help="a token budget: batches cut so that rows x padded length <= T (--batch-size caps rows)")
    g.add_argument("--order", metavar="input|length",
                   help="length: group samples of similar length (results still in input order); default "
                        "input (text: length)")
    g.add_argument("--pad-multiple", type=int, metavar="M", help="round a batch's padded length up to M (default 8)")
    g.add_argument("--on-long", metavar="truncate|fail", help="a sample over --max-length: cut it (default) or "
                                                             "fail its batch")
    g.add_argument("--text-column", metavar="NAME",
                   help="text: the column of documents in JSON Lines, CSV or Parquet (default 'text')")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="text: a tokenizer.json, or a model directory with one (default: the text kernel's)")
    g.add_argument("--output", metavar="DIR",
                   help="write each result as DIR/batch-NNNNNN.npy (.npz when the kernel returns a tuple or "
                        "dict of arrays; atomically), with DIR/manifest.jsonl and DIR/summary.json; running "
                        "again with the same DIR and config resumes, skipping the batches already written")
    g.add_argument("--output-format", metavar="npy|parquet",
                   help="with --output: npy (default) or parquet: DIR/part-NNNNNN.parquet per batch, a column "
                        "per kernel output (+ --keep-columns); DIR reads as one table (pyarrow.dataset)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="with --output: delete the results of a DIR written by another config and start "
                        "afresh (without it such a DIR is refused)")
    g.add_argument("--trace", metavar="FILE",
                   help="write a timeline of every batch through every stage to FILE (Chrome trace-event "
                        "JSON: open it in https://ui.perfetto.dev or chrome://tracing; draw it with pipeline "
                        "trace FILE --plot out.png); bench: the pipeline.trace mode's file")
    g.add_argument("--batches", type=int, metavar="N")
    g.add_argument("--rows", type=int, metavar="N")
    g.add_argument("--cols", type=int, metavar="N")
    g.add_argument("--dtype", metavar="D", help="float32 (default), float16, float64, int8..int64, uint8")
    g.add_argument("--seed", type=int, metavar="N")
    g.add_argument("--kernel", metavar="NAME",
                   help="sum, matmul, fft, mlp, faulty, torchvision:NAME (a torchvision.models model), "
                        "or package.module:name")
    g.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="kernel parameter (TOML value), repeatable")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config key (TOML value), repeatable")
    g.add_argument("--device", metavar="D", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--precision", metavar="P",
                   help="fp32 (default), tf32 (TF32 matmuls on CUDA), bf16 or fp16 (autocast): every kernel call")
    g.add_argument("--start-method", metavar="M", help="spawn (default) or forkserver; fork is refused")
    g.add_argument("--threads-per-worker", type=int, metavar="N",
                   help="torch threads per worker (default: max(1, usable CPUs // workers))")
    g.add_argument("--build-threads", type=int, metavar="N",
                   help="threads building batches in the main (default 0 = auto: on CUDA the usable CPUs "
                        "less one per worker, on the CPU the usable CPUs)")
    g.add_argument("--build-processes", type=int, metavar="N",
                   help="build a dataset's batches in N spawn processes instead of the main's threads: for "
                        "a __getitem__ that holds the GIL (pure Python); default 0")
    g.add_argument("--in-flight", type=int, metavar="N",
                   help="shared-memory slots = batches outstanding (default: build threads + 2 x workers)")
    g.add_argument("--batch-timeout", type=float, metavar="S", dest="batch_timeout_s",
                   help="abandon a batch running longer than S seconds (0 = off)")
    g.add_argument("--max-attempts", type=int, metavar="N", help="tries per batch before quarantine")
    g.add_argument("--on-error", metavar="fail|skip", help="what a kernel exception does to the run")
    g.add_argument("--backend", metavar="local|ray", help="local processes (default) or a Ray cluster")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="Ray: '' starts a local instance (default), 'auto' joins this machine's cluster")
    g.add_argument("--no-progress", action="store_false", dest="progress", default=None, help="no progress bar")
    g.add_argument("--traceback", action="store_true", help="print full tracebacks on errors")


def _overrides(args: argparse.Namespace) -> dict:
    """The run settings given on the command line (``config.OVERRIDES``: one flag each), and the
    ``--set``, ``--param`` and ``--source-param`` keys."""
    out = {n: v for n in OVERRIDES if (v := getattr(args, n, None)) is not None}
    for flag, prefix, items in (("--set", "", args.set), ("--param", "kernel.params.", args.param),
                                ("--source-param", "source.params.", args.source_param)):
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"{flag} {item!r}: expected {'SECTION.KEY' if not prefix else 'KEY'}=VALUE")
            out[prefix + key.strip()] = parse_value(value.strip())
    return out


def _names(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]`` (column names)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Batch compute on GPUs or CPUs across spawn worker processes.",
        epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,bench,trace,devices}")
    p = sub.add_parser("run", help="run the batch job", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="serial vs parallel on the same batches", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(b)
    b.add_argument("--modes", default="serial,pipeline",
                   help="comma list: serial, pipeline, pipeline.procs, pipeline.trace, mp.Pool, "
                        "ProcessPoolExecutor, DataLoader, spdl, ray, ray.data; for a folder of images also "
                        "pipeline.pillow, pipeline.device, torchvision, daft, spdl.io; or all (bench-seq and "
                        "bench-text have their own: docs/benchmarks.md)")
    b.add_argument("--workers-list", default=None, metavar="N,N",
                   help="worker counts for the parallel modes (default 1,2,4 and the core count)")
    b.add_argument("--build-threads-list", default=None, metavar="N,N",
                   help="run the pipeline mode with each of these build-thread counts (default: auto)")
    b.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of agreement")
    b.add_argument("--repeat", type=int, default=1, metavar="N", help="median of N timed runs")
    b.add_argument("--json", metavar="PATH", dest="json_path", help="write the results as JSON")
    b.add_argument("--plot", metavar="PATH.png", help="throughput vs workers per mode (needs [plot] extra)")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("trace", help="read a --trace file: each lane's busy share, the events, the verdict")
    t.add_argument("file", metavar="FILE", help="a trace written by pipeline run --trace FILE")
    t.add_argument("--plot", metavar="PATH.png", help="draw the timeline (needs the [plot] extra)")
    t.add_argument("--traceback", action="store_true")
    t.set_defaults(func=cmd_trace)
    d = sub.add_parser("devices", help="torch/CUDA versions, visible devices, cores, start method")
    d.add_argument("--json", action="store_true")
    d.add_argument("--traceback", action="store_true")
    d.set_defaults(func=cmd_devices)
    return parser


def cmd_run(args) -> int:
    from .outputs import stdout_to_stderr, warnings_once
    from .runner import run
    try:
        # stdout belongs to the summary: whatever the run prints (a serial kernel, a library, native code)
        # goes to stderr, and a warning raised on every batch is shown once; results are streamed, not kept
        with stdout_to_stderr(), warnings_once():
            result = run(args.config, keep_results=False, **_overrides(args))
    except Exception as e:
        if args.json and getattr(e, "summary", None):
            print(json.dumps(e.summary, default=str))
        raise
    s = result.summary
    print(json.dumps(s, default=str) if args.json else human(s))
    return ExitCode.QUARANTINED if s["failed"] else ExitCode.OK


def human(s: dict) -> str:
    lines = [
        f"batches      {s['completed']}/{s['batches']} ({s['bytes_in'] / 1e6:.1f} MB in)",
        f"wall         {s['wall_s']:.3f} s (worker start-up {s['startup_s']:.3f} s)",
        f"throughput   {s['batches_per_s']} batches/s, {s['mb_per_s']} MB/s"
        + (f" ({s['steady_batches_per_s']} batches/s after start-up)" if s.get("steady_batches_per_s") else ""),
        f"kernel       {s['kernel']} ({s.get('precision', 'fp32')}) on {s['device']}, "
        f"{s['threads_per_worker']} thread(s) per worker",
        f"main pid     {s['main_pid']}",
    ]
    for w in s["workers"]:
        where = f"  node {w['node'][:12]} ({w.get('ip')})" if w.get("node") else ""
        lines.append(f"  worker {w['rank']}  pid {w['pid']}  {w['device']}  {w['batches']} batches{where}")
    if s.get("handoff") and s["handoff"].get("transport"):
        lines.append(f"handoff      {s['handoff']['transport']}")
    elif s.get("handoff"):
        h = s["handoff"]
        lines.append(f"handoff      {h['slots']} slots x {_size(h['slot_bytes'])}, "
                     f"{h['pickled_fallbacks']} pickled fallbacks"
                     + (f", host-to-device {h['h2d_gbps']} GB/s" if h["h2d_gbps"] else ""))
    for r in s["restarts"]:
        lines.append(f"restart      worker {r['rank']} (pid {r['pid']}): {r['cause']}, batch {r['batch']}")
    for f in s["failed"]:
        lines.append(f"FAILED       batch {f['batch']} after {f['attempts']} attempt(s): {f['cause']}")
    if s.get("classes"):  # a folder of class folders (images)
        lines.append(f"classes      {len(s['classes'])}: {', '.join(s['classes'][:20])}"
                     + (" ..." if len(s["classes"]) > 20 else ""))
    for b in s.get("bad_samples") or []:  # images with --bad-samples skip
        lines.append(f"BAD SAMPLE   {b['file']}: {b['cause']}")
    if s.get("output"):
        lines.append(f"output       {s['output']} ({s.get('skipped', 0)} batch(es) already there, skipped)")
    if s.get("bottleneck"):
        lines.append(f"bottleneck   {verdict.line(s['bottleneck'])}")
    if s.get("trace"):
        lines.append(f"trace        {s['trace']} (open in https://ui.perfetto.dev, or: pipeline trace FILE --plot out.png)")
    lines += [f"note         {n}" for n in s["notes"]]
    lines.append(f"checksum     {s['checksum']}")
    return "\n".join(lines)


def cmd_trace(args) -> int:
    from .timeline import Trace, draw
    print(Trace(args.file).text())
    if args.plot:
        print(f"timeline     {draw(args.file, args.plot)}")
    return ExitCode.OK


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def cmd_bench(args) -> int:
    from .bench import bench
    return bench(args, _overrides(args))


def cmd_devices(args) -> int:
    from .devices import describe
    info = describe()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:22} {v}")
    return ExitCode.OK


def _terminate(signum, frame):
    raise Interrupted(signum)


def import_torch() -> None:
    """Import torch with Ctrl-C held until it is done, then raised: a KeyboardInterrupt raised inside
    torch's pybind11 module set-up aborts the process ("terminate called after throwing an instance of
    'pybind11::error_already_set'", SIGABRT) instead of the one line and exit 130."""
    if "torch" in sys.modules:
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    early = sys.modules["pipeline"].__dict__.get("EARLY_SIGINT")  # (python -m pipeline: see __init__.py)
    try:  # (a Ctrl-C while the parser is made: one line too, no traceback)
        if early is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if early:
                print("pipeline: interrupted", file=sys.stderr)
                return ExitCode.INTERRUPTED
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2, already printed)
            return int(e.code or 0)
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        import_torch()
        return int(args.func(args))
    except KeyboardInterrupt:
        print("pipeline: interrupted; workers stopped", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Interrupted:
        print("pipeline: terminated (SIGTERM); workers stopped", file=sys.stderr)
        return ExitCode.TERMINATED
    except (ConfigError, KernelError, HandoffError) as e:
        _report(args, e)
        # a kernel's bad return is a batch's failure (exit 1); a kernel that cannot load is a usage error
        return ExitCode.FAILED if getattr(e, "bad_return", False) else ExitCode.USAGE
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        _report(args, e)
        return ExitCode.FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(args, e: BaseException) -> None:
    if getattr(args, "traceback", False):
        traceback.print_exception(e)
    print(f"pipeline: error: {type(e).__name__}: {e}", file=sys.stderr)
