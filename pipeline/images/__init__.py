"""Images: a folder of image files as a map-style dataset (folder.py), plain JPEGs through simplejpeg and
torch (jpeg.py), Pillow's decode and torchvision's evaluation transform for the rest (pillow.py), batches of the files' bytes decoded by the workers (encoded.py), and
the ``torchvision:NAME`` kernel (torchvision.py).

The public names: ``ImageFolder`` (a folder as a dataset of your own: ``source=``, ``batch_size=``) and
``pixel_means`` (a cheap kernel: ``--kernel pipeline.images:pixel_means``).
"""
from .folder import ImageFolder

__all__ = ["ImageFolder", "pixel_means"]


def pixel_means(batch):
    """A cheap kernel for image batches (``configs/bench-images.toml``: the loading decides): each image's
    mean pixel value (float32), and the batch's 1-D fields (``index``, ``label``, ``valid``) passed through."""
    img = batch["image"]
    out = {"mean": img.reshape(img.shape[0], -1).float().mean(1)}
    out.update({k: v for k, v in batch.items() if k != "image" and v.ndim == 1})
    return out
