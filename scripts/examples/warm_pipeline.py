"""A warm `Pipeline` in a loop: the workers start once (each imports torch and sets its kernel up), and
every call after the first costs only its batches.

  python scripts/examples/warm_pipeline.py
"""
import time

import pipeline

if __name__ == "__main__":
    with pipeline.Pipeline(kernel="matmul", workers=2, threads_per_worker=1, progress=False) as p:
        for seed in range(4):  # each call may change the source (seed, batches, rows, input, ...)
            t0 = time.perf_counter()
            r = p.run(seed=seed, batches=6, rows=256, cols=128)
            print(f"call {seed}: {time.perf_counter() - t0:.2f} s, start-up {r.summary['startup_s']:.2f} s, "
                  f"checksum {r.summary['checksum'][:12]}")
            if seed:
                assert r.summary["startup_s"] == 0, "a warm Pipeline starts no workers"
        streamed = dict(p.imap(batches=6, rows=256, cols=128, seed=3))  # imap on the same workers
        assert list(streamed) == list(range(6))
    cold = pipeline.run(kernel="matmul", workers=0, seed=3, batches=6, rows=256, cols=128, progress=False)
    assert cold.summary["checksum"] == r.summary["checksum"], "the serial baseline's results"
    print("OK")
