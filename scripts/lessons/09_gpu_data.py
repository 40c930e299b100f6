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
"""

import multiprocessing
import os
import pickle
import sys

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


def main():
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
