"""Copies between host and arena slots, the events that order them against compute, and per-forward statistics.

Two backends share one bookkeeping (``CopyEngine``):

* ``CudaBackend``: a dedicated copy stream; ``non_blocking`` copies from pinned memory; the compute stream waits
  for a copy's "arrived" event before the weights are used, and a copy into a slot waits for that slot's "free"
  event (recorded on the compute stream when the previous occupant's last reader has been enqueued).
* ``CpuBackend``: copies run synchronously, so every event is reached the moment it is recorded and waits are
  no-ops; the slot/visit state machine is the same, which is what lets CPU tests cover the plan logic.

A quantized visit's copy_done also dequantizes: right after the wait for its arrival, on the compute stream, so the
dequantization is ordered after the copy (the wait) and before the slot's free event (recorded later on the same
stream), exactly like a reader of the block (spec/runtime.md, "Quantized blocks").

The engine trusts the order of the actions it is given and checks none of it. That order is the plan's, which the
verifier proved safe at attach (``memintent.passes.verify``: no copy into a slot in use, a wait only for an issued
copy, a free only after the visit's copy_done and last reader, one copy per visit), and the executor's hook order
check guarantees that a forward runs it in plan order or faults before acting. So a race the plan could cause
cannot reach the engine; the slot state it keeps (``slot_occupant``, ``slot_freed``) is for inspection only.

A forward can also be captured into a CUDA graph (``CopyEngine.begin_capture`` / ``end_capture``, spec/runtime.md
"Captured steps"): the copy stream forks from the capturing stream at the forward's start and joins it at its end,
so the graph holds the forward's copies, events and compute and never waits on an event recorded outside it; what
the forwards before it left in flight is ordered by ``before_replay`` / ``after_replay`` instead.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

import torch

from memintent.runtime.arena import POISON_BYTE


def copy_into(dst: torch.Tensor, src: torch.Tensor | Callable[[torch.Tensor], None], non_blocking: bool) -> None:
    """dst: uint8 [n] slot bytes <- src: uint8 [n] (a pinned host buffer, or the HBM store's slot), or ``src(dst)``
    (a block held in spare pages: ``PageRun.gather``), on the current stream."""
    if callable(src):
        src(dst)
    else:
        dst.copy_(src, non_blocking=non_blocking)


class CpuBackend:
    """Synchronous copies on the host. Marks are ``perf_counter`` readings, so copy time is measured directly;
    there is no overlap, hence no stall to measure: the whole copy time is on the critical path. The marks of
    copies and dequantizations are the CPU run's measured events (``ForwardStats.events``), on the host clock;
    the forward has no device marks (``begin_forward``/``end_forward`` return None), so ``device_s`` stays None
    and the events take the host's forward start as their origin."""

    name = "cpu"
    measures_stall = False
    timing = True   # perf_counter marks cost nothing

    def __init__(self, device: torch.device):
        self.device = device
        self.sync_work_s = 0.0   # time spent doing device work synchronously (subtracted from host overhead)

    def begin_forward(self) -> Any:
        return None

    def end_forward(self) -> Any:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor | Callable[[torch.Tensor], None], after: Any
             ) -> tuple[Any, Any]:
        t0 = perf_counter()
        copy_into(dst, src, non_blocking=False)
        t1 = perf_counter()
        self.sync_work_s += t1 - t0
        return t0, t1

    def wait(self, arrived: Any) -> Any:
        return None

    def record_free(self, event: Any) -> Any:
        return None

    def poison(self, dst: torch.Tensor) -> None:
        t0 = perf_counter()
        dst.fill_(POISON_BYTE)
        self.sync_work_s += perf_counter() - t0

    def dequant(self, unpack: Callable[[], None]) -> tuple[Any, Any]:
        t0 = perf_counter()
        unpack()   # synchronous: packed region at the slot's end -> weights at its start
        t1 = perf_counter()
        self.sync_work_s += t1 - t0
        return t0, t1

    def sync(self, mark: Any) -> None:
        pass

    def begin_capture(self) -> tuple:
        return ()   # nothing runs asynchronously: a "captured" forward on the CPU is an eager one

    def end_capture(self, saved: tuple) -> None:
        pass

    def before_replay(self) -> None:
        pass

    def after_replay(self) -> None:
        pass

    def elapsed_s(self, a: Any, b: Any) -> float | None:
        return None if a is None or b is None else b - a

    def recycle(self, marks: list) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaBackend:
    """A copy stream plus pooled CUDA events. ``timing``: timing-enabled events around each copy (copy-stream busy
    time) and around each wait (compute-stream stall), and at forward start/end (device time); without it only
    the ordering events are recorded (cheaper: two event records per visit instead of six)."""

    name = "cuda"
    measures_stall = True

    def __init__(self, device: torch.device, timing: bool = True):
        self.device = device
        self.timing = timing
        self.copy_stream = torch.cuda.Stream(device=device)
        self.compute = torch.cuda.current_stream(device)
        self.sync_work_s = 0.0   # stays 0: all device work is asynchronous
        self._pool: list[torch.cuda.Event] = []

    def _event(self) -> torch.cuda.Event:
        return self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=self.timing)

    # -- capture and replay (CopyEngine.begin_capture) ----------------------------------------------------------
    def begin_capture(self) -> tuple:
        """Called on the capturing stream before a captured forward: the copy stream forks from it (so its copies
        join the graph, ordered after everything the stream ran before the replay), and events are untimed (a
        graph's events are not timed). Returns what ``end_capture`` restores."""
        # ``compute`` too: the captured forward sets it to the capturing stream, which a copy between steps (a page
        # swap) must not switch back to afterwards.
        saved = (self.timing, self._pool, self.compute)
        self.timing, self._pool = False, []
        fork = torch.cuda.Event()
        fork.record(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_event(fork)
        return saved

    def end_capture(self, saved: tuple) -> None:
        """Join the copy stream back into the capturing stream (a capture must end where it forked)."""
        self.timing, self._pool, self.compute = saved
        join = torch.cuda.Event()
        join.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(join)

    def before_replay(self) -> None:
        """A replay starts after every copy issued on the copy stream before it (the eager forward's next-forward
        copies the graph's first visits read, and page copies): the graph waits on no event of its own for them."""
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def after_replay(self) -> None:
        """A copy issued after a replay starts after it: the slot-free events it would wait for were recorded
        inside the graph, not on the copy stream's timeline."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def begin_forward(self) -> Any:
        # The model's kernels go to whatever stream is current when the forward starts; waits and frees must be on it.
        self.compute = torch.cuda.current_stream(self.device)
        if not self.timing:
            return None
        e = self._event()
        e.record(self.compute)
        return e

    def end_forward(self) -> Any:
        if not self.timing:
            return None
        e = self._event()
        e.record(self.compute)
        return e

    def copy(self, dst: torch.Tensor, src: torch.Tensor | Callable[[torch.Tensor], None], after: Any
             ) -> tuple[Any, Any]:
        s = self.copy_stream
        if after is not None:
            s.wait_event(after)   # the slot's previous occupant's last reader has finished
        start = None
        if self.timing:
            start = self._event()
            start.record(s)
        # set_stream there and back costs ~1.5 us against ~9 us for the torch.cuda.stream() context manager (H100,
        # torch 2.11). Restoring ``compute`` assumes the forward does not switch streams itself (spec/runtime.md).
        torch.cuda.set_stream(s)
        try:
            copy_into(dst, src, non_blocking=True)
        finally:
            torch.cuda.set_stream(self.compute)
        arrived = self._event()
        arrived.record(s)
        return start, arrived

    def wait(self, arrived: Any) -> Any:
        c = self.compute
        if arrived is None:      # copied before a captured forward or a replay: ordered by the replay (see above)
            return None
        if not self.timing:
            c.wait_event(arrived)
            return None
        # The "before" mark completes when compute reaches the wait, the "after" mark when the wait is satisfied:
        # their distance on the compute stream is the time compute sat idle for this copy (0 if it had arrived).
        before, after = self._event(), self._event()
        before.record(c)
        c.wait_event(arrived)
        after.record(c)
        return before, after

    def dequant(self, unpack: Callable[[], None]) -> tuple[Any, Any]:
        # Runs right after wait(arrived) in copy_done. unpack() launches its kernels on the current stream, which is
        # ``compute``: the forward's stream (begin_forward captured it, copy() restores it after every copy; a
        # forward that switches streams is unsupported). So in compute-stream order: wait for the arrival ->
        # dequantize (reads the packed region, writes the weights) -> the block's readers -> the slot's free event,
        # which the next copy into the slot waits for. Timing marks bracket the kernels on the same stream.
        if not self.timing:
            unpack()
            return None, None
        start, end = self._event(), self._event()
        start.record(self.compute)
        unpack()
        end.record(self.compute)
        return start, end

    def record_free(self, event: Any) -> Any:
        if event is None:
            event = torch.cuda.Event()   # ordering only, never timed
        event.record(self.compute)
        return event

    def poison(self, dst: torch.Tensor) -> None:
        # On the compute stream, before the free event is recorded: the next copy into the slot waits for it.
        dst.fill_(POISON_BYTE)

    def sync(self, mark: Any) -> None:
        if mark is not None:
            mark.synchronize()

    def elapsed_s(self, a: Any, b: Any) -> float | None:
        if a is None or b is None:
            return None
        return a.elapsed_time(b) / 1e3   # ms; both events must have completed (see CopyEngine._finalize)

    def recycle(self, marks: list) -> None:
        self._pool.extend(m for m in marks if m is not None)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


@dataclass
class ForwardStats:
    """What one forward did. Times are seconds, sizes bytes; ``None`` where the backend cannot measure it.

    host_wall_s: host time from the root module's pre-hook to its post-hook. On CUDA this is how long the host
        took to enqueue the forward, not how long the GPU ran it (see device_s).
    device_s: CUDA with timing: compute-stream time between events recorded at forward start and end (includes
        stalls and any time the GPU waited for the host to enqueue work). None on CPU.
    bytes_copied / copies: host-to-device bytes, and the copies of every visit, that serve this forward's visits,
        wherever they were issued (cross-forward prefetches issued in the previous forward's tail count here), so
        every forward of a plan reports the same figures. A copy out of the HBM store counts among the copies, and
        none of its bytes.
    copy_s: CUDA with timing: sum of the copies' durations on the copy stream (copy-engine busy time). CPU: the
        measured synchronous copy time.
    stall_s: CUDA with timing: total time the compute stream was blocked in copy_done waits, measured by events
        recorded on the compute stream just before and just after each wait. None on CPU (copies are synchronous,
        the whole copy_s is on the critical path).
    host_overhead_s: host time spent inside the runtime's hooks (order check, action dispatch, event records,
        copy launches, parameter rebinding), excluding synchronous copies/poison fills on the CPU backend and
        excluding PyTorch's own cost of calling a hook (about a microsecond per hook). On CUDA it also includes
        any time a CUDA call in a hook blocked because the host ran a full launch queue ahead of a slower GPU
        (backpressure, not work): measure with a synchronize between forwards for the hooks' own cost.
    stage_entries: hooks that fired (stage pre-hooks plus the root's two).
    max_hook_s: the slowest single hook, same accounting as host_overhead_s.
    visit_stall_s: stall per visit, keyed ``"block@visit_stage"`` (CUDA with timing only).
    dequants: quantized visits dequantized in this forward (in their copy_done). A block that unpacks one weight
        at a time (spec/runtime.md) copies only its raw weights there; its matrices unpack in their modules'
        pre-hooks, timed with the compute, not in dequant_s.
    dequant_s: CUDA with timing: sum of the dequantizations' durations on the compute stream (events just before
        and after each one's kernels; on the critical path, after the arrival wait). CPU: measured synchronous
        time. None on CUDA without timing.
    dequant_host_s: host time spent launching (CUDA) or running (CPU) the dequantizations; on CUDA it is part of
        host_overhead_s, on CPU it is excluded from it like the copies.
    """

    index: int
    host_wall_s: float
    device_s: float | None
    bytes_copied: int
    copies: int
    copy_s: float | None
    stall_s: float | None
    host_overhead_s: float
    stage_entries: int
    max_hook_s: float
    visit_stall_s: dict[str, float] = field(default_factory=dict)
    dequants: int = 0
    dequant_s: float | None = None
    # With timing: (lane, name, start_s, end_s) from the forward's start; lanes "compute" (the whole forward),
    # "copy", "wait" (compute stalled on a copy; CUDA only), "dequant". CPU: host perf_counter intervals.
    events: list[tuple[str, str, float, float]] = field(default_factory=list)
    dequant_host_s: float = 0.0

    @property
    def copy_gbps(self) -> float | None:
        """Achieved host-to-device rate while copying (1e9 bytes per second of copy-engine busy time)."""
        return self.bytes_copied / self.copy_s / 1e9 if self.copy_s else None

    @property
    def host_overhead_per_block_s(self) -> float:
        """Host overhead per streamed block visit (per stage entry if nothing streamed)."""
        return self.host_overhead_s / max(self.copies or self.stage_entries, 1)

    def summary(self) -> str:
        def ms(t: float | None) -> str:
            return "-" if t is None else f"{t * 1e3:.3f} ms"

        gbps = self.copy_gbps
        deq = f", dequant {ms(self.dequant_s)} in {self.dequants} blocks" if self.dequants else ""
        return (f"forward {self.index}: host {ms(self.host_wall_s)}, device {ms(self.device_s)}, "
                f"copied {self.bytes_copied / 1e6:.1f} MB in {self.copies} copies "
                f"({'-' if gbps is None else f'{gbps:.1f} GB/s'}), stall {ms(self.stall_s)}{deq}, "
                f"host overhead {self.host_overhead_per_block_s * 1e6:.1f} us/block "
                f"(max hook {self.max_hook_s * 1e6:.1f} us)")


class _Record:
    """Raw marks of one forward until its events have completed and can be turned into ForwardStats."""

    __slots__ = ("index", "t0", "host_wall_s", "start", "end", "copies", "waits", "bytes", "overhead_s",
                 "entries", "max_hook_s", "dequants", "dequant_host_s")

    def __init__(self) -> None:
        self.index = -1
        self.t0 = 0.0
        self.host_wall_s = 0.0
        self.start = self.end = None
        self.copies: list[tuple[int, Any, Any]] = []    # (visit id, start mark, arrived mark)
        self.waits: list[tuple[int, Any]] = []          # (visit id, (before, after) marks)
        self.dequants: list[tuple[int, Any, Any]] = []  # (visit id, start mark, end mark)
        self.dequant_host_s = 0.0
        self.bytes = 0
        self.overhead_s = 0.0
        self.entries = 0
        self.max_hook_s = 0.0


class CopyEngine:
    """Slot/visit bookkeeping and events shared by both backends.

    Visits are numbered by the executor (``visit_labels[vid]`` names one). A slot is either empty, occupied (a copy
    was started into it) or freed (its occupant's last reader is done; the next copy may start): recorded, not
    enforced (see the module docstring).
    """

    def __init__(self, backend: CpuBackend | CudaBackend, n_slots: int, visit_labels: list[str],
                 visit_keys: list[str] | None = None, max_pending: int = 8, history: int = 256):
        self.backend = backend
        self.labels = visit_labels                 # for messages: "block 'layers.3' (visit at stage 6)"
        self.keys = visit_keys or visit_labels     # for ForwardStats.visit_stall_s: "layers.3@6"
        self.n_slots = n_slots
        self.max_pending = max_pending
        self.history: collections.deque[ForwardStats] = collections.deque(maxlen=history)
        self._pending: collections.deque[_Record] = collections.deque()
        self._count = 0
        self._cur: _Record | None = None
        self._next: _Record | None = None
        self._captured: tuple | None = None      # while a forward is captured: the state it must leave untouched
        self._clear_state()

    def _clear_state(self) -> None:
        n = len(self.labels)
        self.slot_occupant = [-1] * self.n_slots   # visit id last copied into the slot, -1: never
        self.slot_freed = [True] * self.n_slots    # its occupant's free has run
        self.slot_free_event: list[Any] = getattr(self, "slot_free_event", None) or [None] * self.n_slots
        self.arrival: list[Any] = [None] * n       # arrived event of a copy started and not yet waited on

    # -- the three actions --------------------------------------------------------------------------------------
    def copy_start(self, vid: int, slot: int, dst: torch.Tensor, src: torch.Tensor | Callable[[torch.Tensor], None],
                   nbytes: int, for_next_forward: bool) -> None:
        if for_next_forward:
            rec = self._next
            if rec is None:
                rec = self._next = _Record()
        else:
            rec = self._cur
        start, arrived = self.backend.copy(dst, src, self.slot_free_event[slot])
        self.slot_occupant[slot] = vid
        self.slot_freed[slot] = False
        self.arrival[vid] = arrived
        # Untimed arrival events go back to the pool at copy_done; timed ones are also the copy's end mark and
        # stay with the record until its statistics are read.
        rec.copies.append((vid, start, arrived if self.backend.timing else None))
        rec.bytes += nbytes

    def copy_done(self, vid: int, unpack: Callable[[], None] | None = None) -> None:
        """Compute waits for the visit's copy; ``unpack`` (a quantized visit): then dequantize it, on compute."""
        arrived = self.arrival[vid]
        self.arrival[vid] = None
        b = self.backend
        w = b.wait(arrived)
        if w is not None:
            self._cur.waits.append((vid, w))
        if not b.timing:
            # cudaStreamWaitEvent binds to the event's latest record at call time: the event is reusable at once.
            b.recycle([arrived])
        if unpack is not None:
            t0 = perf_counter()
            start, end = b.dequant(unpack)   # after the wait, on the compute stream (see CudaBackend.dequant)
            self._cur.dequant_host_s += perf_counter() - t0
            self._cur.dequants.append((vid, start, end))

    def free(self, vid: int, slot: int, poison: torch.Tensor | list[torch.Tensor] | None) -> None:
        for t in ([] if poison is None else poison if isinstance(poison, list) else [poison]):
            self.backend.poison(t)
        self.slot_free_event[slot] = self.backend.record_free(self.slot_free_event[slot])
        self.slot_freed[slot] = True

    # -- forward boundaries -------------------------------------------------------------------------------------
    def begin_forward(self) -> None:
        rec, self._next = (self._next or _Record()), None
        rec.index = self._count
        self._count += 1
        rec.t0 = perf_counter()
        rec.start = self.backend.begin_forward()
        self._cur = rec

    def end_forward(self, overhead_s: float, entries: int, max_hook_s: float) -> None:
        if self._captured is not None:    # a captured forward ran nothing: it has no statistics
            self._cur = None
            return
        rec = self._cur
        rec.host_wall_s = perf_counter() - rec.t0
        rec.end = self.backend.end_forward()
        rec.overhead_s, rec.entries, rec.max_hook_s = overhead_s, entries, max_hook_s
        self._cur = None
        self._pending.append(rec)
        # Bound the events held by unread statistics; the oldest forward finished long ago, so this rarely blocks.
        while len(self._pending) > self.max_pending:
            self.history.append(self._finalize(self._pending.popleft()))

    # -- capture and replay ---------------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return self._captured is not None

    def begin_capture(self) -> None:
        """The next forward is captured into a CUDA graph (spec/runtime.md, "Captured steps"). It is a steady-state
        forward: its first visits were copied by the forward before it (a replay starts after them:
        ``before_replay``), so it waits for no arrival from outside the graph, and its copies wait for no slot
        freed outside it (the copy stream forks from the capturing stream). Everything the forwards before it left
        in flight is set aside and restored by ``end_capture``: a capture runs nothing."""
        self._captured = (self.arrival, self.slot_free_event, self.slot_occupant, self.slot_freed, self._next,
                          self._count, self.backend.begin_capture())
        n = len(self.labels)
        self.arrival, self.slot_free_event = [None] * n, [None] * self.n_slots
        self.slot_occupant, self.slot_freed = list(self.slot_occupant), list(self.slot_freed)
        self._next = None

    def end_capture(self) -> None:
        """After the captured forward's end, inside the capture: join the copy stream, restore the state."""
        (self.arrival, self.slot_free_event, self.slot_occupant, self.slot_freed, self._next, self._count,
         saved) = self._captured
        self._captured = None
        self.backend.end_capture(saved)

    def before_replay(self) -> None:
        """Before a captured forward replays: it starts after every copy already issued (see CudaBackend)."""
        self.backend.before_replay()

    def after_replay(self) -> None:
        """After a replay: the graph copied its next forward's first visits and joined them, so no arrival issued
        before it is waited for again (the next forward's statistics do not count those copies), and the next copy
        starts after the replay."""
        self.backend.after_replay()
        if self._next is not None:
            self.backend.recycle(self._marks(self._next))
            self._next = None
        self.arrival = [None] * len(self.labels)

    def reset(self) -> None:
        """Forget all in-flight state (after an aborted forward, or on request): wait for the device, drop
        unfinished records, empty every slot. The next forward issues its own prefetches as a first forward does."""
        self.backend.synchronize()
        for rec in (self._cur, self._next):
            if rec is not None:
                self.backend.recycle(self._marks(rec))
        self._cur = self._next = None
        self._clear_state()

    # -- statistics ---------------------------------------------------------------------------------------------
    @staticmethod
    def _marks(rec: _Record) -> list:
        out = [rec.start, rec.end]
        for _, a, b in rec.copies:
            out += (a, b)
        for _, (a, b) in rec.waits:
            out += (a, b)
        for _, a, b in rec.dequants:
            out += (a, b)
        return out

    def _finalize(self, rec: _Record) -> ForwardStats:
        b = self.backend
        # Event times can only be read once both events completed: the forward's end mark covers every wait (they
        # are on the compute stream before it) and the last copy covers all copies (the copy stream is FIFO).
        b.sync(rec.end)
        if rec.copies:
            b.sync(rec.copies[-1][2])
        copy_s, stall_s, per_visit, dequant_s = None, None, {}, None
        events: list[tuple[str, str, float, float]] = []
        if b.timing:
            # (lane, name, start, end) in seconds from this forward's start; a copy issued in the previous
            # forward's tail starts before it (negative). Names follow memintent.see.perfetto.MeasuredEvent. CUDA:
            # from the forward's start event. CPU (no forward events): its marks are perf_counter readings, like
            # the host's own forward start rec.t0, and the forward's span is the host's.
            origin, span_s = (rec.start, b.elapsed_s(rec.start, rec.end)) if rec.start is not None else (
                rec.t0, rec.host_wall_s)
            t = lambda m: b.elapsed_s(origin, m)  # noqa: E731
            events.append(("compute", "forward", 0.0, span_s))
            events += [("copy", self.keys[vid], t(a), t(e)) for vid, a, e in rec.copies]
            events += [("wait", self.keys[vid], t(x), t(y)) for vid, (x, y) in rec.waits]
            events += [("dequant", self.keys[vid], t(a), t(e)) for vid, a, e in rec.dequants]
        if b.timing:
            copy_s = sum(b.elapsed_s(a, e) for _, a, e in rec.copies)
            # dequantization marks are on the compute stream before rec.end: complete once it is
            dequant_s = sum(b.elapsed_s(a, e) for _, a, e in rec.dequants)
            if b.measures_stall:
                stall_s = 0.0
                for vid, (x, y) in rec.waits:
                    t = b.elapsed_s(x, y)
                    stall_s += t
                    per_visit[self.keys[vid]] = per_visit.get(self.keys[vid], 0.0) + t
        stats = ForwardStats(
            index=rec.index, host_wall_s=rec.host_wall_s, device_s=b.elapsed_s(rec.start, rec.end),
            bytes_copied=rec.bytes, copies=len(rec.copies), copy_s=copy_s, stall_s=stall_s,
            host_overhead_s=rec.overhead_s, stage_entries=rec.entries, max_hook_s=rec.max_hook_s,
            visit_stall_s=per_visit, dequants=len(rec.dequants), dequant_s=dequant_s,
            dequant_host_s=rec.dequant_host_s, events=events)
        b.recycle(self._marks(rec))
        return stats

    def stats(self) -> list[ForwardStats]:
        """Statistics of the finished forwards still in the history (oldest first); waits for their events."""
        while self._pending:
            self.history.append(self._finalize(self._pending.popleft()))
        return list(self.history)
