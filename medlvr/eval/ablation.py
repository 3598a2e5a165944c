"""Does the model use its latents? Answer with the latent segment intervened on.

For each batch the latent loop (medlvr/engine/hf_loop.py, greedy, fixed K) runs once
clean, recording the latents z (B, K, D) it fed, then once per ablation with the K fed inputs
replaced by a transform of the clean ones (nothing else changes: the same prompt, the same
<|latent_end|>, greedy answer tokens):

    zero        z -> 0
    shuffle     z -> the latents of another sample of the batch (a cyclic shift of a seeded
                random order, so no sample keeps its own)
    noise@s     z -> z + s * eps, eps ~ N(0, I) (seeded)

Reported per ablation: the shift of the answer distribution, the mean over records of
KL(p_clean || p_ablated) of the first answer token (nats; the answer's first token is where
the two runs still condition on the same text), the fraction of answers that change, and the
accuracy change (ablated minus clean, from the same greedy loop). A model whose latents carry
nothing shows shifts near 0 nats and no accuracy change under every ablation.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from medlvr.policy.prompt import prompt_inputs
from medlvr.engine.hf_loop import latent_loop

__all__ = ["latent_ablation", "format_ablation"]


class _Replay:
    """A latent_loop ``projector`` that ignores the hidden state and feeds the given latents:
    call t (t < K) returns z[:, t] (the loop calls it K + 1 times; the last one is unused)."""

    def __init__(self, z: torch.Tensor):
        self.z, self.t = z, 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        t = min(self.t, self.z.shape[1] - 1)
        self.t += 1
        return self.z[:, t].to(h.dtype)


def _ablations(z: torch.Tensor, sigmas: Sequence[float], g: torch.Generator) -> dict[str, torch.Tensor]:
    B = z.shape[0]
    order = torch.randperm(B, generator=g)
    src = torch.empty(B, dtype=torch.long)
    src[order] = order.roll(-1)  # sample order[i] takes the latents of order[i + 1]
    out = {"zero": torch.zeros_like(z), "shuffle": z[src.to(z.device)]}
    for s in sigmas:
        eps = torch.randn(z.shape, generator=g, dtype=torch.float32).to(z.device)
        out[f"noise@{s:g}"] = (z.float() + s * eps).to(z.dtype)
    return out


def latent_ablation(lm, processor, records: Sequence[Any], *, k: int | None = None, sigmas: Sequence[float] = (0.1, 1.0),
                    batch_size: int = 32, max_new_tokens: int = 8, seed: int = 0) -> dict | None:
    """{"n", "accuracy" (clean), "ablations": {name: {"shift_nats", "changed", "accuracy",
    "delta_accuracy"}}} for ``lm`` (a stage-1 LatentLM or run loaded by stage1.load_trained) on
    ``records``; None when the model has no latent segment (K = 0). Batches of one sample
    cannot be shuffled: their shuffle rows are skipped."""
    from medlvr.data.collate import collate
    from medlvr.eval.evaluate import decode_answers, generation_parts
    from medlvr.data.answers import score

    model, projector, k, device, tok, ids, stop, pad, settings = generation_parts(lm, processor, k)
    if k <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    clean_correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(records), batch_size):
                recs = list(records[i:i + batch_size])
                b = collate(recs, processor, k_latent=k, with_answer=False, latent_token_ids=ids,
                            prompt=settings)
                prompt = prompt_inputs(model, b.to(device))
                run = dict(k=k, max_new_tokens=max_new_tokens, first_token=ids.end, stop_ids=[stop], pad_id=pad,
                           return_logits=True)
                clean = latent_loop(model, prompt, projector=projector, **run)
                texts = decode_answers(tok, clean.tokens.cpu(), stop)
                ok = [bool(score(t, r)) for t, r in zip(texts, recs)]
                clean_correct += sum(ok)
                logp_c = torch.log_softmax(clean.logits[:, 0].float(), -1)
                for name, z in _ablations(clean.latents, sigmas, g).items():
                    if name == "shuffle" and len(recs) < 2:
                        continue
                    out = latent_loop(model, prompt, projector=_Replay(z), **run)
                    logp_a = torch.log_softmax(out.logits[:, 0].float(), -1)
                    kl = (logp_c.exp() * (logp_c - logp_a)).sum(-1)
                    t_a = decode_answers(tok, out.tokens.cpu(), stop)
                    s = sums.setdefault(name, {"shift_nats": 0.0, "changed": 0.0, "correct": 0.0, "clean": 0.0})
                    s["shift_nats"] += float(kl.sum())
                    s["changed"] += sum(x != y for x, y in zip(texts, t_a))
                    s["correct"] += sum(bool(score(t, r)) for t, r in zip(t_a, recs))
                    s["clean"] += sum(ok)
                    counts[name] = counts.get(name, 0) + len(recs)
    finally:
        model.train(was_training)
    n = len(records)
    abl = {}
    for name, s in sums.items():
        c = counts[name]
        abl[name] = {"shift_nats": s["shift_nats"] / c, "changed": s["changed"] / c, "accuracy": s["correct"] / c,
                     "delta_accuracy": (s["correct"] - s["clean"]) / c}
    return {"n": n, "k": k, "accuracy": clean_correct / n, "ablations": abl}


def format_ablation(results: dict[str, dict | None], *, title: str = "latent ablation") -> str:
    """A rich table: one row per (run, ablation): answer shift (nats), answers changed (%),
    accuracy change (points). Runs without latents get one row saying so."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, j in (("run", "left"), ("ablation", "left"), ("shift (nats)", "right"), ("changed %", "right"),
                   ("acc %", "right"), ("Δacc (pts)", "right")):
        table.add_column(col, justify=j)
    for run, res in results.items():
        if res is None:
            table.add_row(run, "no latent segment (K = 0)", "", "", "", "")
            continue
        table.add_row(run, "none (clean)", "0", "0.0", f"{100 * res['accuracy']:.1f}", "")
        for name, a in res["ablations"].items():
            table.add_row("", name, f"{a['shift_nats']:.4f}", f"{100 * a['changed']:.1f}", f"{100 * a['accuracy']:.1f}",
                          f"{100 * a['delta_accuracy']:+.1f}")
    console = Console(record=True, width=100)
    console.print(table)
    return console.export_text()
