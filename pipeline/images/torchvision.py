"""The ``torchvision:NAME`` kernel: any ``torchvision.models`` model on each worker's device."""
from __future__ import annotations

from ..errors import KernelError
from .pillow import EXTRA

KERNEL_PREFIX = "torchvision:"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_models(name: str):
    """``torchvision.models`` after checking that it has ``name``: KernelError naming the extra or the
    known models."""
    try:
        import torchvision.models as models
    except ImportError:
        raise KernelError(f"kernel '{KERNEL_PREFIX}{name}' needs torchvision: {EXTRA}") from None
    known = models.list_models()
    if name not in known:
        raise KernelError(f"kernel '{KERNEL_PREFIX}{name}': torchvision.models has no model {name!r} "
                          f"(e.g. {', '.join(k for k in ('resnet18', 'resnet50', 'vit_b_16') if k in known)})")
    return models


class TorchVision:
    """A ``torchvision.models`` model on the worker's device, in eval mode: random weights seeded by
    ``seed`` (nothing downloaded), or ``weights = PATH`` (a local state dict). A batch's uint8 ``image``
    field (NHWC or NCHW) is normalised with the ImageNet mean and std on the device; the result is
    ``{"logits", "top5"}`` plus the batch's 1-D fields (``index``, ``label``, ``valid``) passed through."""

    def setup(self, device, model: str = "", seed: int = 0, weights: str = "", top: int = 5, **kwargs):
        import torch
        models = torchvision_models(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = models.get_model(model, weights=None, **kwargs)
        if weights:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except Exception as e:  # noqa: BLE001 - the user's file: one line naming it
                raise KernelError(f"kernel '{KERNEL_PREFIX}{model}': weights = {weights!r}: "
                                  f"{type(e).__name__}: {e}") from e
        self.net = net.to(device).eval()
        self.top = int(top)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch):
        import torch
        x = batch["image"] if isinstance(batch, dict) else batch
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
            raise KernelError(f"kernel '{KERNEL_PREFIX}...': expects uint8 images (B, S, S, 3) or (B, 3, S, S), "
                              f"got {tuple(x.shape)}")
        with torch.inference_mode():
            if x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels_last memory)
            x = (x.float() - self.mean) / self.std
            logits = self.net(x).float()
            out = {"logits": logits, "top5": logits.topk(min(self.top, logits.shape[1]), dim=1).indices}
        if isinstance(batch, dict):
            out.update({k: v for k, v in batch.items() if k != "image" and v.ndim == 1})
        return out
