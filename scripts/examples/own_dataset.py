"""Your own map-style dataset through the pipeline: samples of several fields, a kernel class with a
per-worker setup, and the same results as the serial baseline.

  python scripts/examples/own_dataset.py

The dataset's ``__getitem__`` runs on the main's build threads and each sample is written straight into
its row of a shared-memory slot; the kernel gets the batch's structure, each field a tensor on its device.
"""
import numpy as np
import torch

import pipeline


class Points(torch.utils.data.Dataset):
    """1,000 samples: a 32-float vector (a function of the index alone) and an integer label."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {"x": rng.standard_normal(32, dtype=np.float32), "label": i % 7}


class Project:
    """A kernel class: ``setup`` runs once per worker on its device, ``__call__`` once per batch."""

    def setup(self, device, dim=8, seed=0):
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(32, dim).to(device).eval()

    def __call__(self, batch):
        with torch.inference_mode():
            return {"embedding": self.proj(batch["x"]), "label": batch["label"]}


if __name__ == "__main__":  # needed in a script: spawn re-imports it in every worker
    settings = dict(source=Points(), batch_size=128, kernel=Project, progress=False, threads_per_worker=1)
    parallel = pipeline.run(workers=2, **settings)
    serial = pipeline.run(workers=0, **settings)
    s = parallel.summary
    first = parallel.results[0]
    print(f"{s['completed']} batches ({len(parallel.results[-1]['label'])} samples in the last), "
          f"{s['batches_per_s']} batches/s on {len(s['workers'])} workers")
    print(f"batch 0: embedding {first['embedding'].shape} {first['embedding'].dtype}, labels {first['label'][:8]}")
    assert s["batches"] == 8 and first["embedding"].shape == (128, 8)
    assert s["checksum"] == serial.summary["checksum"], "workers=2 must give the serial baseline's results"
    print("OK: the same checksum as workers=0:", s["checksum"][:16])
