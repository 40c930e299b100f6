"""Text in, embeddings out: a small Parquet of documents through a BERT on each worker, the vectors written
to Parquet beside the documents' ids, read back in input order.

  python scripts/examples/embed_text.py

Needs the [text] and [parquet] extras. It makes its own model first (a WordPiece tokenizer trained on the
documents and a tiny BERT with random weights, in a temp dir: nothing is downloaded); with a real model,
point the kernel at its directory: --kernel transformers:/models/bge-small (or sentence-transformers:DIR).
"""
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline.bench.text import corpus, make_model

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        docs = corpus(500, seed=0, median_words=30, top=200)
        bert, _ = make_model(os.path.join(tmp, "model"), docs, hidden=32, layers=2, heads=2, vocab=800,
                             max_positions=256)
        pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(docs))], "text": docs}),
                       os.path.join(tmp, "docs.parquet"), row_group_size=100)
        out = os.path.join(tmp, "out")
        r = pipeline.run(input=os.path.join(tmp, "docs.parquet"), text_column="text", keep_columns=["id"],
                         kernel=f"transformers:{bert}", max_tokens=4096, output=out, output_format="parquet",
                         workers=2, threads_per_worker=1, progress=False, keep_results=False,
                         **{"kernel.params": {"pooling": "mean", "normalize": True}})
        seq = r.summary["sequences"]
        print(f"{seq['documents']} documents, {seq['real_tokens']} tokens in {r.summary['batches']} batches "
              f"(grouped by length: {seq['padding_share']:.1%} padding), {r.summary['wall_s']:.1f} s")
        table = pipeline.read_output(out)                      # one table, in input order
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(docs))]
        assert vectors.shape == (len(docs), 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        print(f"{table.num_rows} rows: {table.column_names}; OK")
