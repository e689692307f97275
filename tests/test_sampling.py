"""Sampling and stop conditions (``engine/sampling.py``) on the CPU.

The distribution test draws from a tiny preset's logits (sharpened 8x, so that a few tokens carry most of the mass
as a trained model's do) and compares the counts with the distribution computed independently in float64: a
chi-square test that fails at p < 1e-6, so a correct sampler fails it once in a million runs per case (the seeds
are fixed, so a given tree passes or fails every time). Its power is shown by the same test rejecting draws at
the wrong temperature.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memintent.compiler.hardware import BUILTIN
from memintent.models.plan_model import resident_model
from memintent.compiler.planner import plan_generation
from memintent.models.refs import resolve
from memintent.engine import Engine, Request
from memintent.engine.reference import reference_logits
from memintent.engine.sampling import LOGPROB_FLOOR, Sampler, SamplingParams, StopConditions
from memintent.engine.sequence import Sequence
from memintent.errors import MemintentError

DRAWS = 16000
P_FAIL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one intra-op thread for this module


@pytest.fixture(scope="module")
def preset_logits() -> torch.Tensor:
    """(512,) float32: tiny-llama's next-token logits after a short prompt, sharpened 8x."""
    src = resolve("tiny-llama", dtype="f32")
    model = resident_model(src, torch.device("cpu"))
    return reference_logits(src, model, (5, 17, 42, 99, 7), [0], torch.device("cpu"))[-1] * 8


def expected(logits: torch.Tensor, t: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution a request samples from, in float64: softmax(logits / t), truncated to the top-k, then to
    the smallest most likely set holding top_p of the rest's mass, then to tokens at least min_p times as likely
    as the most likely one, renormalised."""
    p = torch.softmax(logits.double() / t, -1)
    order = torch.argsort(p, descending=True, stable=True)
    ps = p[order].clone()
    keep = torch.ones_like(ps, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    ps[~keep] = 0
    ps /= ps.sum()
    keep &= (torch.cumsum(ps, 0) - ps) < top_p
    keep &= ps >= min_p * ps[0]
    keep[0] = True
    q = torch.zeros_like(p)
    q[order[keep]] = p[order[keep]]
    return q / q.sum()


def chi_square_p(tokens: list[int], q: torch.Tensor) -> float:
    """P-value of the counts of ``tokens`` under ``q``: bins expecting at least 5 draws, the rest pooled."""
    n = len(tokens)
    obs = torch.bincount(torch.tensor(tokens), minlength=q.numel()).double()
    exp = q * n
    big = exp >= 5
    o, e = list(obs[big]), list(exp[big])
    if exp[~big].sum() >= 5:
        o.append(obs[~big].sum())
        e.append(exp[~big].sum())
    o, e = torch.stack(o), torch.stack(e)
    stat = ((o - e) ** 2 / e).sum()
    dof = torch.tensor((len(o) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, salt: int = 0) -> list[int]:
    """``n`` independent draws: the same logits in ``n`` rows of one batched call, each row its own seed."""
    rows = logits[None].expand(n, -1)
    seeds = [salt * n + i for i in range(n)]
    return Sampler("cpu").sample(rows, [params] * n, seeds, [0] * n, [[]] * n).tokens


CASES = [dict(temperature=0.7), dict(temperature=1.3, top_k=20), dict(temperature=0.9, top_p=0.75),
         dict(temperature=1.0, top_k=60, top_p=0.9, min_p=0.02)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampled_tokens_follow_the_processed_distribution(preset_logits, case):
    kw = {k: v for k, v in case.items() if k != "temperature"}
    q = expected(preset_logits, case["temperature"], **kw)
    kept = int((q > 0).sum())
    assert 2 <= kept, "the case must leave a choice"
    tokens = draw(preset_logits, SamplingParams(**case))
    outside = [t for t in tokens if q[t] == 0]
    assert not outside, f"{len(outside)} draws of tokens the filters remove (first {outside[0]})"
    p = chi_square_p(tokens, q)
    assert p > P_FAIL, f"counts do not follow the expected distribution over {kept} tokens (p = {p:.3g})"


def test_the_fit_test_rejects_the_wrong_temperature(preset_logits):
    tokens = draw(preset_logits, SamplingParams(temperature=0.7), salt=1)
    assert chi_square_p(tokens, expected(preset_logits, 0.7)) > P_FAIL
    assert chi_square_p(tokens, expected(preset_logits, 0.8)) < P_FAIL, "the test cannot tell 0.7 from 0.8"


def _seq(i: int, params: SamplingParams, generated=()) -> Sequence:
    req = Request(str(i), (1, 2), max_new_tokens=8, sampling=params)
    return Sequence(seq_id=i, request=req, tokens=[1, 2, *generated])


def test_greedy_rows_are_the_argmax_bitwise_in_any_company():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain = [SimpleNamespace(seq=_seq(i, SamplingParams()), sample=True) for i in range(6)]
    assert Sampler("cpu").step(logits, plain).tokens == logits.argmax(-1).tolist()
    mixed = [SimpleNamespace(seq=_seq(i, SamplingParams() if i % 2 else SamplingParams(temperature=1.0, top_p=0.5)),
                             sample=True) for i in range(6)]
    got = Sampler("cpu").step(logits, mixed).tokens
    assert [got[i] for i in (1, 3, 5)] == logits.argmax(-1)[[1, 3, 5]].tolist()


def test_a_seeded_row_draws_the_same_token_whatever_shares_the_step():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler("cpu").sample(logits, [p], [1234], [c], [[]]).tokens[0] for c in range(20)]
    others = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2))
    for at in (0, 3, 5):
        batch = torch.cat([others[:at], logits, others[at:]])                           # (6, 1000)
        params = [SamplingParams(temperature=0.5, top_k=7)] * 6
        params[at] = p
        for c in range(20):
            got = Sampler("cpu").sample(batch, params, [9] * at + [1234] + [9] * (5 - at), [c] * 6, [[]] * 6)
            assert got.tokens[at] == alone[c], (at, c)
    assert len(set(alone)) > 5, "different token indices must draw different numbers"


def test_penalties_and_logprobs_follow_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g) * 3
    hist = [[4, 4, 9], [], [7, 7, 7, 1]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=1.5, logprobs=4),
              SamplingParams(logprobs=2), SamplingParams(temperature=0.6, presence_penalty=-1.0, logprobs=0)]
    out = Sampler("cpu").sample(logits, params, [1, 2, 3], [3, 0, 4], hist)
    for r, (p, h) in enumerate(zip(params, hist)):
        x = logits[r].double()
        counts = torch.bincount(torch.tensor(h, dtype=torch.long), minlength=50).double()
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        ref = torch.log_softmax(x / (p.temperature if not p.greedy else 1.0), -1)
        tok = out.tokens[r]
        if p.greedy:
            assert tok == int(x.argmax())
        lp = out.logprobs[r]
        assert abs(lp.logprob - float(ref[tok])) < 1e-5
        top = torch.topk(ref, p.logprobs)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - float(w)) for (_, v), w in zip(lp.top, top.values)) < 1e-5 if lp.top else True


def test_filtered_tokens_report_the_floor_not_minus_infinity():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    out = Sampler("cpu").sample(logits, [SamplingParams(top_k=1, logprobs=3)], [0], [0], [[]])
    assert out.tokens == [0] and out.logprobs[0].logprob == pytest.approx(0.0, abs=1e-6)
    assert [v for _, v in out.logprobs[0].top][1:] == [LOGPROB_FLOOR, LOGPROB_FLOOR]


class CharTokenizer:
    """One character per token id (ids are code points): enough to check stop strings against decoded text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def test_stop_conditions():
    stops = StopConditions(eos_ids=(0,), tokenizer=CharTokenizer)

    def run(params: SamplingParams, text: str, stop_ids=()) -> tuple[int, str | None]:
        seq = Sequence(0, Request("r", (1,), 99, stop_token_ids=stop_ids, sampling=params), [1])
        for n, ch in enumerate(text, 1):
            seq.tokens.append(ord(ch) if ch != "$" else 0)             # "$": the end-of-sequence id
            if stops.stopped(seq, seq.tokens[-1]):
                return n, seq.stop_text
        return len(text), None

    assert run(SamplingParams(), "ab$cd") == (3, None), "the model's end-of-sequence id stops by default"
    assert run(SamplingParams(ignore_eos=True), "ab$cd") == (5, None)
    assert run(SamplingParams(ignore_eos=True), "ab$cd", stop_ids=(ord("c"),)) == (4, None)
    assert run(SamplingParams(stop=("\n\n", "xy")), "one\ntwo\n\nthree") == (9, "one\ntwo"), \
        "the text is cut before the stop string; nothing is generated past the token completing it"
    with pytest.raises(MemintentError, match="stop strings need the model's tokenizer"):
        StopConditions().validate(Request("r", (1,), 4, sampling=SamplingParams(stop=("x",))))


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature -1 must be a number >= 0"),
    (dict(temperature=math.inf), "temperature inf"),
    (dict(top_p=0), "top_p 0 must be a number in"),
    (dict(top_k=2.5), "top_k 2.5 must be an integer"),
    (dict(min_p=2), "min_p 2"),
    (dict(presence_penalty=3), "presence_penalty 3"),
    (dict(seed="x"), "seed 'x' must be an integer"),
    (dict(logprobs=21), "logprobs 21 must be an integer from 0 to 20"),
    (dict(stop=["ok", ""]), "stop must be"),
    (dict(stop=5), "stop must be"),
    (dict(ignore_eos="yes"), "ignore_eos 'yes'"),
])
def test_bad_sampling_parameters_are_refused_in_one_line(kw, msg):
    with pytest.raises(MemintentError, match=msg.replace("+", r"\+")):
        SamplingParams(**kw)


# ---- through the engine -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan():
    # tiny-llama in float32 with a pool small enough that sequences are preempted (as in test_serve.py)
    return plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=BUILTIN["cpu"], context=48, prompt_len=8,
                           gen_len=8, quant="none", concurrency=3, kv_page_tokens=4, swap_pages=64, dtype="f32")


def _requests(seeded: bool, n: int, prefix: str) -> list[Request]:
    g = torch.Generator().manual_seed(11 if seeded else 12)
    out = []
    for i in range(n):
        prompt = tuple(torch.randint(0, 512, (3 + 2 * i,), generator=g).tolist())
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i) if seeded else \
            SamplingParams(temperature=0.8) if i % 2 else SamplingParams()
        out.append(Request(f"{prefix}{i}", prompt, max_new_tokens=10, sampling=params))
    return out


def test_seeded_requests_repeat_across_runs_batches_and_preemptions(plan):
    seeded = _requests(True, 4, "s")
    with Engine(plan, "cpu", preempt="recompute", check=True) as eng:
        alone = {r.id: next(iter(eng.generate([r]))).token_ids for r in seeded}
    with Engine(plan, "cpu", preempt="swap", check=True) as eng:
        crowd = {o.id: o for o in eng.generate(_requests(False, 6, "u") + seeded[::-1])}
        kinds = {p.kind for p in eng.stats.preemptions}
    assert kinds == {"swap"}, "the crowded run must preempt"
    assert any(crowd[r.id].preemptions for r in seeded), "a seeded request must be preempted and resume"
    for r in seeded:
        assert crowd[r.id].token_ids == alone[r.id], r.id
    greedy = Request("g", seeded[0].prompt_ids, max_new_tokens=10)
    with Engine(plan, "cpu") as eng:
        assert next(iter(eng.generate([greedy]))).token_ids != alone[seeded[0].id], "sampling must not be greedy"
