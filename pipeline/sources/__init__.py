"""Where batches come from: one factory (factory.py) that infers the kind once and opens the source.

  base.py       Batch records, the Source and Indexed bases (a BuildSource: contracts.py), a run's Work
  synthetic.py  uniform random batches, a function of (seed, batch index)
  datasets.py   your map-style dataset (samples into rows: NOTE [ Samples ]) or iterable of batches
  arrays.py     .npy (memory-mapped), one array of a .npz, a directory of .npy files
  parquet.py    Parquet files read a row group at a time (NOTE [ Row groups ]), a pyarrow Table
  factory.py    infer_kind and open_source: the only place that decides which of these a run reads
A folder of images is opened from here too; its dataset lives with the rest of images (../images/).
"""
