"""The same contract on Ray: one actor per worker; the actors build their own batches when they can.

  executor.py   RayExecutor (an Executor: contracts.py): the actors' lives, and a run's stream
  placement.py  who builds a run's batches (the actors, or the driver) and who writes its output
  run.py        one stream: per-actor task queues, reordering, the window
  recovery.py   actors lost (node loss, a crash, a deadline, a sticky CUDA error): restarts, resubmission
  actor.py      the actor itself (module level: Ray pickles it by name)
  cluster.py    starting a private Ray, and what the cluster can host

 driver (this module)                                 Ray actors (one per worker), spread over nodes
 --------------------                                 ----------------------------------------------
 the source, cloudpickled once per run ------------>  opened once per run (again after a restart)
 batch indices: actor.compute.remote(i, attempt) -->  build threads fill batch i into a local slot
                                                      (local/builders.py, as in the local backend);
                                                      the next tasks build while this one computes
 ray.wait over the head task of each actor <--------  kernel on its device -> ("result", i, array, ...)
   -> Outcome(index, result, info, failure)           with --output: the actor writes batch-i itself
 --output: the manifest line appended, checksum       (sinks.BatchFiles: atomic) and returns its
   from the batch digests                             manifest line and digest, not the array

A caller's iterator, or a source that can't be pickled, is built by the driver instead and each batch
``ray.put`` (NOTE [ Actor builds ]).

Bounds (``stream``): at most ``cfg.in_flight()`` batches at the actors (``QUEUE`` per actor), and at most
``window`` batches started and not yet yielded (results held for reordering count), so a slow consumer
slows the actors.

Host-only rule: batches and params are checked (``fields.to_host``) before anything is put in the object
store. Faults: actors are created with ``max_restarts=-1`` so Ray restarts a lost actor (its setup runs
again, on any node that can host it), and the lost batch is resubmitted by us with ``attempt + 1``
(``max_task_retries=0``): that keeps ``faults.max_attempts``, quarantine and the ``restarts`` accounting
identical to the local backend. A node that goes away costs its actors; their batches are resubmitted
uncharged (NOTE [ Node loss ]). An actor that dies while starting is restarted by Ray and the run goes on;
``faults.max_attempts`` deaths in a row before it is up fail the run (NOTE [ Ray restarts while starting ]).

NOTE [ Actor builds ]
When the source builds batch k on its own (``Work.source``: synthetic, files, a map-style dataset) and
cloudpickles, the driver puts it in the object store once per run and sends each actor only (index,
attempt, run key): nothing of a batch passes through the driver, so it steers many nodes. The actor
builds with the local backend's ``Builders`` (build threads, ``workers.build_threads`` or 2) into
``QUEUE`` local slots; Ray runs up to ``QUEUE`` of its tasks at once (a threaded actor), so the next
batches build while one computes (the kernel runs one batch at a time, under a lock). A batch lost with an
actor is simply built again by whichever actor takes it. Placement: before the first batch every actor
checks that ``source.path`` exists on its node (else ConfigError, exit 2: one line naming the node) and
whether it sees the output directory (a probe file the driver writes there); if it does, each actor writes
its results there itself (the same atomic files as the local backend) and returns the manifest line and
the result's digest (``outputs.batch_digest``: the checksum is a digest of per-batch digests for every
backend); the driver appends the line. Otherwise the results come back and the driver writes them, with a
note. ``run.ray_build = "driver"`` makes the driver build; ``"actors"`` refuses a source they can't build.
"""
from .cluster import start_local_ray
from .executor import RayExecutor

__all__ = ["RayExecutor", "start_local_ray"]
