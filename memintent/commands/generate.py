"""``memintent generate``: prefill then greedy decode under a generation plan, KV cache in the plan's arena.

The plan (``compile --objective``) is the decode step of one wave of ``batch`` sequences; prefill runs the same
stages with the prompt, so the same actions stream the same blocks. The KV cache is the arena's KV slot, carved
per layer into keys and values of shape (batch, kv_heads, context, head_dim): the model writes each step's keys
and values at their positions and attends over the filled prefix.

The decode step runs eagerly: the plan's copies are issued from Python hooks between kernels, which a captured
CUDA graph would freeze; graph capture is left for plans with nothing to stream (see README, What it is not).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memintent.errors import MemintentError
from memintent.ir.model import ObjectKind, Program, Quant, Residency, SlotKind
from memintent.ir.plan_file import load_plan, write_atomic
from memintent.runtime.device import as_fault, pick_device, sync
from memintent.compiler.plan_source import resident_model, source_for
from memintent.runtime.profile import measure_h2d_gbps
from memintent.units import fmt_bytes, fmt_s


def carve_kv(program: Program, kv_flat: torch.Tensor, src) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k, v) views into the KV slot: each (B, KV, context, hd), layers laid end to end."""
    kv_objs = [o for o in program.objects if o.kind == ObjectKind.kv]
    layers = sorted({o.block for o in kv_objs}, key=lambda b: int(b.rsplit(".", 1)[-1]))
    per_layer_blocks = len(kv_objs) // max(len(layers), 1)
    ctx = per_layer_blocks * program.shape.kv_block_tokens
    b, kvh, hd = program.shape.batch, src.n_kv_heads, src.head_dim
    dtype = src.torch_dtype
    elt = torch.empty(0, dtype=dtype).element_size()
    one = b * kvh * ctx * hd * elt
    if 2 * one * len(layers) > kv_flat.numel():
        raise MemintentError(f"the plan's KV slot ({kv_flat.numel()} B) is smaller than {len(layers)} layers of "
                             f"keys and values ({2 * one * len(layers)} B)")
    caches, off = [], 0
    for _ in layers:
        k = kv_flat[off:off + one].view(dtype).view(b, kvh, ctx, hd)            # (B, KV, context, hd)
        v = kv_flat[off + one:off + 2 * one].view(dtype).view(b, kvh, ctx, hd)  # (B, KV, context, hd)
        caches.append((k, v))
        off += 2 * one
    return caches


def wave(prompts: torch.Tensor, w: int, b: int) -> tuple[torch.Tensor, int]:
    """Prompts of wave ``w`` as a (b, P) batch, and how many are real: the last wave is padded with copies of its
    first prompt to the planned batch (the plan's shapes are fixed); the padding rows' tokens are dropped."""
    rows = prompts[w * b:(w + 1) * b]                                            # (n, P)
    n = rows.shape[0]
    if n < b:
        rows = torch.cat([rows, rows[:1].expand(b - n, -1)])                     # (b, P)
    return rows, n


class GraphStep:
    """The decode step captured as a CUDA graph, replayed with the token and position copied into static inputs.

    Only for plans with nothing to stream (the runtime's hooks would have copies to issue between kernels; they
    are paused while capturing and replaying) and fixed shapes (one batch, one token). Capture happens before any
    prefill: its warm-up forwards write the KV cache at position 0, which every prefill overwrites."""

    def __init__(self, model, src, batch: int, device: torch.device, handle):
        self.model, self.src, self.handle = model, src, handle
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)   # (B, 1) static input
        self.pos = torch.zeros(1, dtype=torch.long, device=device)          # (1,) static input
        with handle.hooks_paused():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):    # kernels chosen and workspaces allocated before capture
                    src.logits(model(self.tok, self.pos))
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = src.logits(model(self.tok, self.pos))           # (B, vocab) static output

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


def greedy(model, src, prompts: torch.Tensor, gen_len: int, device: torch.device,
           step=None) -> tuple[torch.Tensor, float, float]:
    """Prefill ``prompts`` (B, P), then ``gen_len - 1`` greedy decode steps (``step``: a captured GraphStep, else
    the eager model). Returns tokens (B, gen_len), prefill seconds, decode seconds. No host sync inside the
    decode loop: the next token stays on the device."""
    b, p = prompts.shape
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        logits = src.logits(model(prompts, torch.arange(p, device=device)))      # (B, vocab)
        tok = logits.argmax(-1)                                                  # (B,)
        out = [tok]
        sync(device)
        t1 = time.perf_counter()
        # Positions made on the device once: torch.tensor([...], device=cuda) per step is a pageable copy that
        # blocks the host until the stream reaches it, so the host could never run ahead to issue the next step's
        # copies (measured: llama-3-8b decode steps 36% over their floor).
        positions = torch.arange(p, p + gen_len, device=device)                  # (gen_len,)
        for i in range(gen_len - 1):
            pos = positions[i:i + 1]                                             # (1,)
            if step is not None:
                logits = step(tok[:, None], pos)                                 # (B, vocab), graph replay
            else:
                logits = src.logits(model(tok[:, None], pos))                    # (B, vocab)
            tok = logits.argmax(-1)
            out.append(tok)
        sync(device)
        t2 = time.perf_counter()
    return torch.stack(out, 1).cpu(), t1 - t0, t2 - t1                           # (B, gen_len)


@dataclass
class GenerateReport:
    device: str
    batch: int
    prompt_len: int
    gen_len: int
    waves: list[dict] = field(default_factory=list)
    h2d_gbps: float = 0.0
    streamed_bytes: int = 0
    decode_floor_s: float = 0.0
    predicted_decode_step_s: float = 0.0
    predicted_tokens_per_s: float = 0.0
    total_s: float = 0.0
    requests: int = 0
    tokens_per_s: float = 0.0
    peak_hbm_bytes: int | None = None
    agreement: float | None = None
    identical: bool | None = None
    decode_mode: str = "eager"       # "cuda graph", or eager and why


def run_generate(args) -> int:
    """The CLI command: load the plan, generate, print, optionally write JSON; exit 1 on a verify mismatch."""
    from memintent.ir.plan_file import check_writable
    from memintent.passes.verify import verify as verify_plan

    program = verify_plan(load_plan(args.plan))   # a plan file is untrusted input: run only what verifies
    if getattr(args, "json", None):
        check_writable(args.json, "--json")
    if getattr(args, "trace", None):
        check_writable(args.trace, "--trace")
    rep, code = generate_plan(program, device=args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                              requests=args.requests, prompts_file=args.prompts, verify=args.verify,
                              check=args.check, seed=args.seed, allow_code=args.allow_code, warmup=args.warmup,
                              trace=getattr(args, "trace", None), graph=not getattr(args, "no_graph", False))
    if getattr(args, "json", None):
        write_atomic(args.json, json.dumps(asdict(rep), indent=1) + "\n")
    return code


def generate_plan(program: Program, *, device: str | None = None, prompt_len: int | None = None,
                  gen_len: int | None = None, requests: int | None = None, prompts_file: str | None = None,
                  verify: bool = False, check: bool = False, seed: int = 0, allow_code: bool = False,
                  store=None, quiet: bool = False, warmup: bool = False, graph: bool = True,
                  trace: str | None = None) -> tuple[GenerateReport, int]:
    """Generate under ``program`` and measure it; ``store``: a filled HostStore to reuse (benchmarks)."""
    from rich.console import Console

    from memintent.runtime import HostStore, attach

    if program.generation is None:
        raise MemintentError(f"{program.name} is not a generation plan: compile it with --objective throughput|latency")
    g = program.generation
    device = pick_device(device)
    src = source_for(program, allow_code)
    prompt_len = g.prompt_len if prompt_len is None else prompt_len
    gen_len = g.gen_len if gen_len is None else gen_len
    for flag, v in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--requests", 1 if requests is None else requests)):
        if v < 1:
            raise MemintentError(f"{flag} {v} must be at least 1")
    if prompt_len + gen_len - 1 > g.context:
        raise MemintentError(f"prompt {prompt_len} + {gen_len} generated tokens exceed the plan's KV context "
                             f"{g.context}: compile with a larger --context")
    b = g.batch
    gen = torch.Generator().manual_seed(seed)
    if prompts_file:
        try:
            rows = json.loads(Path(prompts_file).read_text())
            prompts = torch.tensor(rows, dtype=torch.long)
        except (OSError, ValueError, TypeError, OverflowError, RuntimeError, RecursionError) as e:
            raise MemintentError(f"--prompts {prompts_file}: expected a JSON list of equal-length lists of token "
                                 f"ids ({e})") from None
        if (prompts.dim() != 2 or prompts.numel() == 0 or prompts.shape[1] + gen_len - 1 > g.context
                or prompts.max() >= src.vocab_size or prompts.min() < 0):
            raise MemintentError(f"--prompts {prompts_file}: need (N, P) token ids below {src.vocab_size} with P + "
                                 f"gen_len - 1 <= {g.context}")
        requests = prompts.shape[0]
    else:
        requests = requests or b
        prompts = torch.randint(0, src.vocab_size, (requests, prompt_len), generator=gen)   # (N, P)
    waves = math.ceil(requests / b)

    con = Console(stderr=True, highlight=False)
    if store is None:
        store = HostStore(program, pin="auto" if device.type == "cuda" else "none")
        store.fill(src.fill_weights)
    rep = GenerateReport(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", batch=b,
                         prompt_len=prompts.shape[1], gen_len=gen_len, requests=requests,
                         predicted_decode_step_s=g.decode_step_s, predicted_tokens_per_s=g.tokens_per_s,
                         streamed_bytes=program.prediction.streamed_bytes)
    rep.h2d_gbps = measure_h2d_gbps(device)
    rep.decode_floor_s = rep.streamed_bytes / (rep.h2d_gbps * 1e9)

    model = src.build("meta")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handle = attach(model, program, device, check=check, host_store=store)
    all_tokens = []
    try:
        kv_slot = next((s for s in program.arena.slots if s.kind == SlotKind.kv), None)
        if kv_slot is None:
            raise MemintentError(f"{program.name} reserves no KV cache slot in its arena: not a generation plan "
                                 "that `compile --objective` writes")
        kv_flat = handle.arena.slot(kv_slot.index)
        # Unwritten cache positions are masked out, but a masked score still multiplies its value row by zero,
        # and 0 * NaN is NaN: the cache must start from zeros, never from whatever the arena held (checked mode
        # fills the arena with NaN on purpose; a fresh CUDA allocation may hold anything).
        kv_flat.zero_()
        model.attach_kv_cache(carve_kv(program, kv_flat, src))
        step = None
        if program.actions:
            rep.decode_mode = "eager: the plan streams, and its copies are issued from hooks between kernels"
        elif device.type != "cuda" or not graph or check:
            rep.decode_mode = "eager"
        else:
            try:
                step = GraphStep(model, src, b, device, handle)
                rep.decode_mode = "cuda graph"
            except Exception as e:   # noqa: BLE001 -- any capture failure: the eager step is always correct
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                rep.decode_mode = f"eager: CUDA graph capture failed ({first})"
                torch.cuda.synchronize(device)
        if warmup:
            # One short untimed wave: first-call costs (kernel selection for new shapes, handles, JIT) out of the
            # numbers, as a server pays them once at start-up.
            greedy(model, src, wave(prompts, 0, b)[0].to(device), 3, device, step)
        t_all = time.perf_counter()
        for w in range(waves):
            batch_prompts, n = wave(prompts, w, b)
            toks, prefill_s, decode_s = greedy(model, src, batch_prompts.to(device), gen_len, device, step)
            all_tokens.append(toks[:n])
            steps = max(gen_len - 1, 1)
            rep.waves.append(dict(prefill_s=prefill_s, decode_s=decode_s, decode_step_s=decode_s / steps,
                                  decode_tokens_per_s=b * (gen_len - 1) / decode_s if decode_s else 0.0))
        rep.total_s = time.perf_counter() - t_all
        if device.type == "cuda":
            rep.peak_hbm_bytes = torch.cuda.max_memory_allocated(device)
        if trace:
            from memintent.see.perfetto import write_run_trace

            # every forward of the run (prefills and decode steps) against the decode plan's predicted timeline
            write_run_trace(trace, program, handle.stats())
    except MemintentError:
        raise
    except Exception as e:   # a failed copy, out of memory mid-step: one line, after the finally drained it
        raise as_fault(e, f"generation (wave {len(rep.waves)})") from e
    finally:   # also on Ctrl-C: waits for in-flight copies, removes the hooks, releases the arena
        model.detach_kv_cache()
        handle.detach()
    tokens = torch.cat(all_tokens)                                               # (N, gen_len)
    rep.tokens_per_s = requests * gen_len / rep.total_s

    code = 0
    quantized = any(x.quant != Quant.none for x in program.blocks if x.residency == Residency.streamed)
    if verify:
        ref_tokens = []
        with torch.no_grad():
            ref = resident_model(src, device)
            ctx = g.context
            caches = [(torch.zeros(b, src.n_kv_heads, ctx, src.head_dim, dtype=src.torch_dtype, device=device),
                       torch.zeros(b, src.n_kv_heads, ctx, src.head_dim, dtype=src.torch_dtype, device=device))
                      for _ in range(src.num_layers)]
            ref.attach_kv_cache(caches)
            for w in range(waves):
                batch_prompts, n = wave(prompts, w, b)
                ref_tokens.append(greedy(ref, src, batch_prompts.to(device), gen_len, device)[0][:n])
            del ref, caches
        ref_tokens = torch.cat(ref_tokens)
        rep.identical = bool(torch.equal(tokens, ref_tokens))
        rep.agreement = float((tokens == ref_tokens).float().mean())
        if not rep.identical and not quantized:
            con.print("[red]streamed tokens differ from the resident model's; a plan without quantization must "
                      "generate exactly the same tokens[/red]")
            code = 1
    if not quiet:
        _print(program, rep, quantized)
    return rep, code


def _print(program: Program, rep: GenerateReport, quantized: bool) -> None:
    import sys

    from rich.console import Console

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    g = program.generation
    for i, w in enumerate(rep.waves):
        con.print(f"wave {i}: prefill {fmt_s(w['prefill_s'])}, decode {w['decode_tokens_per_s']:.2f} tok/s, step "
                  f"{fmt_s(w['decode_step_s'])} (floor {fmt_s(rep.decode_floor_s)}, plan {fmt_s(g.decode_step_s)})")
    con.print(f"{program.name}: batch {rep.batch}, prompt {rep.prompt_len}, {rep.gen_len} generated; "
              f"{rep.requests} requests in {len(rep.waves)} waves: {fmt_s(rep.total_s)}, {rep.tokens_per_s:.2f} tok/s "
              f"(plan {g.tokens_per_s:.2f} tok/s per wave); streamed {fmt_bytes(rep.streamed_bytes)}/step at "
              f"{rep.h2d_gbps:.1f} GB/s pinned")
    con.print(f"decode step: {rep.decode_mode}")
    if rep.peak_hbm_bytes is not None:
        con.print(f"peak HBM {fmt_bytes(rep.peak_hbm_bytes)} (plan {fmt_bytes(program.prediction.peak_hbm_bytes)}, "
                  f"budget {fmt_bytes(program.budget_bytes)})")
    if rep.identical is not None:
        con.print("verify: tokens identical to the resident model" if rep.identical else
                  f"verify: {100 * rep.agreement:.1f}% of tokens agree with the resident bf16 model"
                  + (" (quantized transfer)" if quantized else ""))
