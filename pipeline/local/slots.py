"""Which slots of the ring are free: a slot's whole life, stated once.

NOTE [ Slot release ]
    free --take--> building --built(index)--> built --sent--> sent --release(index)--> free
                      |                          (copied to the device, or answered)
                      +--give_back--> free  (the build failed, the source was exhausted, the batch was
                                             larger than a slot, or its build process died)
A slot is taken by a build job before its batch index is known (the job may draw the next batch), and
holds batch ``index`` once built. It is free again when nothing will read it: on
the CPU when the batch's result is back, since the kernel reads the slot itself; on CUDA as soon as the
worker says its copy to the device has completed (a CUDA event), before the kernel ends. A batch whose
slot went back early and whose worker then dies is built again from the source; sources that can't (a
caller's iterator) keep their slots until the result is back. ``release`` names the batch: a late answer
for a batch whose slot went back already (and may hold another batch by now) changes nothing.
"""
from __future__ import annotations

FREE, BUILDING, BUILT, SENT = "free", "building", "built", "sent"


class SlotPool:
    def __init__(self, count: int):
        self.count = count
        self.state = [FREE] * count
        self.owner = [-1] * count  # the batch a built or sent slot holds (-1: none yet)
        self.free = list(range(count - 1, -1, -1))  # (slot 0 taken first)

    def __len__(self) -> int:
        """Free slots."""
        return len(self.free)

    def take(self) -> int:
        slot = self.free.pop()
        self.state[slot] = BUILDING  # (a build job holds it; which batch, it may not know yet)
        return slot

    def built(self, slot: int, index: int) -> None:
        assert self.state[slot] == BUILDING, (slot, self.state[slot])
        self.state[slot], self.owner[slot] = BUILT, index  # (waits for a worker with room)

    def sent(self, slot: int) -> None:
        assert self.state[slot] == BUILT, (slot, self.state[slot])
        self.state[slot] = SENT  # (a worker reads it: until its answer, or on CUDA its copy)

    def give_back(self, slot: int) -> None:
        """A build job's slot that holds no batch for a worker (see the NOTE)."""
        assert self.state[slot] == BUILDING, (slot, self.state[slot])
        self._free(slot)

    def release(self, slot: int, index: int) -> None:
        """Batch ``index`` no longer needs ``slot``; nothing if the slot went back for it already."""
        if self.state[slot] in (BUILT, SENT) and self.owner[slot] == index:
            self._free(slot)

    def _free(self, slot: int) -> None:
        self.state[slot], self.owner[slot] = FREE, -1
        self.free.append(slot)
