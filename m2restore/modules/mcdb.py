"""MCDB: the latent block, a Mamba branch and a CNN branch blended per pixel by the DGF gate.

    x = x + DGF(LN(x), P_f)          DGF = G ⊙ cnn + (1 − G) ⊙ mamba      (paper eqs. 12-17)
    x = x + GDFN(LN(x))

with, on y = LN(x): mamba = LN(Mamba(LN(flatten(y)))) over the row-major pixel sequence,
cnn = GELU(DWConv3×3(y) + b), G = sigmoid(conv1×1(C→1)(GELU(conv1×1(2C→C)([y ; p])))) and
p = Linear(4C→C)(GELU(Linear(512→4C)(P_f))) per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .transformer import GDFN, LayerNorm2d


class MambaMixer(nn.Module):
    """Mamba's selective-SSM mixer, (B, L, d_model) -> (B, L, d_model).

    Parameter names, shapes and initialisation are those of ``mamba_ssm.Mamba`` (so state dicts load
    both ways): in_proj (2·d_inner, d_model), conv1d (d_inner, 1, d_conv) + bias, x_proj
    (dt_rank + 2·d_state, d_inner), dt_proj (d_inner, dt_rank) + bias, A_log (d_inner, d_state),
    D (d_inner,), out_proj (d_model, d_inner); d_inner = expand·d_model, dt_rank = ceil(d_model/16).
    The forward is mamba_ssm's unfused path: causal conv + SiLU, selective scan with softplus(dt +
    dt_proj.bias), D skip and SiLU(z) gating.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.backend = ops.check_backend(backend)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # mamba_ssm's "random" dt init: weight U(±dt_rank^-½); bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max].
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init A = -[1..d_state] per channel, stored as log(-A).
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", self.backend)
        dt, b, c = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias goes in as the scan's delta_bias
        y = ops.selective_scan(
            x, dt, -torch.exp(self.A_log.float()), b.transpose(1, 2), c.transpose(1, 2), self.D.float(), z,
            self.dt_proj.bias.float(), True, self.backend,
        )
        return self.out_proj(y.transpose(1, 2))


class DGF(nn.Module):
    """Dynamic gated fusion of the CNN branch (computed here from y) and the Mamba branch.

    forward(y (B, C, H, W), mamba (B, C, H, W), prompt_features (B, prompt_dim), residual=None)
    -> G ⊙ GELU(dwconv(y)) + (1 − G) ⊙ mamba (+ residual); with ``gate_weights_cnn=False`` (the
    authors' code) G weights the Mamba branch instead. gate1's input channels are ordered [y ; p].
    """

    def __init__(self, dim: int, prompt_dim: int = 512, backend: str = "auto", gate_weights_cnn: bool = True,
                 prompt_ratio: int = 4):
        super().__init__()
        self.backend = ops.check_backend(backend)
        self.gate_weights_cnn = gate_weights_cnn
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)
        self.prompt_mlp = nn.Sequential(
            nn.Linear(prompt_dim, prompt_ratio * dim), nn.GELU(), nn.Linear(prompt_ratio * dim, dim)
        )
        self.gate1 = nn.Conv2d(2 * dim, dim, 1)
        self.gate2 = nn.Conv2d(dim, 1, 1)

    def forward(self, y: torch.Tensor, mamba: torch.Tensor, prompt_features: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        p = self.prompt_mlp(prompt_features)  # (B, C)
        if self.backend == "reference":
            return self._literal(y, mamba, p, residual)
        c = y.shape[1]
        g1 = self.gate1.weight[:, :, 0, 0]
        g2_weight, g2_bias = self.gate2.weight[:, :, 0, 0], self.gate2.bias
        if not self.gate_weights_cnn:
            # sigmoid(−s) = 1 − sigmoid(s): negating the last gate layer swaps the two branches.
            g2_weight, g2_bias = -g2_weight, -g2_bias
        return ops.gated_fusion(
            y, mamba, p @ g1[:, c:].t(), self.dwconv.weight, self.dwconv.bias, g1[:, :c], self.gate1.bias,
            g2_weight, g2_bias, residual, self.backend,
        )

    def _literal(self, y, mamba, p, residual):
        """The figure as written: concatenate [y ; p], two 1×1 convolutions, blend."""
        p_map = p[:, :, None, None].expand_as(y)
        gate = torch.sigmoid(self.gate2(F.gelu(self.gate1(torch.cat([y, p_map], dim=1)))))
        cnn = F.gelu(self.dwconv(y))
        out = gate * cnn + (1 - gate) * mamba if self.gate_weights_cnn else gate * mamba + (1 - gate) * cnn
        return out if residual is None else out + residual


class MCDB(nn.Module):
    """Mamba-CNN dual-branch block: forward(x (B, C, H, W), prompt_features (B, prompt_dim)) -> (B, C, H, W)."""

    def __init__(self, dim: int, config):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, config.layernorm_eps)
        self.mamba_norm_in = nn.LayerNorm(dim)
        self.mamba = MambaMixer(dim, config.mamba_d_state, config.mamba_d_conv, config.mamba_expand, config.backend)
        self.mamba_norm_out = nn.LayerNorm(dim)
        self.dgf = DGF(dim, config.prior_dim, config.backend, config.gate_weights_cnn, config.dgf_prompt_ratio)
        self.norm2 = LayerNorm2d(dim, config.layernorm_eps)
        self.ffn = GDFN(dim, config.ffn_expansion_factor, config.bias)

    def forward(self, x: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm1(x)
        seq = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # row-major pixel sequence
        seq = self.mamba_norm_out(self.mamba(self.mamba_norm_in(seq)))
        mamba = seq.reshape(b, h, w, c).permute(0, 3, 1, 2)
        x = self.dgf(y, mamba, prompt_features, residual=x)
        return x + self.ffn(self.norm2(x))
