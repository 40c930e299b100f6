"""Text kernels: a Hugging Face model from a local directory on each worker's device.

  transformers:DIR           ``AutoModel.from_pretrained(DIR)`` (nothing downloaded; ``trust_remote_code``
                             off unless ``--param trust_remote_code=true``), pooled over each row's real
                             tokens: ``--param pooling=mean|cls|last`` (default mean), ``normalize=true``
  sentence-transformers:DIR  a local ``SentenceTransformer``: its own pooling and normalisation modules, so
                             the vectors are those its ``encode`` gives

Both take ``{"input_ids", "attention_mask", "lengths"[, "valid"]}`` (the text source's batches) and return
``{"embedding": (B, D) float32}`` (and ``valid`` when the batch has it). Precision is every kernel's
(``--precision bf16``: autocast, on CUDA and the CPU).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os

import torch

from ..errors import ConfigError, KernelError
from .tokens import EXTRA, model_config

PREFIXES = ("transformers:", "sentence-transformers:")
POOLING = ("mean", "cls", "last")


def model_dir(kernel_name: str) -> str | None:
    """The model directory a text kernel names (None for any other kernel)."""
    for p in PREFIXES:
        if kernel_name.startswith(p):
            return kernel_name[len(p):]
    return None


def check_dir(path: str, kernel_name: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"kernel {kernel_name!r}: no model directory {path!r} (a local directory: nothing is "
                          f"downloaded; save one with model.save_pretrained(DIR))")


def check(name: str) -> None:
    """In the main, before any worker: the extra is installed and the model directory exists."""
    import importlib.util
    st = name.startswith("sentence-transformers:")
    if importlib.util.find_spec("sentence_transformers" if st else "transformers") is None:
        raise ConfigError(f"kernel {name!r}: needs {'sentence-transformers' if st else 'transformers'}: "
                          f"pip install -e '.[text]'")
    check_dir(model_dir(name), name)


def check_tokens(path: str, tokens, tokenizer: str) -> None:
    """A tokenizer whose ids go past the model's embedding table, or a max_length past its positions: one
    line, in the main, before any worker."""
    cfg = model_config(path)
    vocab, size, positions = tokens.vocab, cfg.get("vocab_size"), cfg.get("max_position_embeddings")
    if positions and tokens.max_length > int(positions):
        raise ConfigError(f"max_length {tokens.max_length}: the model in {path} has {positions} positions; "
                          f"set --max-length {positions} or less")
    if size and vocab > int(size):
        raise ConfigError(f"--tokenizer {tokenizer}: {vocab} tokens, but the model in {path} has an embedding "
                          f"table of {size}: ids past it would index out of range; use the model's own "
                          f"tokenizer (--tokenizer {path})")


@contextlib.contextmanager
def _quiet():
    """transformers' load-time chatter (weights not used, progress bars) kept off the summary's stdout."""
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # ("Loading weights" bars on stderr, once per worker)
    except ImportError:
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger("transformers").setLevel(level)


class Transformer:
    """``transformers:DIR``: AutoModel on the device, pooled per row."""

    def setup(self, device, model: str = "", pooling: str = "mean", normalize: bool = False,
              trust_remote_code: bool = False):
        try:
            from transformers import AutoModel
        except ImportError:
            raise ConfigError(EXTRA) from None
        if pooling not in POOLING:
            raise KernelError(f"--param pooling={pooling!r}: one of {', '.join(POOLING)}")
        check_dir(model, f"transformers:{model}")
        with _quiet():
            self.model = AutoModel.from_pretrained(model, local_files_only=True,
                                                   trust_remote_code=bool(trust_remote_code)).to(device).eval()
        self.pooling, self.normalize = pooling, bool(normalize)

    @torch.inference_mode()
    def __call__(self, b):
        mask = b["attention_mask"]
        h = self.model(input_ids=b["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            e = h[:, 0]
        elif self.pooling == "last":
            e = h[torch.arange(h.shape[0], device=h.device), b["lengths"] - 1]
        else:
            m = mask[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        e = e.float()
        if self.normalize:
            e = torch.nn.functional.normalize(e, dim=-1)
        return {"embedding": e, **({"valid": b["valid"]} if "valid" in b else {})}


class SentenceTransformer:
    """``sentence-transformers:DIR``: the model's own modules (Transformer, Pooling, Normalize...)."""

    def setup(self, device, model: str = "", trust_remote_code: bool = False):
        try:
            from sentence_transformers import SentenceTransformer as ST
        except ImportError:
            raise ConfigError("sentence-transformers:DIR needs sentence-transformers: pip install -e '.[text]'") from None
        check_dir(model, f"sentence-transformers:{model}")
        with _quiet():
            self.model = ST(model, device=str(device), local_files_only=True,
                            trust_remote_code=bool(trust_remote_code)).eval()

    @torch.inference_mode()
    def __call__(self, b):
        out = self.model({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        e = out["sentence_embedding"].float()
        return {"embedding": e, **({"valid": b["valid"]} if "valid" in b else {})}


def make(name: str, device, params: dict):
    """The kernel a text kernel name gives, set up on ``device``."""
    path = model_dir(name)
    k = Transformer() if name.startswith("transformers:") else SentenceTransformer()
    k.setup(device, model=path, **params)
    return k
