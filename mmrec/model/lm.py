"""MM-Rec and a GPT baseline: one config, one language-model class, two kinds of block.

MM-Rec block (docs/model.md states the design):
    u = RMSNorm(x); [z, g, o, d] = HEM(u)          one GEMM: D -> 3D + r (d feeds the DPG)
    gamma = f + (1 - f) * sigmoid(W_up relu(d))     f: a learnable floor per memory
    h_t = gamma_t * h_{t-1} + (1 - gamma_t) * z_t * sigmoid(g_t)     (linear in h: a scan)
    x = x + W_out(RMSNorm(h) * silu(o));  x = x + FFN(RMSNorm(x))
Channel c belongs to memory c % M, so tiling the width keeps every channel in its memory (growth.py).
On CUDA with flash-linear-attention installed the scan is fla's fused HGRN kernel, fed log gamma =
logaddexp(log f, log(1 - f) + logsigmoid(a)), exact where f + (1 - f) * sigmoid(a) would round; on the
CPU it is our chunked scan (scan.py), which is also the reference.
UBOO's auxiliary loss is summed over layers, as docs/model.md defines it (lambda * sum_l ...).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmrec.config import ModelParams, RungParams
from mmrec.errors import UserError
from mmrec.model.scan import hgrn_scan, linear_scan, scan_backend

MAX_LOG_SPAN = 40.0  # largest |log A| inside a scan chunk: exp(40) ~ 2e17 is safe in fp32


@dataclass
class ModelConfig:
    arch: str  # 'mmrec' | 'gpt'
    vocab_size: int
    width: int
    layers: int
    memories: int
    ffn: str  # 'swiglu' | 'gelu'
    ffn_mult: float
    dpg_rank: int
    chunk_size: int
    min_floor: float
    max_floor: float
    uboo_weight: float
    head_dim: int
    norm_eps: float
    dropout: float
    seq_len: int = 0  # the context it was trained on (train.seq_len); gpt generation crops to it. 0: unknown
    tie_head: bool = True  # checkpoints from before the option were all tied

    def __post_init__(self) -> None:
        if self.arch not in ("mmrec", "gpt"):
            raise UserError(f"model arch {self.arch!r} is unknown; allowed: 'mmrec', 'gpt'")
        if self.ffn not in ("swiglu", "gelu"):
            raise UserError(f"model ffn {self.ffn!r} is unknown; allowed: 'swiglu', 'gelu'")
        if self.width % self.memories:
            raise UserError(f"width {self.width} must be a multiple of memories {self.memories}")
        if self.arch == "gpt" and self.uboo_weight > 0:
            raise UserError(f"uboo_weight {self.uboo_weight} needs arch 'mmrec' (UBOO predicts the recurrent state); "
                            "set it to 0 for 'gpt'")
        if self.arch == "gpt" and (self.width % self.head_dim or self.head_dim % 2):
            raise UserError(f"gpt: width {self.width} must be a multiple of head_dim {self.head_dim}, "
                            "and head_dim must be even (rotary positions)")

    @classmethod
    def from_params(cls, model: ModelParams, rung: RungParams, vocab_size: int, seq_len: int = 0) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        picked = {k: v for k, v in model.model_dump().items() if k in fields}
        if rung.dropout is not None:
            picked["dropout"] = rung.dropout
        return cls(**picked, vocab_size=vocab_size, width=rung.width, layers=rung.layers, memories=rung.memories,
                   seq_len=seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"model config has unknown keys {sorted(unknown)} (a checkpoint from another version?)")
        return cls(**d)

    @property
    def ffn_hidden(self) -> int:
        # Floored to a multiple of 8: floor(k*x) >= k*floor(x), so a child k times wider always has room
        # for k copies of the parent's hidden units (growth.py zeroes the spare ones). The round() keeps
        # float noise (43.9999...) from costing 8 units.
        return max(8, 8 * math.floor(round(self.ffn_mult * self.width / 8, 6)))

    @property
    def scan_chunk(self) -> int:
        # gamma >= min_floor, so |log A| <= C * -log(min_floor) inside a chunk; keep that within fp32 range.
        return max(1, min(self.chunk_size, int(MAX_LOG_SPAN / -math.log(self.min_floor))))


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # ce + uboo_weight * aux; None without targets
    ce: torch.Tensor | None
    aux: torch.Tensor | None  # UBOO loss; None when off or without targets
    state: list[torch.Tensor] | None = None  # mmrec: per-layer last h, to continue from


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        hidden = cfg.ffn_hidden
        self.up = nn.Linear(cfg.width, 2 * hidden if self.swiglu else hidden, bias=False)  # swiglu: [gate; up]
        self.down = nn.Linear(hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


def uboo_loss(predict: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """mean_t || P(h_t) - stopgrad(h_{t+1}) ||^2 over the target's total variance (docs/model.md's per-layer
    term, i.e. a normalised mean squared error); the target is never trained by it."""
    target = h[:, 1:].detach()
    err = (predict(h[:, :-1]) - target).pow(2).mean()
    return err / (target.var(correction=0) + 1e-12)


def initial_floor_logits(cfg: ModelConfig) -> torch.Tensor:
    """Memories spread geometrically over timescales 1/(1-f), from 1/(1-min_floor) to 1/(1-max_floor)."""
    t = (torch.arange(cfg.memories, dtype=torch.float64) + 0.5) / cfg.memories
    one_minus = (1 - cfg.min_floor) ** (1 - t) * (1 - cfg.max_floor) ** t
    span = cfg.max_floor - cfg.min_floor
    if span <= 0:
        return torch.zeros(cfg.memories)
    return torch.logit((1 - one_minus - cfg.min_floor) / span, eps=1e-6).float()


class MMRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, self.r, self.memories = cfg.width, cfg.dpg_rank, cfg.memories
        self.min_floor, self.max_floor, self.chunk = cfg.min_floor, cfg.max_floor, cfg.scan_chunk
        self.norm1 = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.hem = nn.Linear(D, 3 * D + self.r, bias=False)  # z, g, o and the DPG down projection
        self.dpg_up = nn.Linear(self.r, D, bias=False)
        self.floor_logit = nn.Parameter(initial_floor_logits(cfg))
        self.norm_h = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.out = nn.Linear(D, D, bias=False)
        self.norm2 = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.predict = nn.Linear(D, D, bias=False) if cfg.uboo_weight > 0 else None

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None, want_aux: bool):
        D = x.shape[-1]
        z, g, o, d = self.hem(self.norm1(x)).split([D, D, D, self.r], dim=-1)
        a = self.dpg_up(F.relu(d))
        f = self.min_floor + (self.max_floor - self.min_floor) * torch.sigmoid(self.floor_logit)
        f = f.repeat(D // self.memories)  # channel c -> memory c % M
        b = (1 - f) * torch.sigmoid(-a) * z * torch.sigmoid(g)  # (1 - gamma) without cancellation
        if scan_backend(x.device.type) == "fla":
            a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a  # log gamma near 0 needs fp32
            log_gamma = torch.logaddexp(torch.log(f), torch.log1p(-f) + F.logsigmoid(a))
            h, h_last = hgrn_scan(log_gamma, b, h0)
        else:  # gamma >= f >= min_floor, which scan_chunk was picked for: no check needed
            gamma = f + (1 - f) * torch.sigmoid(a)
            h, h_last = linear_scan(gamma, b, h0, self.chunk, min_gamma=self.min_floor)
        x = x + self.drop(self.out(self.norm_h(h) * F.silu(o)))
        x = x + self.drop(self.ffn(self.norm2(x)))
        aux = uboo_loss(self.predict, h) if want_aux and self.predict is not None and h.shape[1] > 1 else None
        return x, h_last, aux


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary positions on [B, H, T, hd]: no maximum length."""
    T, hd = x.shape[-2], x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dropout = cfg.width // cfg.head_dim, cfg.dropout
        self.norm1 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.norm2 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, h0: None, want_aux: bool):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(D, dim=-1))
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, None, None


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        Block = MMRecBlock if cfg.arch == "mmrec" else GPTBlock
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm_f = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.head.weight = self.wte.weight
        self.recompute = False  # train.recompute: activation checkpointing per block, set by the trainer
        self.apply(self._init)
        if not cfg.tie_head:  # uniform logits at the start, as the nanoGPT speedruns' untied head
            nn.init.zeros_(self.head.weight)
        for name, p in self.named_parameters():  # residual-stream writers, as in GPT-2
            if name.endswith(("out.weight", "proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: list[torch.Tensor] | None = None) -> ModelOutput:
        """idx, targets: [B, T] (targets already shifted by the caller). state: from a previous call (mmrec)."""
        x = self.drop(self.wte(idx))
        new_state, auxes = [], []
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            h0 = None if state is None else state[i]
            if recompute:  # backward runs the block again (same RNG state, so the same dropout masks)
                x, h_last, aux = checkpoint(block, x, h0, targets is not None, use_reentrant=False)
            else:
                x, h_last, aux = block(x, h0, targets is not None)
            new_state.append(h_last)
            if aux is not None:
                auxes.append(aux)
        logits = self.head(self.norm_f(x))
        out_state = new_state if self.cfg.arch == "mmrec" else None
        if targets is None:
            return ModelOutput(logits, None, None, None, out_state)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        aux = torch.stack(auxes).sum() if auxes else None  # summed over layers, as docs/model.md says
        loss = ce if aux is None else ce + self.cfg.uboo_weight * aux
        return ModelOutput(logits, loss, ce, aux, out_state)


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 per parameter (the tied head's matmul is counted by
    the shared weight; the embedding lookup is free, so an untied embedding is not counted), plus for GPT the attention
    scores and their weighted sum, 12 * layers * width * seq_len (nanoGPT's count, causal mask ignored).
    The scan's O(width) per token is left out, as PaLM's MFU leaves out element-wise work."""
    attention = 12 * cfg.layers * cfg.width * seq_len if cfg.arch == "gpt" else 0
    lookup_only = 0 if cfg.tie_head else cfg.vocab_size * cfg.width
    return 6.0 * (n_params - lookup_only) + attention


def count_params(model: nn.Module) -> int:
    """Parameters, the tied embedding/head counted once (parameters() deduplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[hidden matrices, the rest]: weight decay on the matrices only (Muon's when train.optimizer is muon), none on
    norms, biases, embeddings, the output head (tied or not: it maps to tokens, not to a hidden stream, as the
    speedruns keep it on AdamW) or floor logits."""
    token_maps = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    token_maps |= {id(m.head.weight) for m in model.modules() if isinstance(m, LanguageModel)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in token_maps else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
