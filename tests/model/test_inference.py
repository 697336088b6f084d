"""Generation: how much context each forward pass sees, per arch (scoring is tested in test_evaluate.py)."""
import dataclasses

import torch

from mmrec.model.inference import generate, load_model
from mmrec.model.lm import build_model
from mmrec.paths import RungPaths
from tests.conftest import tiny_params
from tests.model.test_lm import config

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]  # longer than the context below: the prompt is cropped too


def forward_lengths(model: torch.nn.Module) -> list[int]:
    """The length of every input the model is run on from now on (a hook on its embedding)."""
    seen: list[int] = []
    model.wte.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    return seen


def test_gpt_generation_crops_its_context_to_the_trained_seq_len():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config("gpt", head_dim=8), seq_len=8)).eval()
    expected = list(PROMPT)
    for _ in range(30):  # by hand: each token from the last 8, the most the model was trained to attend over
        expected.append(int(model(torch.tensor([expected[-8:]])).logits[0, -1].argmax()))
    seen = forward_lengths(model)
    assert generate(model, PROMPT, 30, greedy=True) == expected[len(PROMPT):]
    assert len(seen) == 31 and max(seen) == 8  # 42 tokens in the end, yet no forward pass past 8


def test_mmrec_generation_carries_its_state_past_seq_len():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config("mmrec", chunk_size=4), seq_len=8)).eval()
    expected = list(PROMPT)
    for _ in range(20):  # by hand: each token from the whole history, read afresh
        expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    seen = forward_lengths(model)
    out = generate(model, PROMPT, 20, greedy=True)
    assert seen == [len(PROMPT)] + [1] * 20  # the prompt once, then one token a step: the state holds the rest
    assert out == expected[len(PROMPT):]


def test_a_trained_gpt_checkpoint_carries_its_context_to_generation(workdir):
    """What a served champion loads: the best.pt of a trained rung knows train.seq_len."""
    from mmrec.pipeline.rung import train_rung

    params = tiny_params(workdir, model={"arch": "gpt"}, train={"max_steps": 2, "eval_every": 2})
    train_rung(params, "tiny", workdir)
    model, _ = load_model(RungPaths(workdir, "tiny").best)
    assert model.cfg.seq_len == params.train.seq_len == 32
    seen = forward_lengths(model)
    assert len(generate(model, PROMPT, 60, greedy=True)) == 60 and max(seen) == 32


def test_a_checkpoint_from_before_the_context_was_kept_still_loads_and_reads_it_whole():
    from mmrec.model.lm import ModelConfig

    old = {k: v for k, v in config("gpt", head_dim=8).to_dict().items() if k != "seq_len"}
    model = build_model(ModelConfig.from_dict(old)).eval()
    seen = forward_lengths(model)
    generate(model, PROMPT, 5, greedy=True)
    assert model.cfg.seq_len == 0 and max(seen) == len(PROMPT) + 5
