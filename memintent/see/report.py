"""``memintent report``: one self-contained HTML page that shows a plan, for a person who never opens a terminal.

The plan's numbers are in ``explain``; what they do not convey is the shape of things: memory filling up against
the budget step by step, copies sliding under compute (or not), which block makes compute wait. The page has:

1. HBM over the forward's steps, stacked by kind (resident weights, stream slots, KV, activations, workspace)
   against the budget, with the stream slots' occupied part as a line;
2. the predicted timeline, copy lane against compute lane, and the measured one below it when a run's trace is
   given;
3. stall and slack per streamed block (predicted, and measured stall when given);
4. tables: the summary numbers and the plan's choice for every block.

Figures are PNGs made with matplotlib's Agg renderer through ``matplotlib.figure.Figure`` (no pyplot: no global
backend switch, no window), embedded in the HTML as base64 and also written next to it as ``<stem>-*.png``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from memintent.errors import MemintentError
from memintent.ir.model import Program, Residency
from memintent.see.perfetto import MeasuredEvent, write_bytes_atomic
from memintent.see.timeline import MEMORY_KINDS, Timeline, build_timeline, streamed_where
from memintent.units import fmt_bytes, fmt_s

# Colours per memory kind, in MEMORY_KINDS order (colour-blind-safe Okabe-Ito palette).
_KIND_COLOURS = ("#0072B2", "#56B4E9", "#009E73", "#E69F00", "#999999")
_COMPUTE_STREAMED, _COMPUTE_RESIDENT, _COMPUTE_GLUE = "#009E73", "#0072B2", "#BBBBBB"
_COMPUTE_MEASURED = "#6C7A96"
_COPY, _STALL, _DEQUANT = "#E69F00", "#D55E00", "#CC79A7"


# ---------------------------------------------------------------------------------------------------------------
# measured events, summarised


@dataclass(slots=True)
class MeasuredSummary:
    """The measured run as the report shows it. Steady forwards are all but the first when there are several
    (the first one has no prefetch from a previous forward), else the only one."""

    forwards: list[int] = field(default_factory=list)
    steady: list[int] = field(default_factory=list)
    shown_forward: int | None = None               # the forward drawn in the timeline (the last one)
    step_time_s: float | None = None               # mean compute-lane span of a steady forward
    stall_s: float | None = None                   # mean stall per steady forward
    copy_busy_s: float | None = None               # mean copy-lane busy time per steady forward
    stall_by_block_s: dict[str, float] = field(default_factory=dict)   # mean per steady forward


def _event_block(e: MeasuredEvent) -> str:
    if e.block:
        return e.block
    name = e.name.removeprefix("wait ").strip()
    return name.split("@")[0]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _compute_span_s(events: list[MeasuredEvent]) -> float | None:
    """First compute-lane start to last compute-lane end: the forward's length (None without compute events)."""
    comp = [e for e in events if e.lane == "compute"]
    return max(e.end_s for e in comp) - min(e.start_s for e in comp) if comp else None


def _stall_events(events: list[MeasuredEvent]) -> list[MeasuredEvent]:
    return [e for e in events if e.lane == "compute" and e.stall]


def _copy_busy_s(events: list[MeasuredEvent]) -> float:
    return sum(e.duration_s for e in events if e.lane == "copy")


def _stall_by_block_s(stalls: list[MeasuredEvent]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in stalls:
        out[_event_block(e)] = out.get(_event_block(e), 0.0) + e.duration_s
    return out


def summarise_measured(events: list[MeasuredEvent]) -> MeasuredSummary:
    s = MeasuredSummary()
    if not events:
        return s
    s.forwards = sorted({e.forward for e in events})
    s.steady = s.forwards[1:] if len(s.forwards) > 1 else s.forwards
    s.shown_forward = s.forwards[-1]
    steady = [[e for e in events if e.forward == f] for f in s.steady]
    stalls = [_stall_events(evs) for evs in steady]
    s.step_time_s = _mean([span for span in map(_compute_span_s, steady) if span is not None])
    s.stall_s = _mean([sum(e.duration_s for e in evs) for evs in stalls])
    s.copy_busy_s = _mean([_copy_busy_s(evs) for evs in steady])
    per_block = _stall_by_block_s([e for evs in stalls for e in evs])
    s.stall_by_block_s = {b: t / len(s.steady) for b, t in per_block.items()}
    return s


# ---------------------------------------------------------------------------------------------------------------
# units for axes


def _byte_unit(max_bytes: float) -> tuple[str, float]:
    for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if max_bytes >= scale:
            return name, float(scale)
    return "bytes", 1.0


def _time_unit(max_s: float) -> tuple[str, float]:
    a = abs(max_s)
    if a >= 1:
        return "s", 1.0
    if a >= 1e-3:
        return "ms", 1e3
    return "µs", 1e6


# ---------------------------------------------------------------------------------------------------------------
# figures


def _figure(width_in: float, height_in: float):
    try:
        from matplotlib.figure import Figure  # deferred: heavy, optional
    except ImportError:
        raise MemintentError("memintent report needs matplotlib: pip install 'memintent[plot]'") from None
    return Figure(figsize=(width_in, height_in), layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def memory_figure(tl: Timeline) -> bytes:
    fig = _figure(11, 4.8)
    ax = fig.add_subplot()
    peak = tl.peak
    top = max(tl.budget_bytes, peak.total_bytes if peak else 0)
    unit, scale = _byte_unit(top)
    steps = [m.step for m in tl.memory]
    series = [[getattr(m, attr) / scale for m in tl.memory] for _, attr in MEMORY_KINDS]
    labels = [k for k, _ in MEMORY_KINDS]
    if steps:
        ax.stackplot(steps, *series, labels=labels, colors=_KIND_COLOURS, step="post", alpha=0.9)
        # What is actually held: stream slots counted only while a visit occupies them.
        ax.step(steps, [m.occupied_total_bytes / scale for m in tl.memory], where="post", color="black",
                linewidth=1.0, linestyle=":", label="in use (stream slots only while occupied by a visit)")
        ax.plot([peak.step], [peak.total_bytes / scale], marker="v", color="black", linestyle="none",
                label=f"peak {fmt_bytes(peak.total_bytes)} at step {peak.step}")
    ax.axhline(tl.budget_bytes / scale, color="#CC0000", linestyle="--", linewidth=1.5,
               label=f"budget {fmt_bytes(tl.budget_bytes)}")
    ax.set_xlim(0, max(len(steps) - 1, 1))
    ax.set_ylim(0, top / scale * 1.12)
    ax.set_xlabel("step (operation index in one forward)")
    ax.set_ylabel(f"HBM ({unit})")
    ax.set_title(f"{tl.name}: predicted HBM by kind per step (allocated), against the budget")
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _lane_label(ax, x0: float, width: float, y: float, text: str, span: float, room: float | None = None) -> None:
    """Label a bar where the text fits: centred in the bar, or (``room``: free lane space from the bar's start to
    the next bar) left-aligned from the bar's start when the bar itself is too narrow."""
    need = span * 0.0045 * max(len(text), 3)
    if width > need:
        ax.text(x0 + width / 2, y, text, ha="center", va="center", fontsize=7, clip_on=True)
    elif room is not None and room > need:
        ax.text(x0 + span * 0.002, y, text, ha="left", va="center", fontsize=7, clip_on=True)


def _draw_predicted(ax, tl: Timeline, block_residency: dict[str, Residency]) -> None:
    unit, scale = _time_unit(tl.step_time_s)
    t0 = min([0.0] + [c.issue_s for c in tl.copies])
    span = (tl.step_time_s - t0) * scale or 1.0
    for st in tl.stages:
        colour = (_COMPUTE_GLUE if not st.block else
                  _COMPUTE_STREAMED if block_residency.get(st.block) == Residency.streamed else _COMPUTE_RESIDENT)
        if st.stall_s > 0:
            ax.broken_barh([(st.entry_s * scale, st.stall_s * scale)], (0.1, 0.8), facecolors=_STALL,
                           hatch="//", edgecolor="white")
            _lane_label(ax, st.entry_s * scale, st.stall_s * scale, 0.5,
                        "wait " + ", ".join(w.split("@")[0] for w in st.waits), span)
        w = (st.end_s - st.start_s) * scale
        ax.broken_barh([(st.start_s * scale, w)], (0.1, 0.8), facecolors=colour, edgecolor="white", linewidth=0.5)
        _lane_label(ax, st.start_s * scale, w, 0.5, st.module or "", span)
    starts = sorted(c.start_s for c in tl.copies) + [tl.step_time_s]
    for c in tl.copies:
        w = (c.end_s - c.start_s) * scale
        ax.broken_barh([(c.start_s * scale, w)], (1.1, 0.8), facecolors=_COPY, edgecolor="white", linewidth=0.5)
        nxt = min((t for t in starts if t > c.start_s), default=tl.step_time_s)
        _lane_label(ax, c.start_s * scale, w, 1.5, c.block, span, room=(nxt - c.start_s) * scale)
        if c.ready_s > c.end_s:
            # A quantized block is usable only after dequantisation: a thin strip under the copy lane.
            ax.broken_barh([(c.end_s * scale, (c.ready_s - c.end_s) * scale)], (1.0, 0.12), facecolors=_DEQUANT)
        # The deadline: where compute needs the block.
        ax.plot([c.deadline_s * scale] * 2, [1.1, 1.9], color="black", linewidth=0.6, alpha=0.5)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(tl.step_time_s * scale, color="black", linewidth=0.8)
    if t0 < 0:
        ax.axvspan(t0 * scale, 0, color="#EEEEEE", zorder=-1)
        ax.text(t0 * scale, 2.05, "previous forward's tail", fontsize=7, va="bottom")
    ax.set_xlim(t0 * scale - span * 0.01, tl.step_time_s * scale + span * 0.01)
    ax.set_ylim(0, 2.3)
    ax.set_yticks([0.5, 1.5], ["compute", "copy"])
    ax.set_xlabel(f"time from the steady-state forward's start ({unit})")
    ax.set_title(f"predicted: {fmt_s(tl.step_time_s)} per forward, stall {fmt_s(tl.stall_s)}, copy engine busy "
                 f"{tl.copy_busy_frac:.0%} (vertical ticks on the copy lane: deadlines)", fontsize=10)


def _draw_measured(ax, events: list[MeasuredEvent], forward: int) -> None:
    fwd = [e for e in events if e.forward == forward]
    comp = [e for e in fwd if e.lane == "compute"]
    origin = min((e.start_s for e in comp), default=min((e.start_s for e in fwd), default=0.0))
    end = max((e.end_s for e in fwd), default=origin)
    lo = min((e.start_s for e in fwd), default=origin)
    unit, scale = _time_unit(end - origin)
    span = (end - lo) * scale or 1.0
    copy_starts = sorted(e.start_s for e in fwd if e.lane == "copy") + [end]
    for e in fwd:
        x0, w = (e.start_s - origin) * scale, e.duration_s * scale
        if e.lane == "copy":
            ax.broken_barh([(x0, w)], (1.1, 0.8), facecolors=_COPY, edgecolor="white", linewidth=0.5)
            nxt = min((t for t in copy_starts if t > e.start_s), default=end)
            _lane_label(ax, x0, w, 1.5, _event_block(e), span, room=(nxt - e.start_s) * scale)
        elif e.stall:
            ax.broken_barh([(x0, w)], (0.1, 0.8), facecolors=_STALL, hatch="//", edgecolor="white")
        else:
            ax.broken_barh([(x0, w)], (0.1, 0.8), facecolors=_COMPUTE_MEASURED, edgecolor="white", linewidth=0.5)
            _lane_label(ax, x0, w, 0.5, e.name, span)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim((lo - origin) * scale - span * 0.01, (end - origin) * scale + span * 0.01)
    ax.set_ylim(0, 2.3)
    ax.set_yticks([0.5, 1.5], ["compute", "copy"])
    ax.set_xlabel(f"time from the forward's first compute event ({unit})")
    ax.set_title(f"measured: forward {forward}", fontsize=10)


def timeline_figure(tl: Timeline, p: Program, measured: list[MeasuredEvent] | None,
                    summary: MeasuredSummary | None) -> bytes:
    from matplotlib.patches import Patch  # deferred: heavy, optional

    rows = 2 if measured else 1
    fig = _figure(12, 2.6 * rows + 0.9)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    residency = {b.name: b.residency for b in p.blocks}
    _draw_predicted(axes[0], tl, residency)
    if measured and summary is not None and summary.shown_forward is not None:
        _draw_measured(axes[1], measured, summary.shown_forward)
    handles = [Patch(color=_COMPUTE_STREAMED, label="compute, streamed block"),
               Patch(color=_COMPUTE_RESIDENT, label="compute, resident block"),
               Patch(color=_COMPUTE_GLUE, label="compute, root glue")]
    if measured:
        handles.append(Patch(color=_COMPUTE_MEASURED, label="compute, measured"))
    handles += [Patch(facecolor=_STALL, hatch="//", label="stall (waiting for a copy)"),
                Patch(color=_COPY, label="host-to-device copy")]
    if any(c.ready_s > c.end_s for c in tl.copies):
        handles.append(Patch(color=_DEQUANT, label="dequantisation after arrival"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"{tl.name}: copy lane against compute lane", fontsize=11)
    return _png(fig)


def _draw_stall(ax, tl: Timeline, blocks: list[str], summary: MeasuredSummary | None, unit: str,
                scale: float) -> None:
    """Stall per forward caused by each streamed block: predicted, and measured beside it when given."""
    pred = tl.stall_by_block()
    meas = summary.stall_by_block_s if summary and summary.steady else None
    x = list(range(len(blocks)))
    width = 0.4 if meas is not None else 0.7
    off = width / 2 if meas is not None else 0.0
    ax.bar([i - off for i in x], [pred.get(b, 0.0) * scale for b in blocks], width, color=_STALL, label="predicted")
    if meas is not None:
        ax.bar([i + off for i in x], [meas.get(b, 0.0) * scale for b in blocks], width, color="#555555",
               label=f"measured (mean of {len(summary.steady)} forward(s))")
    if blocks and not any(pred.values()) and not any((meas or {}).values()):
        ax.text(0.5, 0.5, "no stall: every copy is ready before compute needs it", transform=ax.transAxes,
                ha="center", va="center", fontsize=9)
    ax.set_ylabel(f"stall per forward ({unit})")
    ax.set_title(f"{tl.name}: compute stall caused by each streamed block", fontsize=10)
    if blocks:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _draw_slack(ax, tl: Timeline, blocks: list[str], unit: str, scale: float) -> None:
    """Predicted slack per visit (several visits of one block sit at the same x)."""
    idx = {b: i for i, b in enumerate(blocks)}
    ax.bar([idx[c.block] for c in tl.copies], [c.ready_slack_s * scale for c in tl.copies], 0.7,
           color=["#009E73" if c.ready_slack_s >= 0 else _STALL for c in tl.copies])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"slack ({unit})")
    quant = any(c.ready_s > c.end_s for c in tl.copies)
    ax.set_title("predicted slack per copy: deadline minus " + ("ready time (arrival + dequantisation)" if quant
                 else "arrival") + " (below 0: compute waits)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(list(range(len(blocks))), blocks, rotation=90 if len(blocks) > 12 else 0,
                  fontsize=7 if len(blocks) > 24 else 9)
    ax.set_xlabel("streamed block (visit order)")


def stall_figure(tl: Timeline, summary: MeasuredSummary | None) -> bytes:
    fig = _figure(11, 5.2)
    ax_stall, ax_slack = fig.subplots(2, 1, sharex=True)
    blocks = list(dict.fromkeys(c.block for c in tl.copies))
    meas = summary.stall_by_block_s if summary and summary.steady else {}
    top = max([tl.stall_by_block().get(b, 0.0) for b in blocks] + [meas.get(b, 0.0) for b in blocks]
              + [abs(c.ready_slack_s) for c in tl.copies] + [1e-9])
    unit, scale = _time_unit(top)
    _draw_stall(ax_stall, tl, blocks, summary, unit, scale)
    if not blocks:
        for ax in (ax_stall, ax_slack):
            ax.text(0.5, 0.5, "nothing streams: every block is resident", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9)
            ax.set_ylim(0, 1)
    _draw_slack(ax_slack, tl, blocks, unit, scale)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1300px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
td.neg { color: #C00; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def _row(cells: list[str], header: bool = False, left: int = 1, classes: dict[int, str] | None = None) -> str:
    tag = "th" if header else "td"
    out = []
    for i, c in enumerate(cells):
        cls = ["l"] if i < left else []
        if classes and i in classes:
            cls.append(classes[i])
        out.append(f"<{tag}{' class=' + repr(' '.join(cls)) if cls else ''}>{html.escape(str(c))}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _summary_table(p: Program, tl: Timeline, summary: MeasuredSummary | None) -> str:
    pr = p.prediction
    peak = tl.peak
    rows = [
        ("model", f"{p.model.ref} ({p.model.dtype}), batch {p.shape.batch} x seq {p.shape.seq}"
                  + (f", a KV pool of {p.kv_pool.num_pages - 1} pages of {p.kv_pool.page_tokens} tokens"
                     if p.kv_pool else "")),
        ("hardware", f"{p.hardware.name}: {p.hardware.source}"),
        ("forward, steady state", fmt_s(tl.step_time_s)),
        ("forward, cold start", fmt_s(tl.first_step_time_s)),
        ("compute", fmt_s(tl.compute_s)),
        ("stall (steady state)", fmt_s(tl.stall_s)),
        ("floor: max(streamed bytes / host link, compute)", fmt_s(pr.floor_s)),
        ("streamed per forward", f"{fmt_bytes(pr.streamed_bytes)} in {len(tl.copies)} copies"),
        ("copy engine busy", f"{fmt_s(tl.copy_busy_s)} per forward ({tl.copy_busy_frac:.0%} of the forward)"),
        ("binding constraint", tl.binding or "-"),
        ("budget", fmt_bytes(tl.budget_bytes)),
        ("arena", f"{fmt_bytes(pr.arena_bytes)}: resident {fmt_bytes(pr.resident_bytes)}, {pr.prefetch_depth} "
                  f"stream slot(s) {fmt_bytes(pr.stream_slot_bytes)}, KV {fmt_bytes(pr.kv_bytes)}"),
        ("activations (peak)", f"{fmt_bytes(pr.activation_peak_bytes)} at step {pr.peak_step}"),
        ("workspace", fmt_bytes(pr.workspace_bytes)),
        ("peak HBM", f"{fmt_bytes(peak.total_bytes if peak else pr.peak_hbm_bytes)} of "
                     f"{fmt_bytes(tl.budget_bytes)} "
                     f"({(peak.total_bytes if peak else pr.peak_hbm_bytes) / tl.budget_bytes:.1%}) at step "
                     f"{peak.step if peak else pr.peak_step}"),
    ]
    if summary is not None and summary.forwards:
        rows += [
            ("measured forwards", f"{len(summary.forwards)} (steady: {len(summary.steady)})"),
            ("measured forward, steady (mean)", fmt_s(summary.step_time_s)),
            ("measured stall per forward (mean)", fmt_s(summary.stall_s)),
            ("measured copy busy per forward (mean)", fmt_s(summary.copy_busy_s)),
        ]
    rows += [("note", n) for n in pr.notes]
    return "<table>" + "".join(_row([k, v], left=2) for k, v in rows) + "</table>"


def _blocks_head(quant: bool, measured: bool) -> list[str]:
    return (["block", "residency", "bytes", "moved per visit", "slot", "stages", "copy issued", "arrival"]
            + (["ready"] if quant else []) + ["deadline", "slack", "predicted stall"]
            + (["measured stall"] if measured else []))


def _copy_cells(p: Program, b, c, quant: bool, meas: dict[str, float] | None) -> list[str]:
    """One streamed visit's row: its copy's issue, arrival (and ready time when dequantised), deadline, slack."""
    if c.issue_stage >= len(p.stages):
        issue = "forward end"
    else:
        issue = f"stage {c.issue_stage} (step {p.stages[c.issue_stage].first_step})"
    if c.next_forward:
        issue += ", previous forward"
    q = "" if b.quant.value == "none" else f" ({b.quant.value})"
    cells = [b.name, streamed_where(b) + q, fmt_bytes(b.size_bytes), fmt_bytes(c.transfer_bytes), str(c.slot),
             f"{c.first_stage}-{c.last_stage}", issue, fmt_s(c.end_s)]
    cells += ([fmt_s(c.ready_s)] if quant else []) + [fmt_s(c.deadline_s), fmt_s(c.ready_slack_s), fmt_s(c.stall_s)]
    if meas is not None:
        cells.append(fmt_s(meas.get(b.name, 0.0)))
    return cells


def _blocks_table(p: Program, tl: Timeline, summary: MeasuredSummary | None) -> str:
    copies = {c.visit: c for c in tl.copies}
    meas = summary.stall_by_block_s if summary and summary.steady else None
    quant = any(c.ready_s > c.end_s for c in tl.copies)   # show when dequantisation makes a block usable
    head = _blocks_head(quant, meas is not None)
    slack_col = head.index("slack")
    out = ["<table>", _row(head, header=True, left=2)]
    visits_of: dict[str, list[int]] = {}
    for i, v in enumerate(p.visits):
        visits_of.setdefault(v.block, []).append(i)
    for b in p.blocks:
        vis = visits_of.get(b.name, [])
        streamed_vis = [i for i in vis if i in copies]
        if not streamed_vis:
            where = "resident" if b.residency == Residency.resident else "host (never used)"
            stages = ", ".join(f"{p.visits[i].first_stage}-{p.visits[i].last_stage}" for i in vis) or "-"
            cells = [b.name, where, fmt_bytes(b.size_bytes), "-", str(b.slot if b.slot is not None else "-"),
                     stages] + ["-"] * (len(head) - 6)
            out.append(_row(cells, left=2))
        for i in streamed_vis:
            c = copies[i]
            out.append(_row(_copy_cells(p, b, c, quant, meas), left=2,
                            classes={slack_col: "neg"} if c.ready_slack_s < 0 else None))
    out.append("</table>")
    return "".join(out)


def _kv_section(engine, img) -> str:
    if engine is None:
        return ""
    kinds: dict[str, int] = {}
    for e in engine[1]:
        kinds[e.get("kind", "?")] = kinds.get(e.get("kind", "?"), 0) + 1
    said = ", ".join(f"{n} by {k}" for k, n in sorted(kinds.items())) or "none"
    return (f"<h2>KV pool over the run</h2><p class='note'>Blocks in use after each engine step (measured); "
            f"preemptions: {html.escape(said)}.</p>" + img("kv", "KV pool use over time and preemptions"))


def _stages_table(tl: Timeline) -> str:
    out = ["<table>", _row(["stage", "module", "steps", "start", "end", "stall", "copies issued on entry"],
                           header=True, left=2)]
    for st in tl.stages:
        out.append(_row([str(st.index), st.module or "(root glue)", f"{st.first_step}-{st.last_step}",
                         fmt_s(st.start_s), fmt_s(st.end_s), fmt_s(st.stall_s), ", ".join(st.issued) or "-"],
                        left=2, classes={5: "neg"} if st.stall_s > 0 else None))
    out.append("</table>")
    return "".join(out)


def kv_pool_figure(engine: tuple[list[tuple[float, int]], list[dict], int]) -> bytes:
    """A serving run's KV pool use over time, with its preemptions marked by kind."""
    samples, preemptions, usable = engine
    fig = _figure(11, 3.6)
    ax = fig.add_subplot()
    t = [s for s, _ in samples]
    ax.step(t, [u for _, u in samples], where="post", color=_KIND_COLOURS[2], label="blocks in use")
    ax.axhline(usable, color="#CC0000", linestyle="--", linewidth=1.2, label=f"pool: {usable} blocks")
    marks = {"swap": ("v", _COPY), "recompute": ("x", _STALL)}
    when = {i: s for i, (s, _) in enumerate(samples)}
    for kind, (marker, colour) in marks.items():
        xs = [when.get(e.get("step"), 0.0) for e in preemptions if e.get("kind") == kind]
        if xs:
            ax.plot(xs, [usable] * len(xs), marker=marker, color=colour, linestyle="none",
                    label=f"{len(xs)} preempted by {kind}")
    ax.set_ylim(0, usable * 1.15 + 1)
    ax.set_xlabel("time from the run's start (s)")
    ax.set_ylabel("KV pages")
    ax.set_title("KV pool use over the run, and preemptions")
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def write_report(p: Program, out_path: str | Path, measured: list[MeasuredEvent] | None = None,
                 plan_source: str = "", engine=None) -> list[Path]:
    """Write ``out_path`` (HTML) and ``<stem>-memory.png``, ``<stem>-timeline.png``, ``<stem>-stall.png`` (and, for
    a serving run's trace, ``<stem>-kv.png``) beside it; returns the paths written, HTML last. Every file is written
    atomically. ``engine``: ``perfetto.read_engine`` of the run's trace."""
    out_path = Path(out_path)
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise MemintentError(f"cannot write {out_path}: folder {folder} does not exist")
    tl = build_timeline(p)
    summary = summarise_measured(measured) if measured is not None else None
    pngs = {
        "memory": memory_figure(tl),
        "timeline": timeline_figure(tl, p, measured, summary),
        "stall": stall_figure(tl, summary),
    }
    if engine is not None:
        pngs["kv"] = kv_pool_figure(engine)
    written: list[Path] = []
    for name, data in pngs.items():
        path = folder / f"{out_path.stem}-{name}.png"
        write_bytes_atomic(path, data)
        written.append(path)

    def img(name: str, alt: str) -> str:
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'

    measured_note = ("" if measured is None else
                     f"<p class='note'>Measured: {len(measured)} events from a run's trace; the timeline shows "
                     f"forward {summary.shown_forward}; means are over forwards {summary.steady}.</p>")
    title = f"memintent plan report: {p.name}"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Plan {html.escape(plan_source or p.name)}, fingerprint {html.escape(p.fingerprint[:23])}&hellip;;
report written {_dt.datetime.now().isoformat(timespec="seconds")}. Times are predicted by the plan's cost model
for the steady-state forward (its copies issued in the previous forward's tail), unless marked measured.</p>
<h2>Summary</h2>
{_summary_table(p, tl, summary)}
{measured_note}
<h2>Memory over the forward</h2>
<p class="note">Stacked: what the plan allocates in HBM while each step runs. Stream slots are allocated for the
whole run; the dotted line counts them only while a visit occupies them (from its copy's issue to its free).</p>
{img("memory", "HBM by kind per step against the budget")}
<h2>Timeline</h2>
<p class="note">Copies run on their own stream and overlap compute; a hatched red bar is compute waiting for a
copy.</p>
{img("timeline", "copy lane against compute lane")}
<h2>Stall and slack per block</h2>
{img("stall", "stall and slack per streamed block")}
{_kv_section(engine, img)}
<h2>The plan's choices per block</h2>
<p class="note">Arrival, ready and deadline are times from the steady-state forward's start (negative: during the
previous forward). Slack = deadline &minus; the time the block is usable (its arrival, plus dequantisation for a
quantized block); below zero compute waits.</p>
{_blocks_table(p, tl, summary)}
<details><summary>Stages ({len(tl.stages)})</summary>
{_stages_table(tl)}
</details>
</body></html>
"""
    write_bytes_atomic(out_path, doc.encode("utf-8"))
    written.append(out_path)
    return written
