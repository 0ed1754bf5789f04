"""Batched beam search (and greedy = beam 1) over any decoder, plus sampling for RL rewards.

A decoder is seen through one function: `step(tokens [M, t]) -> log-probs [M, V]` of the next token
given the tokens so far; the caller arranges the M = batch * beam rows (row b*K + k is beam k of
item b) and whatever encoder memory they need. Scores are summed log-probabilities; finished
beams stay in the beam with their score frozen (they extend with <pad> at log-prob 0), and the final
choice divides each beam's score by length ** length_penalty (0 = raw sum, the captioning
convention; 1 = mean log-prob).
"""
from __future__ import annotations

from typing import Callable

import torch


def _banned_by_ngram(seqs: list[list[int]], n: int) -> list[list[int]]:
    """For each sequence, the tokens that would repeat an n-gram it already contains."""
    banned = []
    for s in seqs:
        if n <= 0 or len(s) < n:
            banned.append([])
            continue
        prefix = tuple(s[len(s) - n + 1:]) if n > 1 else ()
        seen = [s[i + n - 1] for i in range(len(s) - n + 1) if tuple(s[i: i + n - 1]) == prefix]
        banned.append(seen)
    return banned


@torch.no_grad()
def beam_search(step: Callable[[torch.Tensor], torch.Tensor], batch_size: int, bos_id: int,
                eos_id: int, pad_id: int, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens [B, T] without the leading bos, ending in eos or cut at max_len; scores [B]).

    `max_len` counts generated words; the eos after them is forced at step max_len + 1.
    """
    B, K = batch_size, beam_size
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep only one alive at step 1
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, K, device=device)
    for t in range(max_len + 1):
        logp = step(tokens).float()  # [B*K, V]
        V = logp.shape[-1]
        logp = logp.view(B, K, V)
        if t == max_len:  # out of room: only eos may follow, at its own cost (a beam cut at the
            forced = torch.full_like(logp, float("-inf"))  # limit pays log p(eos) like any other)
            forced[..., eos_id] = logp[..., eos_id]
            logp = forced
        if no_repeat_ngram > 0:
            for row, bad in enumerate(_banned_by_ngram(tokens[:, 1:].tolist(), no_repeat_ngram)):
                if bad:
                    logp[row // K, row % K, bad] = float("-inf")
        # finished beams: only <pad>, at no cost
        done_row = torch.full((V,), float("-inf"), device=device)
        done_row[pad_id] = 0.0
        logp = torch.where(finished.unsqueeze(-1), done_row, logp)
        cand = (scores.unsqueeze(-1) + logp).view(B, K * V)
        top, idx = cand.topk(K, dim=-1)
        beam, word = idx // V, idx % V
        base = (torch.arange(B, device=device) * K).unsqueeze(1)
        tokens = torch.cat([tokens[(base + beam).view(-1)], word.view(-1, 1)], dim=1)
        prev_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~prev_finished).float()
        finished = prev_finished | (word == eos_id)
        scores = top
        if bool(finished.all()):
            break
    final = scores / lengths.clamp(min=1) ** length_penalty if length_penalty else scores
    best = final.argmax(-1)
    rows = torch.arange(B, device=device) * K + best
    return tokens[rows, 1:], final.gather(1, best.unsqueeze(1)).squeeze(1)


def sample(step: Callable[[torch.Tensor], torch.Tensor], batch_size: int, bos_id: int, eos_id: int,
           pad_id: int, max_len: int = 20, temperature: float = 1.0,
           generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Multinomial sampling without gradient. Returns tokens [B, T] (no bos), padded after eos.

    Log-probs for a policy gradient are recomputed with teacher forcing by the caller, so the
    sampling loop itself needs no graph.
    """
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    with torch.no_grad():
        for t in range(max_len + 1):
            logp = step(tokens).float()
            if t == max_len:
                nxt = torch.full((batch_size,), eos_id, dtype=torch.long, device=device)
            elif temperature <= 0:  # the zero-temperature limit: greedy
                nxt = logp.argmax(-1)
            else:
                probs = torch.softmax(logp / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], 1)
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
    return tokens[:, 1:]
