import numpy as np
import torch

from mmrec.config import ModelParams, RungParams, parse_params
from mmrec.model.growth import grow_state_dict
from mmrec.model.lm import ModelConfig, build_model
from mmrec.pipeline.rung import grow_into


def test_growing_leaves_the_global_generator_alone_so_the_childs_dropout_is_the_benchs(tmp_path):
    params = parse_params({"train": {"seq_len": 16, "eval_windows": 2}})
    parent_cfg = ModelConfig.from_params(ModelParams(), RungParams(width=16, layers=1), 40)
    child_cfg = ModelConfig.from_params(ModelParams(), RungParams(width=32, layers=2), 40)
    parent = build_model(parent_cfg)
    torch.save({"model": parent.state_dict(), "config": parent_cfg.to_dict()}, tmp_path / "best.pt")
    child = build_model(child_cfg)
    val = np.arange(200, dtype=np.int64) % 40

    torch.manual_seed(7)
    losses = grow_into(child, tmp_path / "best.pt", params, val, torch.device("cpu"))
    after_growth = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_growth, torch.rand(4))  # as if nothing had been drawn
    assert abs(losses["parent_val_loss"] - losses["grown_val_loss"]) < 1e-4  # growth kept the function
    expected = grow_state_dict(parent.state_dict(), parent_cfg, child_cfg,
                               generator=torch.Generator().manual_seed(params.seed))
    assert all(torch.equal(child.state_dict()[k], v) for k, v in expected.items())
