"""Generation plans on one GPU, each measured against its floor and its prediction in the same process.

Sections (pick with --sections; default all):
  opt30b    opt-30b f16 under 24 GiB, 64 requests of prompt 512 + 32 generated, the planner's own choice with the
            model's KV dtype and with --kv-quant auto (FlexGen's best on the same card and budget: 64.2 tok/s)
  resident  opt-30b on the whole card (nothing streams): the cost model's step time against decode-only and
            prompt-heavy steps as they ran
  hf8b      a Hugging Face folder of a Llama-3-8B-shaped random model against the llama-3-8b preset on the same plan
            shape: tokens/s, and the folder's tokens against the same engine with every weight resident

    python benchmarks/generate.py --out $OUT --sections opt30b resident hf8b
    python benchmarks/generate.py --device cpu --small --sections hf8b     # smoke test here

Prints a table last and writes generate.json under --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, card_profile, fill, free, header, serve_row, table, write  # noqa: E402
from memintent.compiler.planner import StepPredictor, plan_generation  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402
from memintent.engine import Engine  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402


def section_opt30b(args, device, hw, doc):
    name = "tiny-llama" if args.small else "opt-30b"
    budget = (8 << 20) if args.small else 24 * GiB
    src = resolve(name, dtype="f32" if args.small else None)
    reqs = synthetic(args.requests, (512, 512), (32, 32), src.vocab_size, seed=1)
    for kv in args.opt_kv:
        plan = plan_generation(name, budget_bytes=budget, hardware=hw, context=544, prompt_len=512, gen_len=32,
                               quant="auto", kv_quant=kv, dtype="f32" if args.small else None)
        store, _ = fill(plan, src, device)
        doc["rows"].append(serve_row(f"{name} 24GiB kv-quant {kv}", plan, reqs, device, doc["h2d_gbps"], store,
                                     StepPredictor(plan)))
        if args.profile_steps and device.type == "cuda":
            doc.setdefault("kernel_tables", {})[kv] = profile_steps(plan, reqs[:12], device, store,
                                                                    args.profile_steps)
        del store
        free(device)
        write(args.out, "generate.json", doc)


def profile_steps(plan, reqs, device, store, n: int) -> str:
    """The CUDA kernels of an engine's first ``n`` steps (prompt-heavy: the requests all arrive at once), as
    torch.profiler's table: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with Engine(plan, device, store=store) as eng:
        for r in reqs:
            eng.add(r)
        eng.step()                                     # first-call costs outside the profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                eng.step()
            torch.cuda.synchronize(device)
        times = [f"{s.tokens} tokens ({s.prefill_tokens} prompt) {s.time_s * 1e3:.1f} ms" for s in eng.stats.steps]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=48)
    print("steps: " + "; ".join(times) + "\n" + table, flush=True)
    return "steps: " + "; ".join(times) + "\n" + table


def section_resident(args, device, hw, doc):
    name = "tiny-llama" if args.small else "opt-30b"
    budget = (64 << 20) if args.small else int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    src = resolve(name, dtype="f32" if args.small else None)
    plan = plan_generation(name, budget_bytes=budget, hardware=hw, context=544, prompt_len=512, gen_len=32,
                           quant="none", dtype="f32" if args.small else None)
    row = serve_row(f"{name} whole card (resident)", plan, synthetic(64, (512, 512), (32, 32), src.vocab_size, seed=1),
                    device, doc["h2d_gbps"], predictor=StepPredictor(plan))
    doc["rows"].append(row)
    write(args.out, "generate.json", doc)


def make_hf_llama(folder: Path, preset: str, device: torch.device) -> None:
    """A Hugging Face Llama folder with the preset's shapes and random bf16 weights (initialised on the device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = resolve(preset).config
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                     torch_dtype="bfloat16" if cfg.dtype == "bf16" else "float32")
    with torch.device(device):
        model = LlamaForCausalLM(hf).to(dtype=cfg.torch_dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    free(device)


def section_hf8b(args, device, hw, doc):
    preset = "tiny-llama" if args.small else "llama-3-8b"
    budget = (1 << 20) if args.small else 10 * GiB
    work = Path(args.work or tempfile.mkdtemp())
    folder = work / f"{preset}-hf"
    make_hf_llama(folder, preset, device)
    reqs = synthetic(64, (512, 512) if not args.small else (8, 8), (64, 64) if not args.small else (8, 8),
                     resolve(preset).vocab_size, seed=2)
    kw = dict(budget_bytes=budget, hardware=hw, context=576 if not args.small else 32,
              prompt_len=512 if not args.small else 8, gen_len=64 if not args.small else 8, quant="none",
              concurrency=32 if not args.small else 4)
    rows = {}
    for ref in (preset, f"hf:{folder}"):
        plan = plan_generation(ref, **kw)
        rows[ref] = serve_row(f"{'hf folder' if ref.startswith('hf:') else 'preset'} {preset}", plan, reqs, device,
                              doc["h2d_gbps"])
        doc["rows"].append(rows[ref])
    hf_plan = plan_generation(f"hf:{folder}", **kw)
    with Engine(hf_plan, device, resident=True) as eng:
        resident = {o.id: o.token_ids for o in eng.generate(reqs)}
    hf = rows[f"hf:{folder}"]
    doc["hf8b"] = dict(ratio_tokens_per_s=hf["tokens_per_s"] / rows[preset]["tokens_per_s"],
                       identical_to_resident=hf["_outputs"] == resident)
    print(f"hf folder / preset: {doc['hf8b']['ratio_tokens_per_s']:.3f} x tokens/s; tokens identical to the resident "
          f"engine: {doc['hf8b']['identical_to_resident']}", flush=True)
    write(args.out, "generate.json", doc)


SECTIONS = {"opt30b": section_opt30b, "resident": section_resident, "hf8b": section_hf8b}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models: a smoke test of the script")
    ap.add_argument("--work", default=None, help="folder for the Hugging Face folder hf8b writes (default: a temp)")
    ap.add_argument("--opt-kv", nargs="+", default=["none", "auto"], help="opt30b: the --kv-quant policies to run")
    ap.add_argument("--requests", type=int, default=64, help="opt30b: requests of prompt 512 + 32 generated (64)")
    ap.add_argument("--profile-steps", type=int, default=0, help="opt30b: profile this many prompt-heavy steps")
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hw = card_profile(device, spec=args.hw)
    doc = header(device, hw)
    for s in args.sections:
        SECTIONS[s](args, device, hw, doc)
    table(doc)
    for r in doc["rows"]:
        if r.get("prediction"):
            print(f"{r['case']}: measured / predicted step: " + ", ".join(
                f"{k} {v['median_ratio']:.3f} ({v['steps']} steps)" for k, v in r["prediction"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
