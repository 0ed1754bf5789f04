"""Projection into the text region of the joint space (METHODS.md section 6; DeCap and FusionCap).

    ProjectionMemory    M [m,D]: normalized embeddings of a caption corpus.
                        project(q) = normalize( sum_i softmax_i(normalize(q) M_i^T / tau) M_i )
    ProjectionNetwork   x -> normalize(P(x) + MLP(P(x))), P = the memory projection (FusionCap)

A decoder trained on text embeddings is applied to image embeddings; DeCap replaces the image
embedding by a convex combination of training-caption embeddings, so the decoder only ever sees
points of the kind it was trained on. The output is renormalized (as DeCap does), because the
decoder was trained on unit-norm caption embeddings and a softmax mixture is shorter than 1.

Memories of up to ~500k captions are handled without a dense [B x m] matrix: the memory is
scanned in chunks of rows sized so that one chunk step's temporaries fit `budget_mb`, with a
streaming (online) log-sum-exp for the exact softmax, or a running top-k. The exact softmax is
differentiable w.r.t. the queries with the same memory bound (the backward pass recomputes the
chunks), so a learned network in front of the projection still gets gradients.

Leave-one-out: `exclude=t` (the clean caption embeddings of a training batch) drops, per query,
every memory entry that is (a copy of) that caption, i.e. cos(t_b, M_i) >= SELF_COS. Without
this, training through the projection would learn the trivial identity "the nearest memory entry
is the caption itself", which never holds for an image.

Storage: M is kept in float16 by default (500k x 512 = 512 MB instead of 1 GB); every chunk is
cast to the query dtype (float32) before use, so sums and the softmax run in float32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError

SELF_COS = 0.999  # cos at or above which a memory entry counts as the excluded caption itself
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_META_KEY = "pcmnet_projection_memory"


def _chunk_logits(q, M, start, stop, tau, exclude):
    """One chunk step: (memory rows [c,D] in q's dtype, logits [B,c], bytes of the temporaries)."""
    Mc = M[start:stop]
    nbytes = 0
    if Mc.dtype != q.dtype:  # the float copy of a float16 chunk
        Mc = Mc.to(q.dtype)
        nbytes += Mc.numel() * Mc.element_size()
    s = (q @ Mc.T) / tau
    nbytes += s.numel() * s.element_size()
    if exclude is not None:
        self_sim = exclude @ Mc.T
        s = s.masked_fill(self_sim >= SELF_COS, float("-inf"))
        nbytes += self_sim.numel() * self_sim.element_size()
    return Mc, s, nbytes


class _StreamingProjection(torch.autograd.Function):
    """o = softmax(q M^T / tau) M over chunks of M, never holding more than one [B x c] block.

    Forward keeps, per query, the running max m, the running sum l of exp(s - m) and the running
    numerator acc = sum exp(s - m) M_i (rescaled whenever m grows). Backward recomputes the chunks:
    with w = softmax(s) and upstream gradient G, dL/ds_i = w_i (G.M_i - G.o), dL/dq = sum_i dL/ds_i M_i / tau.
    Queries whose every memory entry is excluded get o = 0 (and zero gradient).
    """

    @staticmethod
    def forward(ctx, q, M, tau, exclude, chunk, stats):
        B, D = q.shape
        m = torch.full((B,), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros(B, dtype=q.dtype, device=q.device)
        acc = torch.zeros(B, D, dtype=q.dtype, device=q.device)
        for start in range(0, M.shape[0], chunk):
            Mc, s, nbytes = _chunk_logits(q, M, start, start + chunk, tau, exclude)
            new_m = torch.maximum(m, s.amax(1))
            safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            scale = torch.exp(m - safe)  # 0 where m was -inf
            e = torch.exp(s - safe[:, None])
            l = l * scale + e.sum(1)
            acc = acc * scale[:, None] + e @ Mc
            m = new_m
            stats["peak_block_bytes"] = max(stats["peak_block_bytes"], nbytes + e.numel() * e.element_size())
            stats["chunks"] += 1
        o = acc / l.clamp_min(torch.finfo(q.dtype).tiny)[:, None]
        lse = torch.where(l > 0, m + torch.log(l.clamp_min(torch.finfo(q.dtype).tiny)), torch.zeros_like(l))
        ctx.save_for_backward(q, o, lse)
        ctx.M, ctx.tau, ctx.exclude, ctx.chunk, ctx.stats = M, tau, exclude, chunk, stats
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, o, lse = ctx.saved_tensors
        M, tau, exclude, chunk, stats = ctx.M, ctx.tau, ctx.exclude, ctx.chunk, ctx.stats
        go_o = (grad_o * o).sum(1, keepdim=True)  # [B,1]
        grad_q = torch.zeros_like(q)
        for start in range(0, M.shape[0], chunk):
            Mc, s, nbytes = _chunk_logits(q, M, start, start + chunk, tau, exclude)
            w = torch.exp(s - lse[:, None])  # excluded entries: exp(-inf) = 0
            gs = grad_o @ Mc.T  # then in place: w * (G.M_i - G.o), no further [B x c] blocks
            gs -= go_o
            gs *= w
            grad_q += gs @ Mc / tau
            step_bytes = nbytes + 2 * w.numel() * w.element_size()  # w and gs
            stats["peak_block_bytes"] = max(stats["peak_block_bytes"], step_bytes)
        return grad_q, None, None, None, None, None


class ProjectionMemory:
    """A memory of normalized caption embeddings and the softmax projection onto it (DeCap).

    embeds:      [m,D] caption embeddings (normalized here, stored in `dtype`).
    temperature: tau_p of softmax(normalize(q) M^T / tau_p); DeCap's 1/150 by default.
    top_k:       None = exact softmax over the whole memory (streamed); k = exact top-k over all
                 entries, then the softmax over those k only.
    budget_mb:   bound on one chunk step's temporaries (the [B x c] logits, mask and exponentials,
                 and the float copy [c x D] of the chunk); a single row over budget still runs.
    meta:        free description saved with it (corpus, backbone fingerprint, ...).
    After each `project`, `stats` holds chunk_rows, chunks and peak_block_bytes (instrumentation).
    Not an nn.Module: checkpoints save it next to the model (`save`) or reference its file.
    """

    def __init__(self, embeds: torch.Tensor, temperature: float = 1 / 150, top_k: int | None = None,
                 budget_mb: float = 64.0, dtype: str | torch.dtype = "float16", meta: dict | None = None):
        if embeds.dim() != 2 or embeds.shape[0] == 0:
            raise ValueError(f"a projection memory needs a non-empty [m,D] tensor, got {tuple(embeds.shape)}")
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.embeds = torch.empty(embeds.shape, dtype=dtype, device=embeds.device)
        for i in range(0, embeds.shape[0], 65536):  # normalize in float32, a block at a time
            self.embeds[i: i + 65536] = F.normalize(embeds[i: i + 65536].float(), dim=-1).to(dtype)
        self.temperature, self.top_k, self.budget_mb = temperature, top_k, budget_mb
        self.meta = dict(meta or {})
        self.stats: dict = {}

    @property
    def size(self) -> int:
        return self.embeds.shape[0]

    @property
    def dim(self) -> int:
        return self.embeds.shape[1]

    def to(self, device) -> "ProjectionMemory":
        self.embeds = self.embeds.to(device)
        return self

    def chunk_rows(self, num_queries: int, itemsize: int = 4) -> int:
        """Rows per chunk so that one step stays within budget_mb: per row, up to four [B]-long
        columns (logits, self-similarity mask, exponentials / weights and their gradient) plus the
        row's float copy [D]."""
        per_row = itemsize * (4 * num_queries + self.dim)
        return max(1, min(self.size, int(self.budget_mb * 2 ** 20 // per_row)))

    def project(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """[B,D] -> [B,D] unit vectors in the span of the memory (see module docstring).

        exclude: [B,D] clean embeddings whose own copies in the memory must not be used (training
        leave-one-out), or None.
        """
        dtype = queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32
        q = F.normalize(queries.to(dtype), dim=-1)
        if self.embeds.device != q.device:  # the memory follows its queries (moved once, not per call)
            self.embeds = self.embeds.to(q.device)
        M = self.embeds
        excl = None if exclude is None else F.normalize(exclude.detach().to(dtype), dim=-1)
        chunk = self.chunk_rows(q.shape[0], q.element_size())
        self.stats = {"chunk_rows": chunk, "chunks": 0, "peak_block_bytes": 0}
        if self.top_k is None:
            o = _StreamingProjection.apply(q, M, self.temperature, excl, chunk, self.stats)
        else:
            o = self._project_top_k(q, M, excl, chunk)
        return F.normalize(o, dim=-1)

    def _project_top_k(self, q, M, excl, chunk):
        """Exact top-k logits over the chunks (no grad), then a differentiable softmax over those k."""
        k = min(self.top_k, self.size)
        with torch.no_grad():
            vals = torch.empty(q.shape[0], 0, dtype=q.dtype, device=q.device)
            idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
            for start in range(0, self.size, chunk):
                _, s, nbytes = _chunk_logits(q, M, start, start + chunk, self.temperature, excl)
                cv, ci = s.topk(min(k, s.shape[1]), dim=1)
                vals, pos = torch.cat([vals, cv], 1).topk(min(k, vals.shape[1] + cv.shape[1]), dim=1)
                idx = torch.cat([idx, ci + start], 1).gather(1, pos)
                self.stats["peak_block_bytes"] = max(self.stats["peak_block_bytes"], nbytes)
                self.stats["chunks"] += 1
        rows = M[idx].to(q.dtype)  # [B,k,D]
        valid = torch.isfinite(vals)  # False only when fewer than k entries survive the exclusion
        s = torch.einsum("bkd,bd->bk", rows, q) / self.temperature
        w = torch.softmax(s.masked_fill(~valid, -1e30), dim=1) * valid
        return torch.einsum("bk,bkd->bd", w, rows)

    # -- building, saving, loading ----------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_texts(cls, texts: list[str], backbone, corpus: str = "", batch_size: int = 256,
                   temperature: float = 1 / 150, top_k: int | None = None, budget_mb: float = 64.0,
                   dtype: str | torch.dtype = "float16") -> "ProjectionMemory":
        """Embed any caption corpus with the backbone's text tower (the training corpus, or another
        domain's for cross-domain use). Captions are kept as given (duplicates included)."""
        from tqdm.auto import tqdm

        texts = [str(t) for t in texts]
        if not texts:
            raise CheckpointError(f"projection memory: the corpus '{corpus or '<texts>'}' has no captions")
        dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        parts = []
        for i in tqdm(range(0, len(texts), batch_size), desc="projection memory", unit="batch",
                      disable=len(texts) <= batch_size):
            parts.append(backbone.embed_texts(texts[i: i + batch_size], batch_size).to(dt))
        meta = {"corpus": corpus, "backbone": backbone.fingerprint(), "num_captions": len(texts)}
        return cls(torch.cat(parts), temperature, top_k, budget_mb, dt, meta)

    def save(self, path: str | Path) -> None:
        """One safetensors file: tensor "embeds" + json metadata (settings, corpus, backbone). Atomic."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "temperature": self.temperature, "top_k": self.top_k,
                "size": self.size, "dim": self.dim, "dtype": str(self.embeds.dtype).removeprefix("torch.")}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeds": self.embeds.detach().cpu().contiguous()}, str(tmp),
                  metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None,
             budget_mb: float = 64.0) -> "ProjectionMemory":
        """Read a saved memory (temperature and top_k as saved; assign the attributes to change them).
        With `fingerprint`, refuse a memory built by another backbone (another embedding space)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: projection memory file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                embeds = f.get_tensor("embeds")
        except Exception as e:  # noqa: BLE001 - missing key, bad json, or safetensors' own error type
            raise CheckpointError(f"{path}: not a pcmnet projection memory ({type(e).__name__})") from None
        if fingerprint is not None and meta.get("backbone") != fingerprint:
            raise CheckpointError(f"{path}: projection memory was built with backbone "
                                  f"'{meta.get('backbone')}', not the loaded '{fingerprint}'")
        settings = {k: meta.pop(k) for k in ("temperature", "top_k")}
        for k in ("size", "dim", "dtype"):
            meta.pop(k, None)
        return cls(embeds, settings["temperature"], settings["top_k"], budget_mb, embeds.dtype, meta)


class ProjectionNetwork(nn.Module):
    """FusionCap's projection network: x -> normalize(P(x) + MLP(P(x))), P = memory.project.

    The MLP (2 layers, GELU) has its last layer initialised to zero, so an untrained network is
    exactly the DeCap projection. Trained text-only: the input is a (noised) caption embedding,
    projected with the caption itself left out of the memory (`exclude=t`); its output feeds the
    decoder (end-to-end loss), plus optionally an alignment loss 1 - cos(output, t). The memory is
    a plain attribute, not a submodule: state_dict holds the MLP only.
    """

    def __init__(self, memory: ProjectionMemory, dim: int, hidden: int = 512):
        super().__init__()
        self.memory = memory
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        p = self.memory.project(x, exclude=exclude).to(x.dtype)
        return F.normalize(p + self.mlp(p), dim=-1)
