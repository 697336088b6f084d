"""Function-preserving growth: a wider and/or deeper child that computes the parent's logits.

Width x k (k an integer) tiles every channel k times. Unlike the design note's [x ... x] / k, the residual
stream is tiled *unscaled*, [x ... x]: its mean square is unchanged, so every RMSNorm gives [n ... n]
exactly, whatever its eps (the /k version is off by a k^2 * eps term). The tied head then reads
[n ... n] through the final norm's weight divided by k, so the k copies of E n / k sum to the parent's E n.
  - embedding E [V, D]: tiled along D (no scaling); the tied head is the same tensor;
  - norms: weights tiled; the final norm's also divided by k;
  - maps from [n ... n] to [z ... z] (HEM's z, g, o; FFN up; attention qkv; W_out, FFN down, attention proj
    and the UBOO head, which all read and write tiled streams): tiled along both axes, divided by k;
  - DPG down (HEM's last r rows): tiled along its input, divided by k: the rank stays r;
    DPG up: tiled along its output;
  - floors: unchanged. Channel c belongs to memory c % M and D is a multiple of M, so the copy
    j*D + c of channel c stays in memory c % M: M stays, each memory gets k times the channels;
  - FFN hidden: the child's has room for k copies of the parent's (ModelConfig.ffn_hidden floors to a
    multiple of 8); spare units keep their fresh init and get a zero FFN-down column.
Depth: blocks appended after the parent's, freshly initialised with a zero W_out / attention proj and a zero
FFN down, so each is the identity until trained. GPT grows by the same rules (heads double, head_dim stays).
Noise N(0, noise * std(parent tensor)) is added to the tiled matrices when k > 1; noise = 0 is exact.
"""
from __future__ import annotations

import torch

from mmrec.errors import UserError
from mmrec.model import ModelConfig, build_model

SAME_FIELDS = ("arch", "vocab_size", "memories", "ffn", "dpg_rank", "min_floor", "max_floor", "norm_eps")


def width_factor(parent: ModelConfig, child: ModelConfig) -> int:
    """The integer width factor k, after checking that growing parent into child is defined."""
    for field in SAME_FIELDS + (("head_dim",) if parent.arch == "gpt" else ()):
        a, b = getattr(parent, field), getattr(child, field)
        if a != b:
            raise UserError(f"cannot grow: model {field} differs between parent ({a!r}) and child ({b!r}); "
                            "growth changes only width and layers")
    if child.width % parent.width:
        raise UserError(f"cannot grow width {parent.width} -> {child.width}: the child width must be an integer "
                        f"multiple of the parent's (got {child.width / parent.width:g}x)")
    if child.layers < parent.layers:
        raise UserError(f"cannot grow {parent.layers} -> {child.layers} layers: the child needs at least as many")
    k = child.width // parent.width
    if child.ffn_hidden < k * parent.ffn_hidden:
        raise UserError(f"cannot grow: child FFN hidden {child.ffn_hidden} < {k} x parent's {parent.ffn_hidden} "
                        "(ffn_mult must not shrink)")
    return k


def _fresh_state(cfg: ModelConfig, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """A freshly initialised child: the shapes, and the init of everything the parent does not cover."""
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return build_model(cfg).state_dict()


def _tile(w: torch.Tensor, k: int, rows: bool, cols: bool, scale: float) -> torch.Tensor:
    return w.repeat(k if rows else 1, k if cols else 1) * scale


def _grow(name: str, w: torch.Tensor, fresh: torch.Tensor, k: int, parent: ModelConfig) -> torch.Tensor:
    """One parent tensor -> the child's (its shape and spare rows/columns taken from `fresh`)."""
    D, H = parent.width, parent.ffn_hidden
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" else parts[-1]  # the module's name: 'hem', 'norm_h', 'up' ...
    if name in ("wte.weight", "head.weight"):
        return _tile(w, k, rows=False, cols=True, scale=1.0)
    if leaf.startswith("norm"):
        return w.repeat(k) / (k if name == "norm_f.weight" else 1)
    if leaf == "floor_logit":
        return w.clone()
    if leaf == "hem":  # [z; g; o] tiled both ways, then the DPG down rows tiled along the input only
        zgo, down = w[: 3 * D], w[3 * D:]
        zgo = [_tile(p, k, True, True, 1.0 / k) for p in zgo.split(D)]
        return torch.cat(zgo + [_tile(down, k, False, True, 1.0 / k)])
    if leaf == "dpg_up":
        return _tile(w, k, rows=True, cols=False, scale=1.0)
    if leaf == "qkv":
        return torch.cat([_tile(p, k, True, True, 1.0 / k) for p in w.split(D)])
    if leaf in ("out", "proj", "predict"):
        return _tile(w, k, True, True, 1.0 / k)
    if leaf == "up":  # [gate; up] for swiglu, [up] for gelu: k copies of each, then the fresh spare units
        child_h = fresh.shape[0] // (w.shape[0] // H)
        grown = []
        for p, f in zip(w.split(H), fresh.split(child_h)):
            grown += [_tile(p, k, True, True, 1.0 / k), f[k * H:]]
        return torch.cat(grown)
    if leaf == "down":  # spare hidden units write nothing
        grown = torch.zeros_like(fresh)
        grown[:, : k * H] = _tile(w, k, True, True, 1.0 / k)
        return grown
    raise KeyError(f"growth has no rule for parameter {name!r}")


def grow_state_dict(parent_sd: dict[str, torch.Tensor], parent_cfg: ModelConfig, child_cfg: ModelConfig,
                    noise: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A state dict for build_model(child_cfg) that computes the parent's function (exactly when noise = 0)."""
    k = width_factor(parent_cfg, child_cfg)
    fresh = _fresh_state(child_cfg, generator)
    like = parent_sd["wte.weight"]  # the child's tensors get the parent's dtype and device
    fresh = {name: t.to(like) for name, t in fresh.items()}
    out = dict(fresh)
    for name, w in parent_sd.items():
        if name not in fresh:  # e.g. the UBOO heads of a parent whose child has UBOO off
            continue
        grown = _grow(name, w, fresh[name], k, parent_cfg)
        if noise > 0 and k > 1 and w.dim() == 2:
            jitter = torch.randn(grown.shape, generator=generator, dtype=w.dtype).to(w.device)
            grown = grown + jitter * (noise * w.std())
        out[name] = grown
    out["head.weight"] = out["wte.weight"]  # tied: one tensor under both names
    for i in range(parent_cfg.layers, child_cfg.layers):  # new blocks: identity until trained
        for name in (f"blocks.{i}.out.weight", f"blocks.{i}.proj.weight", f"blocks.{i}.ffn.down.weight"):
            if name in out:
                out[name] = torch.zeros_like(out[name])
    return out


@torch.no_grad()
def growth_error(parent: torch.nn.Module, child: torch.nn.Module, idx: torch.Tensor) -> float:
    """Largest |logit difference| between parent and grown child on idx (both in eval mode)."""
    was = parent.training, child.training
    parent.eval(), child.eval()
    err = (parent(idx).logits - child(idx).logits).abs().max().item()
    parent.train(was[0]), child.train(was[1])
    return err
