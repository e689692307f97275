"""Runtime tests that need a CUDA device (skipped without one): real copy stream, events, pinned memory, and that
copies really overlap compute (with the negative control: without the copy_done waits the output is wrong).

``python tests/test_runtime_cuda.py`` also prints a small benchmark: raw host-to-device bandwidth, and for a stack
of large layers streamed with 1-3 slots the per-forward device time, stall, copy rate and host overhead per block
against the fully resident model.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from time import perf_counter

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_runtime import (BLOCKS, LAYERS, LeakyToy, _move_free_into_last_use, hand_plan, ids, plan_for,  # noqa: E402
                          streamed_bytes_per_forward, toy)

from memintent.passes.verify import prove
from memintent.errors import MemintentError, PlanVerificationError  # noqa: E402
from memintent.ir.model import Arena, Slot, SlotKind  # noqa: E402
from memintent.runtime import DeviceArena, HostStore, attach  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bf16_toy(**kw) -> nn.Module:
    return toy(**kw).to(torch.bfloat16)


@pytest.mark.parametrize("n_slots,streamed,check", [(1, LAYERS, False), (2, LAYERS, False), (3, LAYERS, False),
                                                    (2, BLOCKS, True)])
def test_cuda_bitwise_equal(n_slots, streamed, check):
    cpu = bf16_toy()
    ref = copy.deepcopy(cpu).cuda()
    plan = plan_for(cpu, streamed, n_slots)
    h = attach(cpu, prove(plan), "cuda", check=check)
    # the streamed blocks' memory is registered from its storage's start, so PyTorch sees it pinned (a CUDA graph
    # capture copies only from such)
    assert h.host_store.pinned and h.host_store.pin == "register" and h.host_store.pinned_blocks
    assert all(h.host_store.buffer(name).is_pinned() for name in h.host_store.pinned_blocks)
    for i in range(5):
        x = ids(i + 1).cuda()
        with torch.no_grad():
            assert torch.equal(cpu(x), ref(x)), i
    st = h.stats()
    assert [s.bytes_copied for s in st] == [streamed_bytes_per_forward(plan)] * 5
    assert all(s.stall_s is not None and s.device_s is not None and s.copy_s > 0 for s in st)
    visits = {f"{a.block}@{a.visit_stage}" for a in plan.actions if a.kind.value == "copy_start"}
    assert set(st[-1].visit_stall_s) == visits
    h.detach()


def test_cuda_early_free_is_refused_at_attach():
    model = bf16_toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.2", first=False)
    with pytest.raises(PlanVerificationError, match="'layers.2' is freed before its last use") as e:
        attach(model, prove(bad), "cuda", check=True)
    assert e.value.rule == "free-after-last-use"


def test_cuda_checked_mode_read_outside_the_plan_is_nan():
    # The model reads layers.2's weight after the plan freed it (tests/test_runtime.py, LeakyToy): NaN on the GPU.
    ref = bf16_toy()
    plan = plan_for(ref, n_slots=3)
    leaky = LeakyToy().eval().to(torch.bfloat16)
    leaky.load_state_dict(ref.state_dict())
    h = attach(leaky, prove(plan), "cuda", check=True)
    with torch.no_grad():
        assert leaky(ids(1).cuda()).isnan().all()
    h.detach()


def test_cuda_detach_releases_device_memory():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = bf16_toy()
    h = attach(model, prove(plan_for(model)), "cuda")
    with torch.no_grad():
        model(ids(1).cuda())
    assert torch.cuda.memory_allocated() >= before + h.arena.size_bytes
    h.detach()
    assert torch.cuda.memory_allocated() == before
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_cuda_arena_larger_than_device_is_refused():
    free_bytes, _ = torch.cuda.mem_get_info()
    big = Arena(size_bytes=free_bytes * 4, slots=[Slot(index=0, kind=SlotKind.stream, offset_bytes=0,
                                                       size_bytes=free_bytes * 4)])
    with pytest.raises(MemintentError, match="short by"):
        DeviceArena(big, "cuda")


def test_cuda_hugging_face_generate():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    cpu = transformers.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    ref = copy.deepcopy(cpu).cuda()
    prompt = ids(5, b=1, s=6, vocab=96)
    layers = [f"model.layers.{i}" for i in range(4)]
    plan = hand_plan(cpu, prompt, ["model.embed_tokens", "model.rotary_emb", *layers, "model.norm", "lm_head"],
                     set(layers) | {"lm_head"}, 2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(prompt.cuda(), **kw)
    h = attach(cpu, prove(plan), "cuda", check=True)
    assert torch.equal(cpu.generate(prompt.cuda(), **kw), want)
    h.detach()


# ---------------------------------------------------------------------------------------------------------------
# Overlap: large layers, where a missing or misplaced event would corrupt results and stalls are measurable
# ---------------------------------------------------------------------------------------------------------------
class Stack(nn.Module):
    def __init__(self, n_layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False, dtype=torch.bfloat16) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))   # [tokens, dim]; tanh keeps the values bounded over many layers
        return x


def make_stack(n_layers: int, dim: int) -> Stack:
    with torch.device("meta"):
        m = Stack(n_layers, dim)
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in m.layers:   # random weights made on the GPU (fast), then kept on the host
        layer.weight = nn.Parameter((torch.randn(dim, dim, device="cuda", generator=g) / dim**0.5)
                                    .to(torch.bfloat16).cpu(), requires_grad=False)
    return m.eval()


def stack_plan(model: Stack, n_slots: int):
    names = [f"layers.{i}" for i in range(len(model.layers))]
    dim = model.layers[0].weight.shape[1]
    # hand_plan runs one tiny forward on the host to record the module order
    return hand_plan(model, torch.zeros(1, dim, dtype=torch.bfloat16), names, set(names), n_slots)


def test_cuda_streaming_overlaps_and_stays_exact():
    n_layers, dim, tokens = 8, 4096, 4096     # 32 MiB blocks
    cpu = make_stack(n_layers, dim)
    ref = copy.deepcopy(cpu).cuda()
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    for k in (1, 2):
        model = copy.deepcopy(cpu)
        h = attach(model, prove(stack_plan(model, k)), "cuda")
        with torch.no_grad():
            want = ref(x)
            outs = [model(x) for _ in range(6)]   # back to back: the host runs ahead of the GPU
        assert all(torch.equal(o, want) for o in outs), k
        # Host overhead with the host not ahead of the GPU: back to back, a copy-bound GPU makes the host block
        # in whatever CUDA call comes next (sometimes inside a hook), which is backpressure, not hook work.
        with torch.no_grad():
            for _ in range(3):
                model(x)
                torch.cuda.synchronize()
        st = h.stats()[-3:]
        # The hooks stay off the critical path: a block's host work is well under its copy (32 MiB, ~0.6 ms over
        # PCIe gen5). The median of three: a forward in a few runs meets a host hiccup (H48: 13x us beside 75 us),
        # and the device machine's host differs between calls (74.8 us a block in H48, 95-146 us in H52).
        copy_s = min(s.device_s / len(model.layers) for s in st)
        assert sorted(s.host_overhead_per_block_s for s in st)[1] < 0.25 * copy_s, [s.summary() for s in st]
        h.detach()


def _device_time_s(fn, n: int = 5) -> float:
    """Median seconds of ``fn()`` on the device, by CUDA events, after two warm-up calls; ``fn`` is enqueued back to
    back so the host never leaves the GPU idle between calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[n // 2]


OVERLAP_LAYERS, OVERLAP_DIM = 8, 4096     # bf16: 32 MiB per layer, about 0.6 ms per copy at 55 GB/s
MIN_HIDDEN = 0.5                          # at least half of the shorter of copy and compute must be hidden


def _copy_time_s(plan, store: HostStore) -> float:
    """Seconds to copy every streamed block once, one after another, from the pinned host store into device memory:
    the copy engine's work per forward, measured alone."""
    blocks = [b.name for b in plan.blocks if b.name in {a.block for a in plan.actions}]
    dst = torch.empty(max(store.buffer_bytes(b) for b in blocks), dtype=torch.uint8, device="cuda")

    def copy_all():
        for b in blocks:
            src = store.buffer(b)                       # uint8 [bytes] pinned host buffer
            dst[:src.numel()].copy_(src, non_blocking=True)

    return _device_time_s(copy_all)


def test_cuda_copies_hide_under_compute():
    """Streamed through 2 slots, a forward whose compute outlasts its copies takes about max(copy, compute), not
    their sum: the copy stream runs under the compute stream. The tokens grow until compute is the longer one, so
    the margin does not depend on this GPU's copy and matmul rates."""
    cpu = make_stack(OVERLAP_LAYERS, OVERLAP_DIM)
    ref = copy.deepcopy(cpu).cuda()
    model = copy.deepcopy(cpu)
    plan = stack_plan(model, 2)
    h = attach(model, prove(plan), "cuda", timing=False)
    try:
        copy_s = _copy_time_s(plan, h.host_store)
        for tokens in (8192, 16384, 32768, 65536):
            x = torch.randn(tokens, OVERLAP_DIM, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                compute_s = _device_time_s(lambda x=x: ref(x))
            if compute_s >= 1.5 * copy_s:
                break
        assert compute_s >= 1.5 * copy_s, f"compute {compute_s * 1e3:.2f} ms never outlasted copies {copy_s * 1e3:.2f} ms"
        with torch.no_grad():
            streamed_s = _device_time_s(lambda: model(x))
            assert torch.equal(model(x), ref(x))
        hidden = (copy_s + compute_s - streamed_s) / min(copy_s, compute_s)
        assert streamed_s < copy_s + compute_s - MIN_HIDDEN * min(copy_s, compute_s), (
            f"streamed {streamed_s * 1e3:.2f} ms vs copy {copy_s * 1e3:.2f} ms + compute {compute_s * 1e3:.2f} ms: "
            f"only {hidden:.0%} of the copies hidden")
    finally:
        h.detach()


def test_cuda_without_copy_done_waits_the_output_is_wrong():
    """Negative control for the test above: with the compute stream's waits for arrivals removed, compute reads a
    slot before its copy lands. The forward is copy-bound (64 tokens: microseconds of compute per layer against
    2.4 ms per 128 MiB copy), so each layer's kernels run while its copy is still writing the slot, which checked
    mode poisoned at the previous occupant's free: every forward's output differs from the resident model's. With
    the waits, the same plan and inputs are exact."""
    cpu = make_stack(OVERLAP_LAYERS, 8192)
    ref = copy.deepcopy(cpu).cuda()
    model = copy.deepcopy(cpu)
    x = torch.randn(64, 8192, device="cuda", dtype=torch.bfloat16)
    h = attach(model, prove(stack_plan(model, 2)), "cuda", check=True)
    try:
        with torch.no_grad():
            want = ref(x)
            assert all(torch.equal(model(x), want) for _ in range(2))
            h.backend.wait = lambda arrived: None        # copy_done no longer makes compute wait for the arrival
            bad = [not torch.equal(model(x), want) for _ in range(3)]
        assert all(bad), f"{bad}: without the waits, compute should read slots before their copies arrive"
    finally:
        h.detach()


def _time(fn, n: int = 10) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (perf_counter() - t0) / n


def bench() -> None:
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}")
    n = 256 << 20
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    for label, src in (("pageable", torch.empty(n, dtype=torch.uint8)),
                       ("pinned (torch allocator)", torch.empty(n, dtype=torch.uint8, pin_memory=True))):
        # the lambda binds dst and src now: dst is deleted below, and src changes with the loop
        t = _time(lambda dst=dst, src=src: dst.copy_(src, non_blocking=True))
        print(f"h2d {label:>26}: {n / t / 1e9:6.1f} GB/s")
    from memintent.ir.model import Block, ModelRef, Object, ObjectKind, Program, RunShape, Tier
    p = Program(name="b", model=ModelRef(ref="x", kind="py"), fingerprint="", shape=RunShape(batch=1, seq=1),
                objects=[Object(name="w", kind=ObjectKind.weight, dtype="u8", shape=[n], size_bytes=n,
                                home=Tier.host, block="b", block_offset_bytes=0)],
                blocks=[Block(name="b", module="", size_bytes=n, weights=["w"])])
    store = HostStore(p, pin="register")
    src = store.buffer("b")
    t = _time(lambda dst=dst, src=src: dst.copy_(src, non_blocking=True))
    print(f"h2d {'registered (HostStore)':>26}: {n / t / 1e9:6.1f} GB/s  pin={store.pin} pinned={src.is_pinned()}")
    del dst, store

    n_layers, dim = 8, 8192   # 128 MiB blocks
    cpu = make_stack(n_layers, dim)
    ref = copy.deepcopy(cpu).cuda()
    for tokens in (512, 4096, 16384):
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            t_res = _time(lambda: ref(x))
            want = ref(x)
        mib = n_layers * dim * dim * 2 / 2**20
        print(f"\n{tokens} tokens x {n_layers} layers of {dim}x{dim} bf16 ({mib:.0f} MiB): "
              f"resident {t_res * 1e3:.2f} ms/forward")
        for k in (1, 2, 3):
            for timing in (True, False):
                model = copy.deepcopy(cpu)
                h = attach(model, prove(stack_plan(model, k)), "cuda", timing=timing)
                with torch.no_grad():
                    first = model(x)
                    t_str = _time(lambda: model(x))
                    same = torch.equal(model(x), want) and torch.equal(first, want)
                st = h.stats()[3:]
                med = lambda f: sorted(f(s) for s in st)[len(st) // 2]  # noqa: E731
                if timing:
                    f0 = h.stats()[0]
                    print(f"  k={k} first forward (no prefetch from a previous one): "
                          f"device {f0.device_s * 1e3:.2f} ms, stall {f0.stall_s * 1e3:.2f} ms")
                    print(f"  k={k} timing: {t_str * 1e3:7.2f} ms/forward wall, "
                          f"device {med(lambda s: s.device_s) * 1e3:7.2f} ms, "
                          f"stall {med(lambda s: s.stall_s) * 1e3:6.2f} ms, "
                          f"copy {med(lambda s: s.copy_gbps):5.1f} GB/s, "
                          f"host overhead {med(lambda s: s.host_overhead_per_block_s) * 1e6:5.1f} us/block "
                          f"(max hook {max(s.max_hook_s for s in st) * 1e6:.0f} us), exact={same}")
                else:
                    print(f"  k={k} no timing: {t_str * 1e3:7.2f} ms/forward wall, host overhead "
                          f"{med(lambda s: s.host_overhead_per_block_s) * 1e6:5.1f} us/block, exact={same}")
                h.detach()
        # Negative control: drop the slot-free waits; the copy may then overwrite a slot still being read.
        model = copy.deepcopy(cpu)
        h = attach(model, prove(stack_plan(model, 1)), "cuda")
        real_copy = h.backend.copy
        h.backend.copy = lambda dst, src, after: real_copy(dst, src, None)
        with torch.no_grad():
            bad = sum(not torch.equal(model(x), want) for _ in range(5))
        print(f"  negative control (k=1, no free waits): {bad}/5 forwards differ")
        h.detach()


if __name__ == "__main__":
    bench()


def test_cuda_staged_uploads_do_not_queue_behind_a_weight_copy():
    # A step's metadata goes up by a kernel that loads the pinned staging in place (kv.paged_kernel.MetaStaging):
    # a copy would queue on the copy engine behind the weight copy in flight, and the step's compute with it.
    from memintent.kv.paged_kernel import MetaStaging, warm_uploads

    dev = torch.device("cuda")
    warm_uploads(dev)                     # compiled before: a compile on the host would outlast the copy
    ints, wide, floats = MetaStaging(dev), MetaStaging(dev, torch.long), MetaStaging(dev, torch.float32)
    weights = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True)              # ~40 ms over the host link
    slot = torch.empty_like(weights, device=dev)
    side = torch.cuda.Stream(dev)
    torch.cuda.synchronize(dev)
    with torch.cuda.stream(side):
        slot.copy_(weights, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(side)
    got = [ints.upload([-(2 ** 31), 7, 2 ** 31 - 1], "meta"), wide.upload([2 ** 40, -1], "ids"),
           floats.upload(torch.tensor([[0.5, -1.25], [3.0, float("inf")]]), "rows")]
    uploaded = torch.cuda.Event()
    uploaded.record()
    uploaded.synchronize()
    assert not copied.query(), "the uploads waited for the weight copy"
    assert got[0].tolist() == [-(2 ** 31), 7, 2 ** 31 - 1] and got[0].dtype == torch.int32
    assert got[1].tolist() == [2 ** 40, -1] and got[1].dtype == torch.int64
    assert got[2].tolist() == [0.5, -1.25, 3.0, float("inf")]
    copied.synchronize()
