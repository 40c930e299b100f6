"""The image benchmark (``configs/bench-images.toml``, ``configs/bench-images-resnet.toml``): its image set,
made here if absent, and the modes only an image folder has, each ``mode(cfg, spec, src, repeat) ->
(results, seconds, startup, extra)`` as in ``peers``:

  pipeline.pillow  the pipeline with every file through Pillow (``source.decoder = "pillow"``): the image
                   path before simplejpeg (NOTE [ JPEG path ] in images/jpeg.py), kept as a row
  pipeline.device  the pipeline with ``--decode device``: the files' bytes through the slots, each worker
                   decodes (nvJPEG on CUDA, simplejpeg or Pillow on the CPU) and resizes on its device
  torchvision      what most users run: torchvision's ``datasets.ImageFolder`` with ``transforms.Resize(R)``,
                   ``CenterCrop(S)``, ``PILToTensor()`` in a ``DataLoader`` of N spawn workers; the main
                   computes (a flat folder is given to ImageFolder as one class, through a symbolic link)
  daft             Daft (bench/daft_modes.py), if installed: download, decode, the transform, the kernel
                   as a class with a batched method
  spdl.io          SPDL's thread pipeline with SPDL's own decoder (``spdl.io.load_image``, FFmpeg): the
                   resize and crop as an FFmpeg filter (bilinear) of the same sizes; only where spdl.io
                   can load its FFmpeg libraries
  ray.data         (on an image folder, ``ray_modes`` comes here) Ray Data's batch-inference recipe:
                   ``read_images`` (Pillow, RGB), ``map`` with the same resize and crop, ``map_batches``
                   with the same kernel on an actor pool

The other modes (serial, pipeline, DataLoader, spdl) take an image folder as any dataset: the same
``ImageFolder.__getitem__`` (simplejpeg or Pillow, the same transform) in their threads or processes.

The limit (``decode_alone``): the fastest decoder here alone, on every core's thread, on the files' bytes
already in memory (no read, no resize, no copy into a batch): each row's share of it is in the report.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time

import numpy as np

from .. import devices
from ..compute import Computer
from ..images.pillow import crop_at, fit_pixels, resized
from ..sources.factory import open_source
from .peers import _pipeline, _timed, kernel_computer

CACHE = os.environ.get("PIPELINE_BENCH_CACHE", os.path.expanduser("~/.cache/pipeline-bench"))
IMAGE_MODES = ("pipeline.pillow", "pipeline.device", "torchvision", "daft", "spdl.io")  # only for an image folder
DECODE_TOLERANCE = 1e-2  # rows whose decoder or resampler differs from serial's Pillow (max_rel_diff)
# the goals: the pipeline (decode main) vs each peer and the build's scaling (2-core VM); on CUDA
# --decode device vs DataLoader and vs the best CPU-decode row, and the best pipeline row vs the kernel alone
GOALS = {"vs_serial": 1.8, "vs_DataLoader": 1.5, "vs_spdl": 1.3, "vs_ray.data": 2.0, "build_scaling": 0.9,
         "vs_pipeline.pillow": 1.3, "vs_torchvision": 1.5, "vs_daft": 1.3, "vs_decode_alone": 0.75,
         "device_vs_DataLoader": 3.0, "device_vs_best_cpu_decode": 1.0, "vs_kernel_alone": 0.8}


def make_jpegs(root: str, n: int = 256, seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` JPEGs of ImageNet-like sizes (400-640 x 300-480, about 500 x 375) in ``root``, made once and
    deterministically: smooth gradients and rings plus noise, so that they compress like photographs
    rather than like noise or flat colour."""
    from ..images.pillow import pil
    Image, _ = pil()
    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f"img-{i:05d}.jpg") for i in range(n)]
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        if os.path.exists(path):
            continue
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            a, b, f = rng.uniform(-1, 1, 3)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            img[..., c] = (128 + 60 * (a * x / w + b * y / h)
                           + 50 * np.sin(f * 8 * np.hypot(x - cx, y - cy) / w))
        img += rng.normal(0, 12, img.shape).astype(np.float32)
        tmp = f"{path}.tmp"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=quality)
        os.replace(tmp, path)
    return paths


def image_set(cfg) -> tuple:
    """``cfg`` reading the bench's image set: ``source.batches`` x ``source.batch_size`` JPEGs in the
    cache directory (``$PIPELINE_BENCH_CACHE``, default ``~/.cache/pipeline-bench``), made if absent;
    and the seconds it took to make or find them."""
    n = cfg.source.batches * (cfg.source.batch_size or 64)
    root = os.path.join(CACHE, f"jpeg-{n}")
    t0 = time.perf_counter()
    make_jpegs(root, n)
    return cfg.replace(**{"source.path": root}), time.perf_counter() - t0


def decode_agreement(cfg, batches: int = 2) -> dict:
    """Pixels of ``--decode device`` on this machine's CPU vs ``--decode main``, over the first batches:
    the largest and the mean absolute difference, in grey levels."""
    import torch

    from ..images.encoded import decode_batch
    main = open_source(dataclasses.replace(cfg.source, decode="main"))
    dev = open_source(dataclasses.replace(cfg.source, decode="device"))
    worst, total, count = 0, 0.0, 0
    for k in range(min(batches, len(main))):
        got = decode_batch(dev.get(k), torch.device("cpu"), k)[0]["image"].numpy().astype(np.int16)
        diff = np.abs(got - main.get(k)["image"])
        worst, total, count = max(worst, int(diff.max())), total + float(diff.sum()), count + diff.size
    return {"max_abs": worst, "mean_abs": round(total / count, 4), "images": min(batches, len(main)) * main.batch_size}


def decode_alone(src, threads: int, repeat: int = 1) -> dict:
    """The limit: the fastest decoder here (simplejpeg for plain JPEGs at the draft scale, else Pillow) on
    ``threads`` threads over every file's bytes, read beforehand: images/s, the median of ``repeat`` passes."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from ..images import jpeg
    from ..images.pillow import decode_file
    folder = src.dataset
    blobs = []
    for f in folder.files:
        with open(os.path.join(folder.root, f), "rb") as fh:
            blobs.append(fh.read())

    def one(data: bytes) -> None:
        if jpeg.decode(data, folder.resize) is None:
            decode_file(io.BytesIO(data), folder.resize)

    times = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, blobs[: 4 * threads]))  # (warm: the threads, the decoder's tables)
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(one, blobs))
            times.append(time.perf_counter() - t0)
    return {"decoder": "simplejpeg" if jpeg.module() else "Pillow", "threads": threads,
            "images_per_s": round(len(blobs) / statistics.median(times), 1)}


def shares(rows: list[dict], alone: dict) -> None:
    """Each row's images/s as a share of the decoder alone (``share_of_decode_alone``)."""
    for r in rows:
        if r.get("samples_per_s"):
            r["share_of_decode_alone"] = round(r["samples_per_s"] / alone["images_per_s"], 3)


def goals(rows: list[dict], cal: dict, batch_size: int, alone: dict | None = None) -> dict:
    """The issue's ratios in this run: the pipeline (decode main) against each peer, and the build's
    scaling from 1 to 2 threads (calibration); on CUDA the device decode's and the kernel alone's."""
    rate = {r["mode"]: r["samples_per_s"] for r in rows if r.get("samples_per_s")}
    out = {}
    if "pipeline" in rate:
        for peer in ("serial", "DataLoader", "spdl", "ray.data", "pipeline.pillow", "torchvision", "daft"):
            if peer in rate:
                out[f"vs_{peer}"] = rate["pipeline"] / rate[peer]
        if alone:
            out["vs_decode_alone"] = rate["pipeline"] / alone["images_per_s"]
    by = {int(t): s for t, s in cal["build_s_by_threads"].items()}
    if 1 in by and 2 in by:
        out["build_scaling"] = by[1] / by[2] / 2
    if cal["device"].startswith("cuda"):
        cpu = [v for m, v in rate.items() if m not in ("pipeline.device",)]
        loaders = [rate[m] for m in ("DataLoader", "torchvision") if m in rate]
        if "pipeline.device" in rate and loaders:  # DataLoader's best: with our decode or torchvision's recipe
            out["device_vs_DataLoader"] = rate["pipeline.device"] / max(loaders)
        if "pipeline.device" in rate and cpu:
            out["device_vs_best_cpu_decode"] = rate["pipeline.device"] / max(cpu)
        best = max((rate[m] for m in ("pipeline", "pipeline.device") if m in rate), default=None)
        if best:  # the kernel alone on a batch already on the GPU (calibration), in images/s
            alone = batch_size / min(cal["kernel_s_by_threads"].values())
            out["vs_kernel_alone"] = best / alone
    return {k: {"measured": round(v, 3), "goal": GOALS[k], "met": v >= GOALS[k]} for k, v in out.items()}


# -- modes ---------------------------------------------------------------------------------------------
def _pipeline_with(key: str, value: str):
    """The pipeline mode on the same folder with one source setting changed (``pipeline.device``: the
    files' bytes decoded by the workers; ``pipeline.pillow``: every file through Pillow)."""
    def mode(cfg, spec, src, repeat):
        c = cfg.replace(**{key: value})
        return _pipeline(c, spec, open_source(c.source), repeat)
    return mode


# -- torchvision's standard recipe -----------------------------------------------------------------------
def _torchvision(cfg, spec, src, repeat):
    """``datasets.ImageFolder(root, transform)`` in a DataLoader of ``workers`` spawn workers (persistent,
    ``pin_memory`` on CUDA), the batches computed in the main as in the DataLoader mode: the images as the
    kernel takes them (``layout``), ``index`` counted, ``label`` the targets when the folder has classes."""
    import tempfile
    import warnings

    import torch
    from torchvision import datasets, transforms
    folder = src.dataset
    tf = transforms.Compose([transforms.Resize(folder.resize), transforms.CenterCrop(folder.size),
                             transforms.PILToTensor()])
    with tempfile.TemporaryDirectory() as tmp:
        root = folder.root
        if folder.classes is None:  # a flat folder: one class, "all", linked to it
            root = tmp
            os.symlink(os.path.abspath(folder.root), os.path.join(tmp, "all"))
        ds = datasets.ImageFolder(root, transform=tf)
        got = [os.path.relpath(p, os.path.join(root, "all") if folder.classes is None else root) for p, _ in ds.samples]
        if got != [f.replace("/", os.sep) for f in folder.files]:
            raise RuntimeError(f"torchvision's ImageFolder found {len(got)} files in another order than ours")
        device = devices.choose(cfg.workers.device, 0)
        with warnings.catch_warnings(), devices.thread_env(1):
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            loader = torch.utils.data.DataLoader(ds, batch_size=src.batch_size, num_workers=cfg.workers.count,
                                                 persistent_workers=True, multiprocessing_context="spawn",
                                                 pin_memory=device.type == "cuda", drop_last=src.drop_last)
        threads = cfg.workers.threads or devices.usable_cpus()
        nchw, labels, b = folder.layout == "nchw", folder.classes is not None, src.batch_size

        def batch(x, i):
            images, targets = x
            out = {"image": images if nchw else images.permute(0, 2, 3, 1), "index": torch.arange(i * b, i * b + len(images))}
            if labels:
                out["label"] = targets
            return out
        t0 = time.perf_counter()
        with devices.torch_threads(threads):
            computer = Computer(spec, device, False)
            for i, x in enumerate(loader):  # warm: the workers up, the kernel set up
                computer(batch(x, i), i)
            startup = time.perf_counter() - t0
            results, seconds = _timed(lambda: [computer(batch(x, i), i)[0] for i, x in enumerate(loader)], repeat)
        loader = None  # (its persistent workers go, before the link does)
    return results, seconds, startup, {"threads_main": threads, "torchvision": "ImageFolder + Resize/CenterCrop/PILToTensor"}


def has_spdl_io() -> str | None:
    """None when ``spdl.io`` can decode here, else why not (not installed, no FFmpeg libraries)."""
    try:
        import spdl.io
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG")
        spdl.io.load_image(buf.getvalue())
    except Exception as e:  # noqa: BLE001 - ImportError, or its FFmpeg libraries missing (RuntimeError)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _spdl_io_sample(folder, i: int) -> dict:
    """Sample ``i`` decoded by SPDL (FFmpeg): scaled to the same size (bilinear) and cropped at the same
    offsets as ``images.load``, RGB; the other fields as ``ImageFolder`` gives them."""
    import spdl.io
    from PIL import Image
    path = os.path.join(folder.root, folder.files[i])
    with Image.open(path) as im:  # its header only: the size, for the filter
        (nw, nh) = resized(im.size, folder.resize)
    s = folder.size
    left, top = crop_at((nw, nh), s)
    flt = f"scale={nw}:{nh}:flags=bilinear,crop={s}:{s}:{left}:{top},format=rgb24"
    image = spdl.io.to_numpy(spdl.io.load_image(path, filter_desc=flt)).reshape(s, s, 3)
    return folder._sample(i, image, True)


def _spdl_io(cfg, spec, src, repeat):
    """The ``spdl`` mode's thread pipeline, with SPDL's decoder in place of Pillow."""
    from ..sources.datasets import MapSource
    from .peers import _spdl
    return _spdl(cfg, spec, MapSource(_SpdlFolder(src.dataset), src.batch_size, src.drop_last), repeat)


class _SpdlFolder:
    """An ImageFolder whose ``__getitem__`` decodes with spdl.io."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        return _spdl_io_sample(self.folder, i)


# -- Ray Data's image recipe -----------------------------------------------------------------------------
def _ray_transform(row: dict, size: int, resize: int, nchw: bool, index: dict, labels) -> dict:
    """Ray Data's ``map``: the decoded image (RGB) resized and cropped as ``images.load`` does."""
    img = np.ascontiguousarray(fit_pixels(row["image"], size, resize))
    i = index[row["path"]]
    out = {"image": img.transpose(2, 0, 1) if nchw else img, "index": np.int64(i)}
    if labels is not None:
        out["label"] = np.int64(labels[i])
    return out


class _RayImageCompute:
    """Ray Data's callable class: the same Computer, built once per actor; a call gets a batch of rows."""

    def __init__(self, spec, device_spec: str, threads: int, pinned: bool):
        self.computer = kernel_computer(spec, device_spec, threads, pinned)

    def __call__(self, batch: dict) -> dict:
        return self.computer({k: np.ascontiguousarray(v) for k, v in batch.items()})[0]


def ray_data_images(cfg, spec, src, repeat):
    """One Ray Data execution over the warm-up batches' files, then ``repeat`` passes over every file (its
    actor pool starts once, as the other modes' workers do; start-up = until the warm-up's last row). The
    rows come back in order (``preserve_order``) and are cut into our batches for the comparison."""
    import ray
    import ray.data
    folder, b = src.dataset, src.batch_size
    paths = [os.path.join(folder.root, f) for f in folder.files]
    warm = paths[: 2 * cfg.workers.count * b]
    opts = {"num_cpus": 0.5}  # 2 actors + 2 read tasks on 2 cores (as our 2 workers + 2 build threads)
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.workers.device.startswith("cuda") or (cfg.workers.device == "auto" and gpus):
        opts["num_gpus"] = min(1.0, gpus / cfg.workers.count)
    index = {p: i for i, p in enumerate(paths)}
    fn = functools.partial(_ray_transform, size=folder.size, resize=folder.resize, nchw=folder.layout == "nchw",
                           index=index, labels=folder.labels)
    # Backpressure: the streaming executor may hold about 4 decoded batches ahead, not every file (it would
    # read them all while the actors start, and the timed passes would time the kernel alone)
    ahead = 4 * b * max(folder.size, 500) * max(folder.size, 375) * 3
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=ahead)
    files = warm + paths * repeat
    ds = (ray.data.read_images(files, mode="RGB", include_paths=True, num_cpus=0.5,
                               override_num_blocks=max(1, len(files) // b))
          .map(fn, num_cpus=0.5)
          .map_batches(_RayImageCompute, fn_constructor_args=(spec, cfg.workers.device, cfg.threads_per_worker(),
                                                              cfg.handoff.pinned),
                       compute=ray.data.ActorPoolStrategy(size=cfg.workers.count), batch_size=b,
                       batch_format="numpy", **opts))
    t0 = time.perf_counter()
    parts, stamps, rows = [], [], 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(block)
        rows += len(next(iter(block.values())))
        stamps.append((rows, time.perf_counter()))
    n, w = len(paths), len(warm)

    def when(count):  # the time the first block that took the rows to ``count`` arrived
        return next(t for r, t in stamps if r >= count)
    ends = [when(w)] + [when(w + (k + 1) * n) for k in range(repeat)]
    seconds = statistics.median(e - s for s, e in zip(ends, ends[1:]))
    cols = {k: np.concatenate([p[k] for p in parts])[-n:] for k in parts[0]}
    results = [{k: v[lo:lo + src.rows_of(i)] for k, v in cols.items()}
               for i, lo in enumerate(range(0, n, b))]
    return results, seconds, ends[0] - t0, {"threads_per_worker": cfg.threads_per_worker(),
                                            "ray_data": "read_images + map + map_batches(ActorPoolStrategy)"}


def _daft(cfg, spec, src, repeat):
    from .daft_modes import daft_images
    return daft_images(cfg, spec, src, repeat)


RUNNERS = {"pipeline.pillow": _pipeline_with("source.decoder", "pillow"),
           "pipeline.device": _pipeline_with("source.decode", "device"), "torchvision": _torchvision,
           "daft": _daft, "spdl.io": _spdl_io}
