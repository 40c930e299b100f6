"""The ``daft`` mode of the image bench: Daft (``pip install -e '.[daft]'``), as its own image-classification
benchmark runs it (``benchmarking/ai`` in Eventual-Inc/Daft): each file's bytes downloaded
(``.download()``), decoded by Daft (``.decode_image(mode=RGB)``), the transform per row as a Daft function
(torchvision's ``Resize(R)`` + ``CenterCrop(S)`` on the decoded image, as that benchmark's transform), and
the kernel as a Daft class (``@daft.cls``: built once per instance, ``workers`` instances in processes of
their own) whose method takes ``batch_size`` rows at a time (``@daft.method.batch``).

Daft runs on its native runner, in this process and the class's processes, which start with each query
and hand back its rows at its end: so a query over the warm-up files is timed (twice: the second is the
baseline), then one over the warm-up files and ``repeat`` passes over every file (the paths as a column:
``from_glob_path`` lists each file once), and a pass takes (that query - the baseline) / ``repeat``: the
start-up and the warm-up are left out, as in the other modes. The rows carry their sample's index: they
are put back in order and cut into our batches for the comparison.
"""
from __future__ import annotations

import os
import time

import numpy as np


def has_daft() -> bool:
    import importlib.util
    return importlib.util.find_spec("daft") is not None


def _transform(size: int, resize: int):
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size)])


class _Kernel:
    """The kernel as Daft's class: a Computer per instance; a call gets a batch of rows (images, indices,
    labels) and returns each row's results (a dict of its fields)."""

    def __init__(self, spec, device_spec: str, threads: int, pinned: bool, nchw: bool, labels: bool):
        from .peers import kernel_computer
        self.computer = kernel_computer(spec, device_spec, threads, pinned)
        self.nchw, self.labels = nchw, labels

    def __call__(self, images, index, label):
        import daft
        x = np.stack(images.to_pylist())
        batch = {"image": x.transpose(0, 3, 1, 2) if self.nchw else x,
                 "index": np.asarray(index.to_pylist(), np.int64)}
        if self.labels:
            batch["label"] = np.asarray(label.to_pylist(), np.int64)
        out = self.computer(batch)[0]
        rows = [{k: v[j] for k, v in out.items()} for j in range(len(x))]
        return daft.Series.from_pylist(rows, pyobj="force")


def _daft_class(base: type, instances: int, rows: int):
    """``base`` as a Daft class of ``instances`` instances in processes of their own, its ``__call__`` a
    batched method of ``rows`` rows a call returning Python objects."""
    import daft
    call = daft.method.batch(return_dtype=daft.DataType.python(), batch_size=rows)(base.__call__)
    return daft.cls(max_concurrency=instances, use_process=True)(type(base.__name__.strip("_"), (base,),
                                                                     {"__call__": call}))


def _passes(query, warm: list, full: list, repeat: int) -> tuple[list, float, float]:
    """Daft's timing: ``query(warm)`` twice (its processes start, then the baseline), then ``query(full)``
    (the warm-up's items and ``repeat`` passes): its rows, one pass's seconds, the first query's seconds."""
    _, startup = query(warm)
    _, base = query(warm)
    rows, total = query(full)
    return rows, (total - base) / repeat, startup


def daft_images(cfg, spec, src, repeat):
    import daft
    from daft import col
    folder, b, size = src.dataset, src.batch_size, src.dataset.size
    paths = [os.path.join(folder.root, f) for f in folder.files]
    n = len(paths)
    warm = list(range(min(n, 2 * cfg.workers.count * b)))
    labels = folder.labels if folder.labels is not None else [0] * n
    tf = _transform(size, folder.resize)

    @daft.func(return_dtype=daft.DataType.tensor(daft.DataType.uint8(), shape=(size, size, 3)))
    def transform(image):
        from PIL import Image
        return np.asarray(tf(Image.fromarray(np.asarray(image))))

    model = _daft_class(_Kernel, cfg.workers.count, b)(spec, cfg.workers.device, cfg.threads_per_worker(), cfg.handoff.pinned,
                   folder.layout == "nchw", folder.labels is not None)

    def query(rows: list[int]) -> tuple[list, float]:
        df = daft.from_pydict({"path": [paths[i] for i in rows], "index": rows, "label": [labels[i] for i in rows]})
        df = df.with_column("image", col("path").download().decode_image(mode=daft.ImageMode.RGB))
        df = df.with_column("image", transform(col("image")))
        df = df.with_column("out", model(col("image"), col("index"), col("label"))).select("out")
        t = time.perf_counter()
        got = df.to_pydict()["out"]
        if len(got) != len(rows):
            raise RuntimeError(f"daft: {len(got)} rows for {len(rows)}")
        return got, time.perf_counter() - t

    rows, seconds, startup = _passes(query, warm, warm + list(range(n)) * repeat, repeat)
    last = {int(r["index"]): r for r in rows}  # (each sample's last row: every pass gives the same)
    results = []
    for lo in range(0, n, b):
        got = [last[i] for i in range(lo, min(n, lo + b))]
        results.append({k: np.stack([np.asarray(r[k]) for r in got]) for k in got[0]})
    return results, seconds, startup, {"threads_per_worker": cfg.threads_per_worker(),
                                       "daft": f"{daft.__version__}: download + decode_image + func + cls"}


# -- the text bench (bench/text.py) --------------------------------------------------------------------
class _Embed:
    """The text bench's model as Daft's class: a batch of documents tokenized (the same tokenizer, padded to
    the longest, as the DataLoader and Ray Data modes do) and embedded; each row's (index, vector, width)."""

    def __init__(self, make, collate):
        self.comp, self.collate = make(), collate

    def __call__(self, text, index):
        import daft
        b = self.collate(text.to_pylist())
        e = self.comp(b)[0]["embedding"]
        w = b["input_ids"].shape[1]
        return daft.Series.from_pylist([(i, e[j], w) for j, i in enumerate(index.to_pylist())], pyobj="force")


def daft_text(texts: list[str], make, collate, B: int, workers: int):
    """The text bench's ``daft`` mode: the documents as a column, the model (``make()``: a Computer; its
    batches from ``collate(documents)``) as a Daft class of ``workers`` instances in processes of their own
    taking ``B`` rows a call; timed as ``daft_images`` is (a query of
    the warm-up's documents, twice, then one over them and every document: the difference)."""
    import daft
    from daft import col
    model = _daft_class(_Embed, workers, B)(make, collate)

    def query(docs: list[str]) -> tuple[list, float]:
        df = daft.from_pydict({"text": docs, "index": list(range(len(docs)))})
        df = df.with_column("out", model(col("text"), col("index"))).select("out")
        t = time.perf_counter()
        got = df.to_pydict()["out"]
        return got, time.perf_counter() - t

    warm = texts[:2 * B * workers]
    rows, seconds, _ = _passes(query, warm, warm + list(texts), 1)
    rows = sorted(rows, key=lambda r: r[0])[len(warm):]  # (the warm-up's documents come first)
    padded = sum(w for _, _, w in rows)  # (each row's batch width: rows x width summed over batches)
    return np.stack([e for _, e, _ in rows]), seconds, padded
