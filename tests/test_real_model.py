"""The real chat model (SmolLM2-135M-Instruct, float32, fixture ``smollm2_dir``) served by the engine on the CPU,
against Hugging Face's ``generate`` on the same folder: greedy answers token for token, stopping where it stops
(at ``<|im_end|>``, id 2, the folder's eos_token_id), and the log-probabilities of its scores."""

from __future__ import annotations

import pytest
import torch

from memintent.engine import Engine, Request
from memintent.engine.requests import encode
from memintent.engine.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Say hello in French.",
             'Translate "thank you" into Spanish.']
MAX_NEW = 40
EOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one intra-op thread for this module


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


@pytest.fixture(scope="module")
def hf(smollm2_dir, tokenizer) -> dict[str, tuple[tuple[int, ...], list[int], torch.Tensor]]:
    """Per question: the chat prompt's ids, transformers' greedy tokens and their log-softmax scores (n, vocab)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, local_files_only=True)
    out = {}
    with torch.no_grad():
        for q in QUESTIONS:
            ids = encode(tokenizer, q, chat=True)
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            tokens = gen.sequences[0, len(ids):].tolist()
            out[q] = ids, tokens, torch.log_softmax(torch.cat(gen.scores).float(), -1)
    return out


@pytest.fixture(scope="module")
def engine(smollm2_plan):
    with Engine(smollm2_plan, "cpu", check=True) as eng:
        yield eng


def test_greedy_chat_answers_are_transformers_token_for_token(engine, hf):
    reqs = [Request(q, hf[q][0], MAX_NEW, sampling=SamplingParams(logprobs=2)) for q in QUESTIONS]
    outs = {o.id: o for o in engine.generate(reqs)}            # all four in the same steps
    for q in QUESTIONS:
        _, tokens, logp = hf[q]
        assert tokens[-1] == EOS and len(tokens) < MAX_NEW, f"transformers must stop at <|im_end|> for {q!r}"
        out = outs[q]
        assert out.token_ids == tokens, q
        assert out.finish_reason == "stop"
        chosen = torch.tensor([lp.logprob for lp in out.logprobs])
        ref = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert float((chosen - ref).abs().max()) < 1e-3, q
        assert [[i for i, _ in lp.top] for lp in out.logprobs] == logp.topk(2, -1).indices.tolist(), q


def test_ignore_eos_stop_strings_and_stop_ids(engine, hf, tokenizer):
    q = QUESTIONS[0]
    prompt, tokens, _ = hf[q]                                  # "The capital of France is Paris.<|im_end|>"
    at = next(i for i in range(len(tokens)) if "Paris" in tokenizer.decode(tokens[:i + 1]))
    reqs = [Request("on", prompt, len(tokens) + 4, sampling=SamplingParams(ignore_eos=True)),
            Request("cut", prompt, MAX_NEW, sampling=SamplingParams(stop=(" Paris", "xyz"))),
            Request("id", prompt, MAX_NEW, stop_token_ids=(tokens[2],))]
    outs = {o.id: o for o in engine.generate(reqs)}
    assert outs["on"].finish_reason == "length" and len(outs["on"].token_ids) == len(tokens) + 4
    assert outs["on"].token_ids[:len(tokens)] == tokens, "past the end-of-sequence id the answer goes on"
    assert outs["cut"].finish_reason == "stop" and outs["cut"].text == "The capital of France is"
    assert outs["cut"].token_ids == tokens[:at + 1], "nothing is generated past the token completing the stop"
    assert outs["id"].finish_reason == "stop" and outs["id"].token_ids == tokens[:3]
    engine.pool.check()
    assert engine.pool.used_pages == 0
