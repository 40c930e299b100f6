"""A Parquet table in, a Parquet table out: a vector column through the `mlp` kernel, an id column
carried beside the results without going to a worker.

  python scripts/examples/parquet_roundtrip.py

Needs the [parquet] extra (pyarrow). The output directory holds one part per batch plus `_`-prefixed
bookkeeping files (manifest, summary), and reads back as one table.
"""
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

import pipeline

ROWS, DIM = 3000, 64

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        vec = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
        table = pa.table({"id": pa.array([f"row-{i}" for i in range(ROWS)]),
                          "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), DIM)})
        pq.write_table(table, os.path.join(tmp, "data.parquet"), row_group_size=1000)
        out = os.path.join(tmp, "out")
        r = pipeline.run(input=os.path.join(tmp, "data.parquet"), columns=["vec"], batch_size=512,
                         kernel="mlp", output=out, output_format="parquet", keep_columns=["id"],
                         workers=2, threads_per_worker=1, progress=False, keep_results=False)
        back = ds.dataset(out).to_table()
        print(f"{r.summary['completed']} batches -> {len(os.listdir(out))} files; "
              f"the output reads as one table: {back.num_rows} rows, columns {back.column_names}")
        # a built-in kernel maps each field of the batch ({"vec": ...}) to an output of the same name: mlp gives 16
        assert back.num_rows == ROWS and sorted(back.column_names) == ["id", "vec"]
        assert back.schema.field("vec").type == pa.list_(pa.float32(), 16)
        assert sorted(back.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
        again = pipeline.run(input=os.path.join(tmp, "data.parquet"), columns=["vec"], batch_size=512,
                             kernel="mlp", output=out, output_format="parquet", keep_columns=["id"],
                             workers=0, progress=False, keep_results=False)
        print(f"the same command again resumes: {again.summary['skipped']} batches already there, skipped")
        assert again.summary["skipped"] == r.summary["batches"]
        assert again.summary["checksum"] == r.summary["checksum"]
        print("OK")
