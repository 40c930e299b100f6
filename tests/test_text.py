"""Text in, embeddings out: documents from lists, JSON Lines, CSV, .txt folders and Parquet, tokenized on the
build threads, a transformers / sentence-transformers model on each worker, embeddings to Parquet in input
order; bad documents, missing tokenizer or model, a tokenizer too big for the model."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import pipeline  # noqa: E402
from pipeline.bench.text import corpus, make_model  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.errors import ConfigError, SampleError  # noqa: E402

FAST = dict(progress=False, threads_per_worker=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny tokenizer (500 pieces) and BERT (hidden 32, 2 layers, 128 positions): a few hundred KB."""
    root = tmp_path_factory.mktemp("model")
    bert, st = make_model(str(root), corpus(300, 1, median_words=20), hidden=32, layers=2, heads=2, vocab=500,
                          max_positions=128)
    return bert, st


@pytest.fixture(scope="module")
def texts():
    return corpus(60, 0, median_words=15, top=150)


def embeddings(results):
    return np.concatenate([r["embedding"] for r in results])


def st_encode(st, texts):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(st, device="cpu", local_files_only=True).encode(texts)


@pytest.mark.timeout(180)
def test_transformers_kernel_gives_sentence_transformers_vectors_in_input_order(model, texts):
    bert, st = model
    ref = st_encode(st, texts)
    r = pipeline.run(source=texts, kernel=f"transformers:{bert}", workers=2,
                     **{"kernel.params": {"normalize": True}}, **FAST)
    np.testing.assert_allclose(embeddings(r.results), ref, atol=1e-5)
    seq = r.summary["sequences"]
    assert seq["order"] == "length" and seq["fields"] == ["input_ids", "attention_mask"]
    from pipeline.text.tokens import Tokens
    assert seq["truncated"] == int((Tokens(bert).count(texts) > 128).sum())  # (the model's 128 positions)
    r2 = pipeline.run(source=texts, kernel=f"sentence-transformers:{st}", workers=0, max_tokens=512, **FAST)
    np.testing.assert_allclose(embeddings(r2.results), ref, atol=1e-5)


def test_the_text_never_reaches_a_worker_only_tokens(model, texts):
    bert, _ = model
    seen = []

    def spy(b):
        seen.append({k: (v.dtype, tuple(v.shape)) for k, v in b.items()})
        return {"n": b["lengths"]}
    r = pipeline.run(source=texts, tokenizer=bert, kernel=spy, workers=0, **FAST)
    assert all(set(s) == {"input_ids", "attention_mask", "lengths"} and s["input_ids"][0] == torch.int64
               for s in seen)
    assert np.concatenate([x["n"] for x in r.results]).min() >= 3  # [CLS] ... [SEP]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt", "parquet"])
def test_documents_from_files_to_parquet_with_kept_ids_in_input_order(model, texts, tmp_path, fmt):
    bert, st = model
    ids = [f"doc-{i}" for i in range(len(texts))]
    if fmt == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in zip(ids, texts)))
        kw = dict(input=str(path), text_column="body", keep_columns=["id"])
    elif fmt == "csv":
        import csv
        path = tmp_path / "docs.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows(zip(ids, texts))
        kw = dict(input=str(path), keep_columns=["id"])
    elif fmt == "txt":
        (tmp_path / "docs").mkdir()
        for i, t in zip(ids, texts):
            (tmp_path / "docs" / f"{i}.txt").write_text(t)
        ids = sorted(ids)
        texts = [(tmp_path / "docs" / f"{i}.txt").read_text() for i in ids]
        kw = dict(input=str(tmp_path / "docs"), keep_columns=["path"])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=16)
        kw = dict(input=str(path), text_column="text", keep_columns=["id"])
    out = tmp_path / "out"
    r = pipeline.run(kernel=f"transformers:{bert}", workers=1, max_tokens=1024, output=str(out),
                     output_format="parquet", **{"kernel.params": {"normalize": True}}, **kw, **FAST)
    assert r.summary["sequences"]["documents"] == len(texts)
    back = pipeline.read_output(str(out))
    kept = back.column("path" if fmt == "txt" else "id").to_pylist()
    assert kept == ([f"{i}.txt" for i in ids] if fmt == "txt" else ids)
    got = np.stack(back.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, st_encode(st, texts), atol=1e-5)
    assert back.schema.field("embedding").type.list_size == 32  # a fixed-size list column


@pytest.mark.parametrize("bad, where", [
    ({"id": "x", "text": None}, r"docs.jsonl: line 3, column 'text': null"),
    ({"id": "x", "text": 5}, r"docs.jsonl: line 3, column 'text': a int, not a string"),
    ({"id": "x", "text": "   "}, r"docs.jsonl: line 3, column 'text': an empty document"),
])
def test_a_bad_document_names_its_line_and_column_or_is_skipped(model, texts, tmp_path, bad, where):
    bert, _ = model
    path = tmp_path / "docs.jsonl"
    rows = [{"id": str(i), "text": t} for i, t in enumerate(texts[:10])]
    rows[2] = bad
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SampleError, match=where) as e:
        pipeline.run(input=str(path), kernel=f"transformers:{bert}", workers=0, **FAST)
    assert "\n" not in str(e.value) and "--bad-samples skip" in str(e.value)
    r = pipeline.run(input=str(path), kernel=f"transformers:{bert}", workers=0, bad_samples="skip", **FAST)
    valid = np.concatenate([x["valid"] for x in r.results])
    assert valid.tolist() == [i != 2 for i in range(10)]
    assert [b["sample"] for b in r.summary["bad_samples"]] == [2]


def test_invalid_utf8_in_a_txt_file_names_the_file(model, tmp_path):
    bert, _ = model
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SampleError, match=r"b.txt: invalid UTF-8 at byte 3"):
        pipeline.run(input=str(tmp_path), tokenizer=bert, kernel="sum", workers=0, **FAST)


def test_a_long_document_is_cut_to_max_length_and_counted(model):
    bert, _ = model
    docs = ["word " * 400, "short one"]
    r = pipeline.run(source=docs, kernel=f"transformers:{bert}", max_length=64, workers=0, **FAST)
    assert r.summary["sequences"]["truncated"] == 1 and r.summary["sequences"]["padded_tokens"] <= 2 * 64


def test_missing_tokenizer_model_and_too_small_a_model_are_one_line(model, texts, tmp_path):
    bert, _ = model
    with pytest.raises(ConfigError, match="--tokenizer .*nope: no such file or directory"):
        pipeline.run(source=texts, tokenizer=str(tmp_path / "nope"), kernel="sum", workers=0, **FAST)
    with pytest.raises(ConfigError, match="no model directory"):
        pipeline.run(source=texts, kernel=f"transformers:{tmp_path / 'none'}", workers=0, **FAST)
    with pytest.raises(ConfigError, match="the samples are strings: text needs a tokenizer"):
        pipeline.run(source=texts, batch_size=4, kernel="sum", workers=0, **FAST)
    small = tmp_path / "small"
    small.mkdir()
    import shutil
    with open(os.path.join(bert, "config.json")) as f:
        cfg = json.load(f)
    for f in os.listdir(bert):
        shutil.copy(os.path.join(bert, f), small / f)
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    with pytest.raises(ConfigError, match=r"tokens, but the model in .*small has an embedding table of 100"):
        pipeline.run(source=texts, tokenizer=bert, kernel=f"transformers:{small}", workers=0, **FAST)
    with pytest.raises(ConfigError, match=r"max_length 500: the model in .* has 128 positions"):
        pipeline.run(source=texts, kernel=f"transformers:{bert}", max_length=500, workers=0, **FAST)


def test_without_the_extra_the_command_exits_2_naming_it(monkeypatch, capsys, tmp_path):
    import builtins
    real = builtins.__import__

    def no_tokenizers(name, *a, **kw):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    code = main(["run", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path), "--workers", "0"])
    assert code == 2 and "pip install -e '.[text]'" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_cli_embeds_a_jsonl_file(model, texts, tmp_path, capsys):
    bert, _ = model
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    code = main(["run", "--input", str(path), "--kernel", f"transformers:{bert}", "--param", "pooling=cls",
                 "--keep-columns", "id", "--output", str(tmp_path / "out"), "--output-format", "parquet",
                 "--workers", "1", "--json", "--no-progress"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sequences"]["documents"] == len(texts) and s["completed"] == s["batches"]
    assert pipeline.read_output(str(tmp_path / "out")).column("id").to_pylist() == list(range(len(texts)))


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_bf16_on_cuda_is_close_to_fp32(model, texts):
    bert, _ = model
    kw = dict(source=texts, kernel=f"transformers:{bert}", workers=1, device="cuda",
              **{"kernel.params": {"normalize": True}}, **FAST)
    a = embeddings(pipeline.run(precision="fp32", **kw).results)
    b = embeddings(pipeline.run(precision="bf16", **kw).results)
    assert np.abs(a - b).max() < 0.05


@pytest.mark.timeout(300)
def test_daft_text_mode_agrees_with_serial(model, texts):
    """The text bench's daft mode: the documents as a column, tokenize + the model as a Daft class: serial's
    vectors in input order, a time, and the padding of its batches."""
    pytest.importorskip("daft")
    import functools

    from pipeline.bench.daft_modes import daft_text
    from pipeline.bench.text import _Collate, _computer, serial
    from pipeline.text.tokens import Tokens
    bert, _ = model
    tokens = Tokens(bert)
    texts = [t for t, (ids, _) in zip(texts, tokens.encode(texts)) if len(ids) <= 128]  # (the model's positions)
    ref, _, _ = serial(texts, bert, tokens, 8, 1)
    make = functools.partial(_computer, f"transformers:{bert}", {"normalize": True}, 1)
    emb, seconds, padded = daft_text(texts, make, _Collate(tokens), 8, 2)
    assert emb.shape == ref.shape and seconds > 0
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert padded >= sum(len(a) for a, _ in tokens.encode(texts))
