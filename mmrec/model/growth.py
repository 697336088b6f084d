"""Function-preserving growth: a wider and/or deeper child that computes the parent's logits.

docs/model.md explains why each rule below keeps the function. Width x k (k an integer) tiles every channel
k times. The residual stream is tiled *unscaled*, [x ... x]: its mean square is unchanged, so every RMSNorm
gives [n ... n] exactly, whatever its eps (a stream scaled by 1/k would be off by a k^2 * eps term).
  - embedding E [V, D]: tiled along D (no scaling); the head (tied: the same tensor; untied: tiled the same
    way) reads [n ... n] through the final norm, whose weight copies are shares s_j * g with sum_j s_j = 1,
    so the k copies of E (s_j g n) sum to the parent's E g n;
  - other norms: weights tiled;
  - maps that read a tiled stream and write one (HEM's z, g, o; FFN up and down; attention qkv and proj;
    W_out; the UBOO head): k x k blocks, block (i, j) = W * S_ij, where the shares S_ij of output copy i
    over the input copies j sum to 1. Since the k inputs are equal, every output copy computes W n;
  - DPG down (HEM's last r rows): split the same way along its input only: the rank stays r;
    DPG up: tiled along its output;
  - floors: unchanged. Channel c belongs to memory c % M and D is a multiple of M, so the copy
    j*D + c of channel c stays in memory c % M: M stays, each memory gets k times the channels;
  - FFN hidden: the child's has room for k copies of the parent's (ModelConfig.ffn_hidden floors to a
    multiple of 8); spare units keep their fresh init and get a zero FFN-down column.
Symmetry: with even shares (S = 1/k, split = 0) the k copies of a unit get equal gradients and equal AdamW
updates forever, so a k-times wider child stays the parent. Uneven random shares, S_ij = (1 + split * e_ij)/k
with e_ij ~ N(0, 1) centred over j (drawn per weight), keep the function (the shares still sum to 1) but
give each copy its own outgoing weights, so the copies see different gradients from the first step on.
Depth: blocks appended after the parent's, freshly initialised with a zero W_out / attention proj and a zero
FFN down, so each is the identity until trained. GPT grows by the same rules (heads double, head_dim stays).
Noise N(0, noise * std(grown tensor)) is added to the grown matrices when k > 1: it does change the function
(the split does not); noise = 0 is exact.
"""
from __future__ import annotations

import torch

from mmrec.config import GROWTH_SPLIT
from mmrec.errors import UserError
from mmrec.model.lm import ModelConfig, build_model

SAME_FIELDS = ("arch", "vocab_size", "memories", "ffn", "dpg_rank", "min_floor", "max_floor", "norm_eps", "tie_head")


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


def _shares(k: int, shape: torch.Size, split: float, generator: torch.Generator | None,
            like: torch.Tensor) -> torch.Tensor:
    """[k, *shape] random shares that sum to exactly 1 over the first axis: (1 + split * e_j) / k, e centred."""
    e = torch.randn((k, *shape), generator=generator, dtype=torch.float64)
    s = (1 + split * (e - e.mean(0))) / k
    s[-1] = 1 - s[:-1].sum(0)  # the last share takes the rounding: the sum is 1 to the last bit
    return s.to(like)


class _Grower:
    """Tiles parent tensors into the child's, splitting every read of a tiled stream unevenly (see module doc)."""

    def __init__(self, k: int, parent: ModelConfig, split: float, generator: torch.Generator | None):
        self.k, self.D, self.H, self.split, self.generator = k, parent.width, parent.ffn_hidden, split, generator

    def tile(self, w: torch.Tensor, rows: bool) -> torch.Tensor:
        """w [O, I] reading k equal input copies -> [k*O or O, k*I]: each output copy's k blocks sum to w."""
        k = self.k
        if k == 1:
            return w.clone()
        out = []
        for _ in range(k if rows else 1):
            s = _shares(k, w.shape, self.split, self.generator, w)
            out.append(torch.cat([w * s[j] for j in range(k)], dim=1))
        return torch.cat(out)

    def __call__(self, name: str, w: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """One parent tensor -> the child's (its shape and spare rows/columns taken from `fresh`)."""
        k, D, H = self.k, self.D, self.H
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "weight" else parts[-1]  # the module's name: 'hem', 'norm_h', 'up' ...
        if name in ("wte.weight", "head.weight"):
            return w.repeat(1, k)
        if name == "norm_f.weight":  # the head reads through it: its copies are shares of g
            return (w * _shares(k, w.shape, self.split, self.generator, w)).flatten()
        if leaf.startswith("norm"):
            return w.repeat(k)
        if leaf == "floor_logit":
            return w.clone()
        if leaf == "hem":  # [z; g; o] split both ways, then the DPG down rows split along the input only
            zgo, down = w[: 3 * D], w[3 * D:]
            return torch.cat([self.tile(p, rows=True) for p in zgo.split(D)] + [self.tile(down, rows=False)])
        if leaf == "dpg_up":  # reads the untiled rank-r bottleneck: nothing to split
            return w.repeat(k, 1)
        if leaf == "qkv":
            return torch.cat([self.tile(p, rows=True) for p in w.split(D)])
        if leaf in ("out", "proj", "predict"):
            return self.tile(w, rows=True)
        if leaf == "up":  # [gate; up] for swiglu, [up] for gelu: k copies of each, then the fresh spare units
            child_h = fresh.shape[0] // (w.shape[0] // H)
            grown = []
            for p, f in zip(w.split(H), fresh.split(child_h)):
                grown += [self.tile(p, rows=True), f[k * H:]]
            return torch.cat(grown)
        if leaf == "down":  # spare hidden units write nothing
            grown = torch.zeros_like(fresh)
            grown[:, : k * H] = self.tile(w, rows=True)
            return grown
        raise KeyError(f"growth has no rule for parameter {name!r}")


def grow_state_dict(parent_sd: dict[str, torch.Tensor], parent_cfg: ModelConfig, child_cfg: ModelConfig,
                    noise: float = 0.0, generator: torch.Generator | None = None,
                    split: float = GROWTH_SPLIT) -> dict[str, torch.Tensor]:
    """A state dict for build_model(child_cfg) that computes the parent's function (exactly when noise = 0,
    whatever the split: up to float rounding)."""
    k = width_factor(parent_cfg, child_cfg)
    grow = _Grower(k, parent_cfg, split, generator)
    fresh = _fresh_state(child_cfg, generator)
    like = parent_sd["wte.weight"]  # the child's tensors get the parent's dtype and device
    fresh = {name: t.to(like) for name, t in fresh.items()}
    out = dict(fresh)
    for name, w in parent_sd.items():
        if name not in fresh:  # e.g. the UBOO heads of a parent whose child has UBOO off
            continue
        grown = grow(name, w, fresh[name])
        if noise > 0 and k > 1 and w.dim() == 2:
            jitter = torch.randn(grown.shape, generator=generator, dtype=w.dtype).to(w.device)
            grown = grown + jitter * (noise * grown.std())
        out[name] = grown
    if child_cfg.tie_head:
        out["head.weight"] = out["wte.weight"]  # one tensor under both names
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
