"""Lesson 9: what really happens to tensors that cross a process boundary.

The tutorial (section 9) says that data on the GPU "cannot be pickled", so
passing a GPU variable to a child raises an "unpickable" error, and only CPU
data can be passed. On Linux / Python 3.11 with PyTorch the truth is subtler
(measured on an H100, see DESIGN.md "Measured facts"):
- `pickle.dumps(cuda_tensor)` succeeds and loads back on `cuda:0`;
- `import torch` registers reducers with multiprocessing, so a spawn pool hands
  a CUDA tensor to its child by CUDA IPC (the child sees the same GPU memory);
  the child cannot send that tensor back ("Attempted to send CUDA tensor
  received from another process");
- a CPU tensor is not copied either: torch moves its storage into shared memory
  on the way, so the child's in-place change shows in the parent (a numpy
  array, pickled, is a copy);
- fork after CUDA is initialised breaks CUDA in the child: "Cannot re-initialize
  CUDA in forked subprocess";
- a non-leaf tensor that requires grad is refused by torch's ForkingPickler
  ("Cowardly refusing to serialize non-leaf tensor"), on any device, while
  plain pickle silently drops its autograd graph.
Sharing device memory between processes is fragile (IPC needs the producer to
outlive its consumers, is unsupported on Windows, and forked children lose
CUDA), so the pipeline forbids it: only host data crosses, and
`pipeline.run(source=[t])` with a tensor on a non-CPU device, or a non-leaf
tensor that requires grad, raises `pipeline.HandoffError`, a subclass of
`pickle.PicklingError`, before anything is sent.

Without CUDA this lesson runs the CPU/meta set (a `meta` tensor is a non-CPU
device that exists without a GPU); with CUDA it also runs the CUDA set.

`--json PATH` (and/or `--markdown PATH`) measures the facts of the docs/handoff.md table
"what really happens to tensors crossing processes" instead of running the
checks, and writes them with the machine they were measured on: one entry per
row, each saying what happened (ok, the error, a timeout, a speed) or
"skipped: no CUDA". It records, it does not judge: the exit code is 0 once the
files are written. With CUDA it takes well under a minute.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import pickle
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 120  # seconds for any one pool call (children import torch)


# --- child functions (module level: spawn children import them by name) -----

def bump(tensor):
    """Add 1 in place; report what the child received."""
    tensor += 1
    shared = tensor.is_shared() if hasattr(tensor, "is_shared") else False
    return type(tensor).__name__, str(getattr(tensor, "device", "cpu")), bool(shared)


def describe(tensor):
    """Report the device and values of a received tensor, as host data."""
    return str(tensor.device), tensor.cpu().tolist()


def give_back(tensor):
    return tensor


def use_cuda(conn):
    """In a forked child: try to use CUDA; send back what happened."""
    import torch
    try:
        torch.zeros(1, device="cuda")
        conn.send("no error")
    except Exception as exc:  # noqa: BLE001 - the error is the lesson
        conn.send(f"{type(exc).__name__}: {exc}")


# --- the lesson ---------------------------------------------------------------

class Checks:
    def __init__(self):
        self.failures = []

    def __call__(self, ok, what, detail=""):
        print(f"  [{'ok' if ok else 'FAILED'}] {what}{': ' + detail if detail else ''}")
        if not ok:
            self.failures.append(what + (f" ({detail})" if detail else ""))


def raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def handoff_error(pipeline, tensor):
    """Run the pipeline on one tensor; return the exception it raised (or None)."""
    return raised(lambda: pipeline.run(source=[tensor], workers=1, progress=False))


def cpu_meta_set(torch, pipeline, check):
    from multiprocessing.reduction import ForkingPickler
    import numpy as np

    print("CPU/meta set:")
    meta = torch.empty(2, 3, device="meta")
    back = pickle.loads(pickle.dumps(meta))
    check(back.device.type == "meta" and back.shape == (2, 3),
          "pickle.dumps(meta tensor) works and loads back as a meta tensor (shape only, no data)",
          f"{len(pickle.dumps(meta))} bytes")

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        t = torch.zeros(3)
        kind, device, child_shared = pool.apply_async(bump, (t,)).get(timeout=TIMEOUT)
        check(child_shared and t.is_shared() and t.tolist() == [1.0, 1.0, 1.0],
              "a CPU tensor sent to a spawn child is moved to shared memory, not copied",
              f"child's in-place += 1 seen by the parent: {t.tolist()}")
        a = np.zeros(3, dtype=np.float32)
        pool.apply_async(bump, (a,)).get(timeout=TIMEOUT)
        check(a.tolist() == [0.0, 0.0, 0.0], "a numpy array sent the same way is a pickled copy",
              f"parent's array after the child's += 1: {a.tolist()}")

    x = torch.ones(3, requires_grad=True)
    nonleaf = x * 2
    err = raised(lambda: ForkingPickler.dumps(nonleaf))
    check(isinstance(err, RuntimeError) and "Cowardly refusing to serialize non-leaf tensor" in str(err),
          "torch's ForkingPickler refuses a non-leaf tensor that requires grad (CPU)",
          f"{type(err).__name__}: {str(err)[:70]}...")
    plain = pickle.loads(pickle.dumps(nonleaf))
    check(plain.grad_fn is None and nonleaf.grad_fn is not None,
          "plain pickle accepts it and silently drops the autograd graph",
          f"grad_fn {type(nonleaf.grad_fn).__name__} -> {plain.grad_fn}")

    if pipeline is None:
        return
    for what, tensor, words in [
            ("a meta tensor", torch.empty(2, 3, device="meta"), "meta"),
            ("a non-leaf CPU tensor that requires grad", torch.ones(2, 3, requires_grad=True) * 2, "grad")]:
        err = handoff_error(pipeline, tensor)
        check(isinstance(err, pipeline.HandoffError) and isinstance(err, pickle.PicklingError)
              and words in str(err),
              f"pipeline.run(source=[{what}]) raises HandoffError (a pickle.PicklingError)",
              f"{type(err).__name__}: {str(err)[:90]}...")


def cuda_set(torch, pipeline, check):
    from multiprocessing.reduction import ForkingPickler

    print("CUDA set:")
    t = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    blob = pickle.dumps(t)
    back = pickle.loads(blob)
    check(str(back.device) == "cuda:0" and torch.equal(back, t),
          "pickle.dumps(cuda tensor) works and loads back on cuda:0", f"{len(blob)} bytes")

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        device, values = pool.apply_async(describe, (t,)).get(timeout=TIMEOUT)
        check(device.startswith("cuda") and values == t.cpu().tolist(),
              "a spawn pool passes a CUDA tensor to its child by CUDA IPC", f"child sees {device}, {values}")
        err = raised(lambda: pool.apply_async(give_back, (t,)).get(timeout=TIMEOUT))
        check(err is not None and "CUDA tensor received from another process" in str(err),
              "the child cannot send a received CUDA tensor back",
              f"{type(err).__name__}: {str(err)[:90]}")
        del back

    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=use_cuda, args=(sender,))
    child.start()
    sender.close()
    message = receiver.recv() if receiver.poll(TIMEOUT) else "no answer"
    child.join(TIMEOUT)
    check("Cannot re-initialize CUDA in forked subprocess" in message,
          "fork after CUDA init: the child cannot use CUDA", message[:90])

    nonleaf = torch.ones(3, device="cuda", requires_grad=True) * 2
    err = raised(lambda: ForkingPickler.dumps(nonleaf))
    check(err is not None and "Cowardly refusing to serialize non-leaf tensor" in str(err),
          "torch's ForkingPickler refuses a non-leaf CUDA tensor that requires grad")

    if pipeline is None:
        return
    # For a non-leaf CUDA tensor the device is the first thing wrong with it.
    for what, tensor, words in [("a CUDA tensor", t, "cuda"),
                                ("a non-leaf CUDA tensor that requires grad", nonleaf, "cuda")]:
        err = handoff_error(pipeline, tensor)
        check(isinstance(err, pipeline.HandoffError) and isinstance(err, pickle.PicklingError)
              and words in str(err),
              f"pipeline.run(source=[{what}]) raises HandoffError (a pickle.PicklingError)",
              f"{type(err).__name__}: {str(err)[:90]}...")


# --- docs/handoff.md's facts, measured (--json / --markdown) -----------------------

FORK_HANG_S = 10      # a fork pool that has not answered by then is reported as hung
SUBPROCESS_S = 40     # hard limit for a fact run in a process of its own
H2D_MB = 256          # host-to-device copy size for the bandwidth row

# key -> the docs/handoff.md row it measures (order = the table's order)
FACTS = {
    "pickle_cuda_tensor": "`pickle.dumps(cuda_tensor)`",
    "spawn_pool_apply_cuda_tensor": "stdlib spawn `Pool.apply(f, (cuda_tensor,))`",
    "child_returns_cuda_tensor": "the child returns that tensor",
    "fork_after_cuda_init": "fork pool after CUDA init in the parent",
    "fork_pool_cuda_arg": "fork pool, CUDA tensor as argument",
    "nonleaf_requires_grad": "non-leaf tensor with requires_grad",
    "parent_exits_while_child_holds": "parent exits while a child holds a shared CUDA tensor",
    "h2d_pageable_vs_pinned_gbps": f"host-to-device copy, {H2D_MB} MB",
    "pickled_pool_vs_serial": "batches through stdlib spawn `Pool.imap` (pickled) vs one process",
}
CUDA_FACTS = {"pickle_cuda_tensor", "spawn_pool_apply_cuda_tensor", "child_returns_cuda_tensor",
              "fork_after_cuda_init", "fork_pool_cuda_arg", "parent_exits_while_child_holds",
              "h2d_pageable_vs_pinned_gbps"}


def error_text(exc):
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def fact(status, result, **extra):
    return {"status": status, "result": result, **extra}


def measure(fn):
    """Run one fact; an exception becomes status "error" with its type and message."""
    import multiprocessing.context
    t0 = time.perf_counter()
    try:
        row = fn()
    except multiprocessing.context.TimeoutError:
        row = fact("timeout", "timed out (no answer)")
    except Exception as exc:  # noqa: BLE001 - a probe records everything
        row = fact("error", error_text(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def in_own_process(name, limit=SUBPROCESS_S):
    """Run fact `name` in a fresh interpreter (`--fact NAME`); a hang there is killed, not waited on."""
    def text(out):
        return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--fact", name],
                              capture_output=True, text=True, timeout=limit)
        stdout, stderr, ending = proc.stdout, proc.stderr, f"exited {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, ending = text(exc.stdout), text(exc.stderr), f"was killed after {limit} s"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        status = "timeout" if "killed" in ending else "error"
        return fact(status, f"the process running it {ending} without a result: "
                            + " ".join(stderr.split())[-300:])
    row = json.loads(lines[-1])
    if "killed" in ending:
        row["result"] += f" (then the process hung on exit and {ending})"
    row["stderr"] = [line for line in stderr.splitlines() if line.strip()][-5:]
    return row


def hold(tensor, ready):
    """Spawn child: receive a shared CUDA tensor, say so, keep it until killed."""
    float(tensor.sum())
    ready.set()
    time.sleep(60)


def producer_exits():
    """--fact parent_exits_while_child_holds: hand a CUDA tensor to a daemon child, then exit."""
    import torch
    t = torch.ones(1024, device="cuda")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=hold, args=(t, ready), daemon=True)
    child.start()
    if not ready.wait(SUBPROCESS_S / 2):
        return fact("timeout", "the child never reported holding the tensor")
    return fact("ok", "the parent exited while the child held the tensor")  # the warning, if any, follows


def fork_pool_cuda_arg():
    """--fact fork_pool_cuda_arg: a fork pool handed a CUDA tensor (hangs on an H100)."""
    import torch
    t = torch.arange(6, dtype=torch.float32, device="cuda")
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        device, values = pool.apply_async(describe, (t,)).get(timeout=FORK_HANG_S)
        return fact("ok", f"the child got it on {device}: {values}")
    except multiprocessing.TimeoutError:
        return fact("timeout", f"hung: no answer in {FORK_HANG_S} s (the pool was then terminated)")
    finally:
        pool.terminate()


def one_fact(name):
    """Child side of in_own_process: print the fact as one JSON line."""
    fn = {"parent_exits_while_child_holds": producer_exits, "fork_pool_cuda_arg": fork_pool_cuda_arg}[name]
    print(json.dumps(measure(fn)), flush=True)
    return 0


W = None


def init_worker(dim, device):
    global W
    import torch
    W = torch.randn(dim, 256, generator=torch.Generator().manual_seed(0)).to(device)


def batch_work(batch):
    """A pipeline-shaped kernel: host batch in, to the device, small result back as host data."""
    import torch
    x = torch.from_numpy(batch).to(W.device)
    return torch.relu(x @ W).sum(dim=1).cpu().numpy()


def make_batch(seed, rows, dim):
    import numpy as np
    return np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)


def wake(_):
    return os.getpid()


def pool_vs_serial(torch, cuda):
    rows, dim, n = (8192, 1024, 16) if cuda else (1024, 1024, 8)
    device = "cuda" if cuda else "cpu"
    workers = sorted({1, min(4, os.cpu_count() or 1)})
    mb = rows * dim * 4 / 2**20
    init_worker(dim, device)
    batch_work(make_batch(0, rows, dim))
    t0 = time.perf_counter()
    for s in range(n):
        batch_work(make_batch(s, rows, dim))
    serial = n / (time.perf_counter() - t0)
    pooled = {}
    ctx = multiprocessing.get_context("spawn")
    for w in workers:
        with ctx.Pool(w, initializer=init_worker, initargs=(dim, device)) as pool:
            pool.map(wake, range(2 * w), chunksize=1)
            t0 = time.perf_counter()
            for _ in pool.imap(batch_work, (make_batch(s, rows, dim) for s in range(n)), chunksize=1):
                pass
            pooled[w] = n / (time.perf_counter() - t0)
    text = ", ".join(f"{v:.1f}/s at {w}" for w, v in pooled.items())
    return fact("ok", f"{n} x {mb:.0f} MB on {device}: pool {text} worker(s); one process {serial:.1f}/s",
                value={"batches": n, "batch_mb": round(mb, 1), "device": device,
                       "serial_batches_per_s": round(serial, 2),
                       "pool_batches_per_s": {str(w): round(v, 2) for w, v in pooled.items()}})


def h2d_bandwidth(torch):
    n = H2D_MB * 2**20 // 4
    pageable = torch.empty(n, dtype=torch.float32)
    pinned = torch.empty(n, dtype=torch.float32).pin_memory()
    dest = torch.empty(n, dtype=torch.float32, device="cuda")
    out = {}
    for name, src in (("pageable", pageable), ("pinned", pinned)):
        dest.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dest.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_gbps"] = round(5 * n * 4 / (start.elapsed_time(end) / 1e3) / 1e9, 2)
    return fact("ok", f"pageable {out['pageable_gbps']} GB/s, pinned {out['pinned_gbps']} GB/s", value=out)


def measure_facts(torch):
    from multiprocessing.reduction import ForkingPickler

    cuda = torch.cuda.is_available()
    facts = {}
    t = torch.arange(6, dtype=torch.float32, device="cuda") if cuda else None

    def pickle_cuda():
        blob = pickle.dumps(t)
        back = pickle.loads(blob)
        return fact("ok", f"succeeds ({len(blob)} bytes); loads back on {back.device}",
                    value={"bytes": len(blob), "device": str(back.device)})

    def nonleaf():
        results = []
        for device in ["cpu"] + (["cuda"] if cuda else []):
            x = torch.ones(3, device=device, requires_grad=True) * 2
            try:
                ForkingPickler.dumps(x)
                results.append(f"{device}: ForkingPickler accepts it")
            except Exception as exc:  # noqa: BLE001
                results.append(f"{device}: ForkingPickler refuses it: {error_text(exc).split(',')[0]}")
            plain = pickle.loads(pickle.dumps(x))
            results.append(f"{device}: plain pickle {'drops' if plain.grad_fn is None else 'keeps'} the graph")
        refused = all("refuses" in r for r in results if "ForkingPickler" in r)
        return fact("error" if refused else "ok", "; ".join(results))

    if cuda:
        facts["pickle_cuda_tensor"] = measure(pickle_cuda)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            def apply_cuda():
                device, values = pool.apply_async(describe, (t,)).get(timeout=TIMEOUT)
                return fact("ok", f"succeeds: the child sees the tensor on {device}: {values}",
                            value={"child_device": device})

            def returns_cuda():
                back = pool.apply_async(give_back, (t,)).get(timeout=TIMEOUT)
                return fact("ok", f"the child returned it, on {back.device}")
            facts["spawn_pool_apply_cuda_tensor"] = measure(apply_cuda)
            facts["child_returns_cuda_tensor"] = measure(returns_cuda)

        def fork_after_init():
            receiver, sender = multiprocessing.Pipe(duplex=False)
            child = multiprocessing.get_context("fork").Process(target=use_cuda, args=(sender,))
            child.start()
            sender.close()
            try:
                if not receiver.poll(FORK_HANG_S):
                    return fact("timeout", f"no answer from the forked child in {FORK_HANG_S} s")
                message = receiver.recv()
            finally:
                child.join(FORK_HANG_S)
                if child.is_alive():
                    child.kill()
            return fact("ok" if message == "no error" else "error", message[:400])
        facts["fork_after_cuda_init"] = measure(fork_after_init)
        facts["fork_pool_cuda_arg"] = measure(lambda: in_own_process("fork_pool_cuda_arg"))
    facts["nonleaf_requires_grad"] = measure(nonleaf)
    if cuda:
        def parent_exits():
            row = in_own_process("parent_exits_while_child_holds")
            warned = [line for line in row.get("stderr", []) if "Producer process" in line]
            if warned:
                row["result"] = "warning: " + warned[-1].split("] ", 1)[-1]
            elif row["status"] == "ok":
                row["result"] += "; no warning"
            return row
        facts["parent_exits_while_child_holds"] = measure(parent_exits)
        facts["h2d_pageable_vs_pinned_gbps"] = measure(lambda: h2d_bandwidth(torch))
    facts["pickled_pool_vs_serial"] = measure(lambda: pool_vs_serial(torch, cuda))

    out = {}
    for key, what in FACTS.items():
        row = facts[key] if cuda or key not in CUDA_FACTS else fact("skipped", "skipped: no CUDA", seconds=0.0)
        out[key] = {"what": what, **row}
    return out


def machine(torch):
    import numpy as np
    cuda = torch.cuda.is_available()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "cuda": cuda,
            "cuda_version": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpus": torch.cuda.device_count() if cuda else 0}


def markdown(report):
    m = report["machine"]
    lines = [f"Measured by `scripts/lessons/09_gpu_data.py` on {m['date']}: "
             f"{m['gpu'] or 'no GPU (CUDA rows skipped)'}, {m['cpus']} CPUs, torch {m['torch']}, "
             f"Python {m['python']}.", "", "| what | result |", "|---|---|"]
    for key, row in report["facts"].items():
        result = row["result"].replace("|", "\\|")
        lines.append(f"| {row['what']} | {result} |")
    return "\n".join(lines) + "\n"


def write_facts(json_path, markdown_path):
    import torch
    print(f"Lesson 9 facts: measuring the docs/handoff.md table (torch {torch.__version__}, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'})")
    t0 = time.perf_counter()
    report = {"machine": machine(torch), "facts": measure_facts(torch)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for key, row in report["facts"].items():
        print(f"  [{row['status']}] {key}: {row['result'][:150]}")
    for path, text in ((json_path, json.dumps(report, indent=1) + "\n"),
                       (markdown_path, markdown(report) if markdown_path else None)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            print(f"  wrote {path}")
    print(f"OK: facts measured in {report['seconds']} s")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Lesson 9: tensors crossing process boundaries")
    parser.add_argument("--json", metavar="PATH", help="measure the docs/handoff.md table's facts; write them as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="... and/or as a Markdown table")
    parser.add_argument("--fact", help=argparse.SUPPRESS)  # internal: one fact in a process of its own
    args = parser.parse_args(argv)
    if args.fact:
        return one_fact(args.fact)
    if args.json or args.markdown:
        return write_facts(args.json, args.markdown)
    return lesson()


def lesson():
    print("Lesson 9: tensors crossing process boundaries")
    import torch
    try:
        import pipeline
    except ImportError:
        sys.path.insert(0, ROOT)
        try:
            import pipeline
        except ImportError as exc:
            print(f"  the pipeline package cannot be imported ({exc}): its HandoffError is not shown")
            pipeline = None

    cuda = torch.cuda.is_available()
    ran = "CPU/meta set and CUDA set" if cuda else "CPU/meta set only (no CUDA here: torch.cuda.is_available() is False)"
    print(f"  torch {torch.__version__}; running the {ran}")
    check = Checks()
    cpu_meta_set(torch, pipeline, check)
    if cuda:
        cuda_set(torch, pipeline, check)

    if pipeline is None:
        check.failures.append("the pipeline package is missing")
    if check.failures:
        print("FAIL: " + "; ".join(check.failures))
        return 1
    print(f"OK: ran the {ran}: tensors cross by shared memory / IPC, not copies; non-leaf grad tensors are "
          "refused; pipeline.HandoffError stops device tensors before they cross")
    return 0


if __name__ == "__main__":
    sys.exit(main())
