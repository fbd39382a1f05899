"""Beam search (and beam sampling) with the same choices as transformers' ``_beam_search``.

The algorithm is transformers' vectorised one, so sequences and ``sequences_scores``
agree with it on the same weights. Per batch item and step:

1. every running beam's log-probabilities (processed) are added to its running score;
2. the best ``K = max(2, 1 + n_stop_ids) * num_beams`` (beam, token) continuations are
   taken (sampled without replacement with ``do_sample``), so that even if many of them
   end in a stop id there are ``num_beams`` left to continue;
3. continuations that stop become finished candidates, scored ``logp / new_len **
   length_penalty``; only the best ``num_beams`` finished hypotheses are kept;
4. the best ``num_beams`` non-stopping continuations run on; the KV cache rows follow.

It stops when no running beam can beat the worst kept hypothesis (the
``early_stopping`` heuristics below), when every continuation hit a stop condition,
or (``early_stopping=True``) when ``num_beams`` hypotheses are finished.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .outputs import GenerateBeamDecoderOnlyOutput
from .plan import Plan

NEG = -1.0e9  # "impossible" without the NaNs that -inf arithmetic can produce


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) -> (B, M, ...) taking beams ``index`` (B, M) along dim 1."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _Beams:
    """The running and finished hypotheses of a batch (B items x num_beams)."""

    def __init__(self, plan: Plan) -> None:
        cfg, ids = plan.cfg, plan.ids
        B, P = ids.shape
        nb = cfg.num_beams
        self.B, self.P, self.nb = B, P, nb
        self.keep = max(2, 1 + len(plan.eos_ids)) * nb
        self.top_nb = torch.arange(self.keep, device=ids.device) < nb  # (K,)
        # As transformers: a pad id of 0 (or none) falls back to the first stop id.
        fill = (plan.pad_id or plan.eos_ids[0]) if plan.eos_ids else -1
        self.running = torch.full((B, nb, cfg.max_length), fill, dtype=torch.long, device=ids.device)
        self.running[:, :, :P] = ids[:, None]
        self.finished = self.running.clone()
        self.running_scores = torch.zeros(B, nb, device=ids.device)
        self.running_scores[:, 1:] = NEG  # all beams start equal: let only the first expand
        self.finished_scores = torch.full((B, nb), NEG, device=ids.device)
        self.is_finished = torch.zeros(B, nb, dtype=torch.bool, device=ids.device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=ids.device)
        self.hits = torch.zeros(B, nb, dtype=torch.bool, device=ids.device)
        self.running_src = torch.full((B, nb, cfg.max_length - P), -1, dtype=torch.int32, device=ids.device)
        self.finished_src = self.running_src.clone()


def beam_search(decoder, plan: Plan, generator: torch.Generator | None):
    cfg = plan.cfg
    beams = _Beams(plan)
    B, P, nb = beams.B, beams.P, beams.nb
    logits = decoder.prefill()  # (B, V): one prefill per prompt, then copied to its beams
    rows = torch.arange(B, device=logits.device).repeat_interleave(nb)
    decoder.reorder(rows)
    logits, mask = logits[rows], plan.mask[rows]
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    all_scores: list[torch.Tensor] = []
    raw_logits: list[torch.Tensor] = []
    cur_len = P
    while True:
        flat = beams.running[:, :, :cur_len].reshape(B * nb, cur_len)  # (B*nb, cur_len)
        raw = logits.float()
        log_probs = plan.processors(flat, F.log_softmax(raw, dim=-1))  # (B*nb, V)
        if cfg.return_dict_in_generate:
            if cfg.output_logits:
                raw_logits.append(raw.clone())
            if want_scores:
                all_scores.append(log_probs.clone())
        scores_so_far = tuple(all_scores) if want_scores else None
        _advance(beams, plan, log_probs, cur_len, scores_so_far, generator)
        source = beams.running_src[..., cur_len - P].flatten().long()  # (B*nb,) rows the beams came from
        decoder.reorder(source)
        mask = torch.cat([mask[source], torch.ones_like(mask[:, :1])], dim=1)
        cur_len += 1
        _update_improvable(beams, cfg, cur_len)
        if not _should_continue(beams, cfg.early_stopping):
            break
        logits = decoder.step(beams.running[:, :, cur_len - 1].flatten(), mask)
    return _finish(beams, cfg, all_scores, raw_logits)


def _advance(beams: _Beams, plan: Plan, log_probs, cur_len: int, scores_so_far, generator) -> None:
    """Steps 1-4 of the module docstring for one new token."""
    cfg, B, P, nb, K = plan.cfg, beams.B, beams.P, beams.nb, beams.keep
    V = log_probs.shape[-1]
    total = (log_probs.view(B, nb, V) + beams.running_scores[:, :, None]).reshape(B, nb * V)
    if cfg.do_sample:
        top_index = torch.multinomial(total.softmax(-1), K, generator=generator)  # (B, K)
        top_lp = total.gather(1, top_index)
    else:
        top_lp, top_index = torch.topk(total, K)  # (B, K)
    from_beam = top_index // V
    seqs = _gather(beams.running, from_beam)  # (B, K, max_length)
    seqs[:, :, cur_len] = top_index % V
    src = _gather(beams.running_src, from_beam)  # (B, K, max_new)
    src[:, :, cur_len - P] = from_beam + torch.arange(B, device=from_beam.device)[:, None] * nb
    hits = plan.stopper(seqs[:, :, : cur_len + 1].reshape(B * K, cur_len + 1), scores_so_far).view(B, K)
    beams.hits = hits
    # 4. the best non-stopping continuations run on.
    running_lp = top_lp + hits.float() * NEG
    keep = torch.topk(running_lp, nb)[1]  # (B, nb)
    beams.running = _gather(seqs, keep)
    beams.running_scores = _gather(running_lp, keep)
    beams.running_src = _gather(src, keep)
    # 3. stopping continuations among the top num_beams compete with the kept hypotheses.
    just_finished = hits & beams.top_nb[None, :]
    final_lp = top_lp / ((cur_len + 1 - P) ** cfg.length_penalty)
    full = beams.is_finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
    final_lp = final_lp + full.float() * NEG + (~beams.improvable).float() * NEG
    final_lp = final_lp + (~just_finished).float() * NEG
    merged_scores = torch.cat([beams.finished_scores, final_lp], dim=1)  # (B, nb + K)
    best = torch.topk(merged_scores, nb)[1]
    beams.finished = _gather(torch.cat([beams.finished, seqs], dim=1), best)
    beams.finished_scores = _gather(merged_scores, best)
    beams.finished_src = _gather(torch.cat([beams.finished_src, src], dim=1), best)
    beams.is_finished = _gather(torch.cat([beams.is_finished, just_finished], dim=1), best)


def _update_improvable(beams: _Beams, cfg, cur_len: int) -> None:
    """Can a running beam still beat the worst kept hypothesis? With ``early_stopping=False``
    transformers assumes the best score comes at the current length; with "never" and a
    positive length penalty, at the longest allowed length."""
    if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
        best_len = cfg.max_length - beams.P
    else:
        best_len = cur_len - beams.P
    best_running = beams.running_scores[:, :1] / (best_len**cfg.length_penalty)  # (B, 1)
    worst = beams.finished_scores.min(dim=1, keepdim=True)[0]  # (B, 1)
    worst_kept = torch.where(beams.is_finished, worst, beams.finished_scores.new_tensor(NEG))
    beams.improvable = beams.improvable & (best_running > worst_kept).any(-1, keepdim=True)


def _should_continue(beams: _Beams, early_stopping) -> bool:
    improvable = bool(beams.improvable.any())
    open_beam = not (bool(beams.is_finished.all()) and early_stopping is True)
    return improvable and open_beam and not bool(beams.hits.all())


def _finish(beams: _Beams, cfg, all_scores, raw_logits):
    n = cfg.num_return_sequences
    seqs = beams.finished[:, :n].reshape(beams.B * n, -1)  # (B*n, max_length)
    scores = beams.finished_scores[:, :n].reshape(-1)  # (B*n,)
    src = beams.finished_src[:, :n].reshape(beams.B * n, -1)  # (B*n, max_new)
    generated = int((src + 1).bool().sum(dim=1).max())
    seqs, src = seqs[:, : beams.P + generated], src[:, :generated]
    if not cfg.return_dict_in_generate:
        return seqs
    return GenerateBeamDecoderOnlyOutput(
        sequences=seqs,
        sequences_scores=scores if cfg.output_scores else None,
        scores=tuple(all_scores) if cfg.output_scores else None,
        logits=tuple(raw_logits) if cfg.output_logits else None,
        beam_indices=src,
    )
