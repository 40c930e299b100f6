"""A folder of images (class folders) through `torchvision:resnet18`, on tiny JPEGs this script makes.

  python scripts/examples/image_folder.py

Needs the [images] extra (Pillow, torchvision). The images are decoded on the main's build threads with
torchvision's evaluation transform (resize, centre crop); each worker builds resnet18 with random weights
seeded by `seed` (nothing is downloaded) and returns logits and the top-5 classes per image.
"""
import os
import tempfile

import numpy as np
from PIL import Image

import pipeline


def make_images(root: str, classes=("cat", "dog"), per_class=12) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, c, f"{i:03d}.jpg"), quality=90)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        make_images(root)
        r = pipeline.run(input=root, kernel="torchvision:resnet18", image_size=32, batch_size=8,
                         workers=2, threads_per_worker=1, progress=False, **{"kernel.params.num_classes": 10})
        s = r.summary
        logits = np.concatenate([b["logits"] for b in r.results])
        labels = np.concatenate([b["label"] for b in r.results])
        print(f"{len(labels)} images in {s['completed']} batches, classes {s['classes']}")
        print(f"logits {logits.shape}, top-5 of image 0: {r.results[0]['top5'][0]}")
        assert logits.shape == (24, 10) and s["classes"] == ["cat", "dog"]
        assert list(labels) == [0] * 12 + [1] * 12, labels
        print("OK")
