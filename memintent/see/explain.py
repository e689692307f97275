"""``memintent explain``: the plan's decisions as a table a person can read."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from memintent.ir.model import (
    Block,
    ObjectKind,
    Program,
    Residency,
    SlotKind,
    Visit,
    describe_admission,
)
from memintent.passes.costs import link_busy_s
from memintent.see.timeline import streamed_where
from memintent.units import fmt_bytes, fmt_s

_COLUMNS = ("block", "where", "bytes", "moved", "slot", "stages", "issue", "arrive", "deadline", "slack")
_LEFT = ("block", "where", "stages", "issue")


def _print_header(p: Program, console: Console) -> None:
    console.print(f"[bold]{p.name}[/bold]  ({p.model.ref}, {p.model.dtype})  fingerprint {p.fingerprint[:19]}...")
    g = p.generation
    shape = (f"one engine step of up to {g.step_tokens} tokens of {g.max_seqs} sequences" if g is not None else
             f"batch {p.shape.batch} x seq {p.shape.seq}")
    console.print(f"shape proven: {shape}; hardware {p.hardware.name if p.hardware else '-'}; attention "
                  f"{p.model.attention}")
    if p.prediction is not None:
        pr = p.prediction
        console.print(f"host memory: {fmt_bytes(pr.host_pinned_bytes)} pinned + {fmt_bytes(pr.host_pageable_bytes)} "
                      "pageable (run and generate check it against what the machine has free, before filling)")


def _print_prediction(p: Program, console: Console) -> None:
    pr = p.prediction
    unpack = p.unpack_slot()
    slots = f"{pr.prefetch_depth} stream slots {fmt_bytes(pr.stream_slot_bytes)}" + (
        f" (an unpack slot of {fmt_bytes(p.arena.slots[unpack].size_bytes)} among them)" if unpack is not None else "")
    console.print(
        f"budget {fmt_bytes(p.budget_bytes)}: arena {fmt_bytes(pr.arena_bytes)} (resident {fmt_bytes(pr.resident_bytes)}"
        + (f", HBM store {fmt_bytes(pr.stored_bytes)}" if pr.stored_bytes else "") + f", {slots}, KV {fmt_bytes(pr.kv_bytes)}) + "
        f"activations {fmt_bytes(pr.activation_peak_bytes)} (peak at step {pr.peak_step}) + workspace "
        f"{fmt_bytes(pr.workspace_bytes)} = peak {fmt_bytes(pr.peak_hbm_bytes)}")
    console.print(
        f"predicted forward {fmt_s(pr.step_time_s)} steady, {fmt_s(pr.first_step_time_s)} cold; compute "
        f"{fmt_s(pr.compute_s)}, stall {fmt_s(pr.stall_s)}; streamed {fmt_bytes(pr.streamed_bytes)}/forward"
        + (f", read in place {fmt_bytes(pr.mapped_bytes)}/forward ({_mapped_names(p)})" if pr.mapped_bytes else "")
        + "; floor "
        f"{fmt_s(pr.floor_s)}; binding: {pr.binding}")
    for note in pr.notes:
        console.print(f"note: {note}")


def _mapped_names(p: Program) -> str:
    """The mapped blocks, by name."""
    return ", ".join(b.name for b in p.blocks if b.residency == Residency.mapped)


def _store_note(p: Program) -> str:
    """How many streamed blocks copy from the HBM store rather than over PCIe, and its bytes."""
    stored = [b for b in p.blocks if b.in_hbm_store]
    if not stored:
        return ""
    return (f"; {len(stored)} of them copied from the HBM store ({fmt_bytes(p.prediction.stored_bytes)} packed in "
            f"HBM), not over PCIe")


def _print_generation(p: Program, console: Console) -> None:
    g = p.generation
    streamed = [b for b in p.blocks if b.residency == Residency.streamed]
    quant = {q: sum(1 for b in streamed if b.quant.value == q) for q in ("none", "int8", "int4", "int4g")}
    console.print(
        f"[bold]generation[/bold] ({g.objective}): {g.concurrency} sequences at once, context {g.context}, "
        f"workload prompt {g.prompt_len} + {g.gen_len} generated: predicted {g.tokens_per_s:.2f} tok/s, step "
        f"{fmt_s(g.decode_step_s)}; binding: {g.binding}; streamed blocks by bit width: bf16 {quant['none']}, "
        f"int8 {quant['int8']}, int4 {quant['int4']}, int4g {quant['int4g']} (policy {g.quant_policy})"
        + _store_note(p))
    _print_pool(p, console)
    visited = {v.block for v in p.visits}
    if not any(b.name in visited for b in streamed):
        console.print("nothing streams: the weights and the KV pool fit the budget together")
    if g.run is not None:
        console.print(run_summary(g))
        console.print(f"  concurrency over the run (a point every {fmt_s(g.run.series_interval_s)}): "
                      f"{sparkline(g.run.concurrency, max(g.run.concurrency, default=0))} "
                      f"{' '.join(str(n) for n in g.run.concurrency)}")
    for alt in g.alternatives:
        console.print(f"  rejected: {alt}")


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(xs: list[int], top: int) -> str:
    """One character per value, its height the value against ``top``."""
    return "".join(SPARK[min(len(SPARK) - 1, round(x / top * (len(SPARK) - 1)))] if top else SPARK[0] for x in xs)


def run_summary(g) -> str:
    """The predicted run a generation plan records (``GenerationPlan.run``), in one line."""
    r = g.run
    admission = describe_admission(g.admission, g.admission_class_tokens)
    return (f"predicted run of {r.workload}: {fmt_s(r.run_s)}, {r.tokens_per_s:.2f} tok/s ({r.generated_tokens} "
            f"tokens in {r.steps} steps, {r.preemptions} preemptions, admission {admission}); time to first token "
            f"median {fmt_s(r.ttft_median_s)}, p99 {fmt_s(r.ttft_p99_s)}; per output token median "
            f"{fmt_s(r.tpot_median_s)}, p99 {fmt_s(r.tpot_p99_s)}{_bound_note(r)}")


def _bound_note(r) -> str:
    """The run's ceiling under the plan (``RunPrediction.bound_s``), where the planner computed one."""
    if not r.bound_s:
        return ""
    return (f"; no run of these requests under this plan is shorter than {fmt_s(r.bound_s)} "
            f"({r.generated_tokens / r.bound_s:.2f} tok/s: its fewest steps, the pool's fill included, at its "
            "cheapest step)")


def _print_pool(p: Program, console: Console) -> None:
    """The KV pool, its intent annotations and the preemption policy they drive (spec/serving.md)."""

    kv, g = p.kv_pool, p.generation
    obj = next((o for o in p.objects if o.kind == ObjectKind.kv), None)
    if kv is None or obj is None:
        return
    console.print(
        f"KV pool: {kv.num_pages - 1} pages of {kv.page_tokens} tokens (+ the null page), "
        f"{fmt_bytes(kv.page_bytes)} each, {fmt_bytes(kv.num_pages * kv.page_bytes)}; keys and values "
        f"{kv.quant.value if kv.quant.value != 'none' else p.model.dtype} (policy {g.kv_quant_policy}); "
        f"{(kv.num_pages - 1) * kv.page_tokens} tokens, {fmt_bytes(kv.swap_pages * kv.page_bytes)} of host swap "
        f"space")
    pr = p.prediction
    link_idle_s = max(pr.step_time_s - link_busy_s(p.hardware, pr.streamed_bytes, pr.mapped_bytes), 0)
    console.print(
        f"preemption by cost, per block: swap {fmt_s(obj.evict_cost_s)} (out and back in on the copy engine), "
        f"recompute {fmt_s(obj.recompute_cost_s)}; per step the copy engine idles {fmt_s(link_idle_s)} "
        f"and compute {fmt_s(max(p.prediction.step_time_s - p.prediction.compute_s, 0))}: victims "
        f"{'recompute' if p.prediction.binding == 'pcie' else 'swap when that is cheaper'}; swapped pages come "
        f"back before the first attention, {fmt_s(obj.urgency_s)} into a step")


def _unstreamed_row(b: Block, vs: list[Visit]) -> list[str]:
    """A block that never moves: resident, read in place (mapped), or streamed but used by no visit."""
    where = {Residency.resident: "resident", Residency.mapped: "mapped (read in place)"}.get(b.residency,
                                                                                          "host (unused)")
    stages = ", ".join(f"{v.first_stage}-{v.last_stage}" for v in vs) or "-"
    return [b.name, where, fmt_bytes(b.size_bytes), "-", str(b.slot if b.slot is not None else "-"), stages,
            "-", "-", "-", "-"]


def _visit_row(p: Program, b: Block, v: Visit) -> list[str]:
    """One streamed visit: where its copy is issued, when it arrives, its deadline and slack."""
    if v.issue_stage is None:
        issue = "-"
    elif v.issue_stage >= len(p.stages):
        issue = "end"
    else:
        issue = f"step {p.stages[v.issue_stage].first_step}"
    if v.issue_next_forward:
        issue += " (prev fwd)"
    slack = "-" if v.slack_s is None else f"[red]{fmt_s(v.slack_s)}[/red]" if v.slack_s < 0 else fmt_s(v.slack_s)
    quant = "" if b.quant.value == "none" else "/" + b.quant.value
    return [b.name, f"{streamed_where(b)}{quant}", fmt_bytes(b.size_bytes), fmt_bytes(b.transfer_bytes or b.size_bytes),
            str(v.slot), f"{v.first_stage}-{v.last_stage}", issue, fmt_s(v.arrive_s), fmt_s(v.deadline_s), slack]


def _blocks_table(p: Program) -> Table:
    t = Table(show_edge=False, header_style="bold")
    for col in _COLUMNS:
        t.add_column(col, justify="left" if col in _LEFT else "right")
    visits_of: dict[str, list[Visit]] = {}
    for v in p.visits:
        visits_of.setdefault(v.block, []).append(v)
    for b in p.blocks:
        vs = visits_of.get(b.name, [])
        if b.residency in (Residency.resident, Residency.mapped) or not vs:
            t.add_row(*_unstreamed_row(b, vs))
            continue
        for v in vs:
            t.add_row(*_visit_row(p, b, v))
    return t


def explain(p: Program, console: Console) -> None:
    _print_header(p, console)
    if p.prediction is None or p.arena is None:
        console.print("no plan: this program was traced but not scheduled")
        return
    _print_prediction(p, console)
    if p.generation is not None:
        _print_generation(p, console)
    console.print(_blocks_table(p))
    n_stream = sum(1 for s in p.arena.slots if s.kind == SlotKind.stream)
    console.print(f"{len(p.actions)} actions; {n_stream} stream slots; slack < 0 means compute waits for that copy")


def explain_pipeline(pl, console: Console) -> None:
    """A pipeline (``compile --gpus``): each part's layers, memory, step and what it sends downstream; then the
    tick (every part busy with its own micro-batch) and a micro-batch's time through all of them."""
    g = pl.parts[0].generation
    console.print(f"[bold]{pl.name}[/bold]: {pl.model.ref} over {len(pl.parts)} parts; every part serves steps of "
                  f"up to {g.step_tokens} tokens of {g.max_seqs} sequences, {g.concurrency} at once, over "
                  f"{pl.parts[0].kv_pool.num_pages - 1} KV pages (each part holds its layers' share)")
    t = Table(title="parts")
    for col in ("part", "layers", "budget", "peak", "streamed/step", "step", "binds", "sends/step"):
        t.add_column(col, justify="right" if col not in ("layers", "binds") else "left")
    for i, (rng, p) in enumerate(zip(pl.layers, pl.parts)):
        pr = p.prediction
        t.add_row(str(i), f"{rng[0]}-{rng[1] - 1}", fmt_bytes(p.budget_bytes), fmt_bytes(pr.peak_hbm_bytes),
                  fmt_bytes(pr.streamed_bytes), fmt_s(pr.step_time_s), pr.binding,
                  fmt_bytes(pl.send_bytes[i]) if i < len(pl.send_bytes) else "-")
    console.print(t)
    console.print(pipeline_summary(pl))


def pipeline_summary(pl) -> str:
    """A pipeline's ticks in one line (``compile`` and ``explain`` print it)."""
    n, g = len(pl.parts), pl.parts[0].generation
    return (f"{n} micro-batches of about {-(-g.concurrency // n)} sequences keep every part busy: a tick (the "
            f"slowest part) {fmt_s(pl.pipelined_step_s)}, one micro-batch through every part "
            f"{fmt_s(pl.serial_step_s)}; predicted {pl.tokens_per_s:.2f} tok/s")
