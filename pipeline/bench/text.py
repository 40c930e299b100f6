"""The text benchmark (``configs/bench-text.toml``): documents -> tokens -> a BERT -> one vector each, fed
every way a user would, on the same documents, tokenizer and weights (all made here, offline).

  serial       one process, input order: tokenize B documents (the same tokenizer), pad, the model
  pipeline     ``transformers:DIR`` through the pipeline: tokenized on the build threads, grouped by length,
               batches cut by ``max_tokens``
  st.encode    sentence-transformers ``encode`` in one process (it sorts the documents by length itself)
  st.pool      its multi-process pool (``start_multi_process_pool``) at N workers
  DataLoader   ``DataLoader(num_workers=N, collate_fn=tokenize + pad)``; the main computes
  ray.data     Ray Data's documented recipe: ``from_items`` -> ``map_batches`` (tokenize) -> ``map_batches``
               (the model) on an actor pool of N actors (if ``ray[data]`` is installed)
  daft         Daft (if installed): the documents as a column, tokenize + the model as a Daft class of N
               instances in processes of their own, B rows a call (bench/daft_modes.py)

The model alone: the pipeline's tokenized, length-grouped batches built beforehand, computed in one
process (one thread, times N; and every usable thread): the ceiling on this machine. ``make_model`` writes
the corpus's WordPiece tokenizer, a small BERT with seeded random weights and a sentence-transformers
directory of it (mean pooling, normalised) into a cache directory (offline; the tests make tiny ones).
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import time

import numpy as np
import torch

from .. import devices, kernels
from ..compute import Computer
from ..outputs import max_rel_diff
from ..sources.plan import Sequences, make_plan
from .ray_modes import rows_after_warmup
from .sequences import interleaved
from .report import machine

DEVICE = [torch.device("cpu")]  # where serial, DataLoader and the model alone compute (the run's device)
CACHE = os.environ.get("PIPELINE_BENCH_CACHE", os.path.expanduser("~/.cache/pipeline-bench"))
GOALS = {"vs_DataLoader": 3.0, "vs_ray.data": 2.0, "vs_st": 1.15, "vs_model_alone": 0.9, "padding": 0.05,
         "vs_daft": 1.3}  # (Daft: the image issue's ratio, no goal of its own for text)
MODES = ("serial", "pipeline", "st.encode", "st.pool", "DataLoader", "ray.data", "daft")
MARKER = "pipeline-bench-text"  # source.object of configs/bench-text.toml


def corpus(n: int, seed: int = 0, median_words: float = 60.0, sigma: float = 0.9, top: int = 400) -> list[str]:
    """``n`` documents of 5..``top`` words (lognormal lengths, like real text), from a Zipf-like vocabulary
    of made-up words; deterministic."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(k))) for k in rng.integers(2, 9, 4000)]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    lengths = np.clip(rng.lognormal(math.log(median_words), sigma, n).astype(int), 5, top)
    picks = rng.choice(len(words), int(lengths.sum()), p=p)
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(words[i] for i in picks[at:at + k]) + ".")
        at += k
    return out


def make_model(root: str, texts: list[str], hidden: int = 128, layers: int = 2, heads: int = 4,
               vocab: int = 8000, max_positions: int = 512, seed: int = 0) -> tuple[str, str]:
    """(BERT directory, sentence-transformers directory) in ``root``, made once: a WordPiece tokenizer
    trained on ``texts``, a BertModel with seeded random weights, and the same wrapped with mean pooling
    and normalisation. Needs the ``[text]`` extra."""
    bert, st = os.path.join(root, "bert"), os.path.join(root, "st")
    if os.path.exists(os.path.join(st, "modules.json")):
        return bert, st
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    os.makedirs(bert, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials,
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions)
    fast.save_pretrained(bert)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_positions)
    BertModel(cfg).eval().save_pretrained(bert)
    import warnings
    with warnings.catch_warnings():  # (sentence-transformers renames its modules between releases)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from sentence_transformers import SentenceTransformer, models as st_models
        m = st_models.Transformer(bert, max_seq_length=max_positions)
        dim = getattr(m, "get_embedding_dimension", None) or m.get_word_embedding_dimension
        pool = st_models.Pooling(dim(), "mean")
        SentenceTransformer(modules=[m, pool, st_models.Normalize()], device="cpu").save(st)
    return bert, st


def _computer(name: str, params: dict, threads: int):
    torch.set_num_threads(threads)
    return Computer(kernels.spec_for(name, params), DEVICE[0], False)


def _pad(encoded: list) -> dict:
    n = [len(ids) for ids, _ in encoded]
    ids = np.zeros((len(encoded), max(n)), np.int64)
    mask = np.zeros_like(ids)
    for row, (a, m) in enumerate(encoded):
        ids[row, :len(a)] = a
        mask[row, :len(a)] = m
    return {"input_ids": ids, "attention_mask": mask, "lengths": np.asarray(n, np.int64)}


class _Collate:
    """DataLoader's collate: tokenize a batch of documents (the same tokenizer), pad to the longest."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __call__(self, texts):
        return _pad(self.tokens.encode(texts))


def serial(texts, bert, tokens, B, threads):
    comp = _computer(f"transformers:{bert}", {"normalize": True}, threads)
    comp(_pad(tokens.encode(texts[:2])))
    t0 = time.perf_counter()
    parts, padded = [], 0
    for lo in range(0, len(texts), B):
        b = _pad(tokens.encode(texts[lo:lo + B]))
        padded += b["input_ids"].size
        parts.append(comp(b)[0]["embedding"])
    return np.concatenate(parts), time.perf_counter() - t0, padded


def run_pipeline(texts, bert, B, T, workers):
    import pipeline
    with pipeline.Pipeline(kernel=f"transformers:{bert}", workers=workers, **{"kernel.params": {"normalize": True}}) as p:
        p.run(source=texts[:4 * B * workers], batch_size=B, progress=False)  # the workers' models loaded
        t0 = time.perf_counter()
        r = p.run(source=texts, max_tokens=T, batch_size=0, progress=False)
        seconds = time.perf_counter() - t0
    return (np.concatenate([x["embedding"] for x in r.results]), seconds,
            r.summary["sequences"]["padded_tokens"])


def st_encode(texts, st, B, threads, workers=0):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    model = SentenceTransformer(st, device=str(DEVICE[0]), local_files_only=True)
    model.encode(texts[:B], batch_size=B)
    if workers:
        gpus = torch.cuda.device_count() if DEVICE[0].type == "cuda" else 0
        pool = model.start_multi_process_pool([f"cuda:{i % gpus}" if gpus else "cpu" for i in range(workers)])
        try:
            model.encode(texts[:4 * B * workers], batch_size=B, pool=pool)  # warm
            t0 = time.perf_counter()
            e = model.encode(texts, batch_size=B, pool=pool)
            seconds = time.perf_counter() - t0
        finally:
            model.stop_multi_process_pool(pool)
    else:
        t0 = time.perf_counter()
        e = model.encode(texts, batch_size=B)
        seconds = time.perf_counter() - t0
    return np.asarray(e), seconds, None


def dataloader(texts, bert, tokens, B, workers, threads):
    comp = _computer(f"transformers:{bert}", {"normalize": True}, threads)
    loader = torch.utils.data.DataLoader(texts, batch_size=B, num_workers=workers, collate_fn=_Collate(tokens),
                                         persistent_workers=True, prefetch_factor=4)
    it = iter(loader)
    comp(next(it))
    del it
    t0 = time.perf_counter()
    parts, padded = [], 0
    for b in loader:
        padded += b["input_ids"].size
        parts.append(comp(b)[0]["embedding"])
    return np.concatenate(parts), time.perf_counter() - t0, padded


def ray_data(texts, bert, tokens, B, workers):
    import ray
    import ray.data
    from ..ray_backend import start_local_ray
    start_local_ray(workers + 2)  # (the actors take one CPU each; the fetch tasks need some too)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    collate = _Collate(tokens)

    def tokenize(batch):
        b = collate(list(batch["text"]))
        return {"input_ids": list(b["input_ids"]), "attention_mask": list(b["attention_mask"]),
                "lengths": b["lengths"]}

    class Model:
        def __init__(self):
            self.comp = _computer(f"transformers:{bert}", {"normalize": True}, 1)

        def __call__(self, batch):
            ids, mask = np.stack(batch["input_ids"]), np.stack(batch["attention_mask"])
            e = self.comp({"input_ids": ids, "attention_mask": mask, "lengths": batch["lengths"]})[0]["embedding"]
            return {"embedding": e, "lengths": batch["lengths"]}

    warm = texts[:2 * B * workers]  # (the actors start and load the model before the timing)
    rows, seconds, _ = rows_after_warmup(ray.data.from_items([{"text": t} for t in warm + list(texts)])
                                         .map_batches(tokenize, batch_size=B).map_batches(
        Model, batch_size=B, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1), len(warm))
    ray.shutdown()
    n = np.asarray([r["lengths"] for r in rows])
    padded = sum(len(n[lo:lo + B]) * int(n[lo:lo + B].max()) for lo in range(0, len(n), B))
    return np.stack([r["embedding"] for r in rows]), seconds, padded


def model_alone(texts, bert, tokens, T, workers, threads) -> dict:
    """The model on the pipeline's length-grouped, tokenized batches built beforehand."""
    enc = tokens.encode(texts)
    lengths = np.asarray([len(a) for a, _ in enc])
    plan = make_plan(lengths, Sequences(max_tokens=T, order="length"), 0)
    batches = []
    for k in range(plan.n):
        ids = plan.ids(k)
        w = int(plan.widths[k])
        x, m = np.zeros((len(ids), w), np.int64), np.zeros((len(ids), w), np.int64)
        for row, i in enumerate(ids):
            x[row, :lengths[i]], m[row, :lengths[i]] = enc[i]
        batches.append({"input_ids": x, "attention_mask": m, "lengths": lengths[ids]})
    out = {}
    for t in sorted({1, threads}):
        comp = _computer(f"transformers:{bert}", {"normalize": True}, t)
        comp(batches[0])
        t0 = time.perf_counter()
        for b in batches:
            comp(b)
        out[f"threads{t}_tokens_per_s"] = round(int(lengths.sum()) / (time.perf_counter() - t0), 1)
    out["ceiling_tokens_per_s"] = max(out["threads1_tokens_per_s"] * workers, out[f"threads{threads}_tokens_per_s"])
    return out


SLOW = ("serial", "DataLoader", "ray.data", "daft")  # mostly padding: run once (the others --repeat times)


def run_text_bench(cfg, modes: list[str], workers: int, repeat: int = 1) -> dict:
    from ..text.tokens import Tokens
    params = dict(cfg.source.params)
    n, seed = int(params.get("n", 20000)), int(params.get("seed", 0))
    texts = corpus(n, seed)
    root = os.path.join(CACHE, f"text-model-{seed}")
    bert, st = make_model(root, corpus(2000, seed + 1))
    tokens = Tokens(bert)
    B, T = cfg.source.batch_size or 32, cfg.source.max_tokens or 8192
    threads = devices.usable_cpus()
    DEVICE[0] = devices.choose(cfg.workers.device, 0)
    real = int(sum(len(a) for a, _ in tokens.encode(texts)))
    def one(mode):
        if mode == "serial":
            return serial(texts, bert, tokens, B, threads)
        if mode == "pipeline":
            return run_pipeline(texts, bert, B, T, workers)
        if mode == "st.encode":
            return st_encode(texts, st, B, threads)
        if mode == "st.pool":
            return st_encode(texts, st, B, 1, workers)
        if mode == "DataLoader":
            return dataloader(texts, bert, tokens, B, workers, threads)
        if mode == "daft":
            from .daft_modes import daft_text
            make = functools.partial(_computer, f"transformers:{bert}", {"normalize": True}, 1)
            return daft_text(texts, make, _Collate(tokens), B, workers)
        return ray_data(texts, bert, tokens, B, workers)

    alone_runs = []
    runs = interleaved(modes, one, lambda: alone_runs.append(model_alone(texts, bert, tokens, T, workers, threads)),
                       repeat, SLOW)
    ref = runs.get("serial", next(iter(runs.values())))[0]
    rows = []
    for mode, (emb, seconds, padded) in runs.items():
        diff = max_rel_diff([emb], [ref])
        rows.append({"mode": mode, "workers": 0 if mode in ("serial", "st.encode") else workers,
                     "seconds": round(seconds, 3), "docs_per_s": round(n / seconds, 1),
                     "tokens_per_s": round(real / seconds, 1),
                     "padding_share": round(1 - real / padded, 4) if padded else None,
                     "max_rel_diff_vs_serial": diff, "agrees": diff <= 1e-3})
    alone = {k: statistics.median(a[k] for a in alone_runs) for k in alone_runs[0]}
    return {"repeat": repeat, "machine": machine(), "config": cfg.to_dict(), "documents": n, "real_tokens": real,
            "batch_size": B, "max_tokens": T, "workers": workers, "model": bert, "results": rows,
            "model_alone": alone, "goals": goals(rows, alone)}


def goals(rows: list[dict], alone: dict) -> dict:
    by = {r["mode"]: r for r in rows}
    p = by.get("pipeline")
    out = {}
    if p is None:
        return out
    for key, peers in (("vs_DataLoader", ["DataLoader"]), ("vs_ray.data", ["ray.data"]),
                       ("vs_st", ["st.encode", "st.pool"]), ("vs_daft", ["daft"])):
        best = max((by[m]["tokens_per_s"] for m in peers if m in by), default=None)
        if best:
            out[key] = (round(p["tokens_per_s"] / best, 3), GOALS[key])
    out["vs_model_alone"] = (round(p["tokens_per_s"] / alone["ceiling_tokens_per_s"], 3), GOALS["vs_model_alone"])
    out["padding"] = (p["padding_share"], GOALS["padding"])
    return {k: {"measured": v, "goal": g, "met": v <= g if k == "padding" else v >= g} for k, (v, g) in out.items()}


def table(report: dict) -> str:
    lines = [f"{report['documents']} documents, {report['real_tokens']} tokens, batch {report['batch_size']}, "
             f"max_tokens {report['max_tokens']}, {report['workers']} workers",
             f"{'mode':<12}{'docs/s':>9}{'tokens/s':>11}{'padding':>9}{'agrees':>8}{'seconds':>9}"]
    for r in report["results"]:
        pad = f"{r['padding_share']:.1%}" if r["padding_share"] is not None else "-"
        lines.append(f"{r['mode']:<12}{r['docs_per_s']:>9,.1f}{r['tokens_per_s']:>11,.0f}{pad:>9}"
                     f"{'yes' if r['agrees'] else 'NO':>8}{r['seconds']:>9.2f}")
    lines.append(f"model alone on the pipeline's batches: {report['model_alone']['ceiling_tokens_per_s']:,.0f} tokens/s")
    for k, g in report["goals"].items():
        lines.append(f"goal {k}: {g['measured']} (goal {g['goal']}) {'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)
