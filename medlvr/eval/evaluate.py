"""``medlvr eval``: greedy answers with the latent segment, accuracy by benchmark and question type.

Decoding: medlvr.engine.LatentEngine (static cache; Triton/CUDA kernels on a GPU) when it
supports the model, else :func:`hf_greedy`, the plain-HF reference loop over a DynamicCache
(medlvr/engine/hf_loop.py) that follows the same recipe (prefill the left-padded prompt that ends with <|latent_start|>, K latent steps
feeding back the post-norm hidden state, <|latent_end|>, greedy tokens until <|im_end|>).

Scoring: medlvr.data.answers.score (multiple-choice by option text or letter, yes/no by polarity,
otherwise normalised exact match). Outputs: a rich table on stdout, ``predictions.jsonl``,
``accuracy.json`` and ``accuracy.png`` (bars per benchmark and question type).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from medlvr.engine import EngineHolder, supports
from medlvr.engine.hf_loop import latent_loop
from medlvr.models.hf import unwrap
from medlvr.policy import LatentLM, PromptSettings, policy_tokens


@dataclass
class EvalResult:
    overall: float
    n: int
    by_source: dict[str, tuple[float, int]]
    by_qtype: dict[str, tuple[float, int]]
    by_source_qtype: dict[str, dict[str, tuple[float, int]]]
    predictions: list[dict]
    settings: dict = field(default_factory=dict)  # {"prompt": ..., "decoding": ...}: what produced them

    def to_json(self) -> dict:
        return {"overall": self.overall, "n": self.n, "by_source": self.by_source, "by_qtype": self.by_qtype,
                "by_source_qtype": self.by_source_qtype, "settings": self.settings}


def decoding_settings(model: Any, *, k: int, max_new_tokens: int, backend: str,
                      repetition_penalty: float | None = None) -> dict:
    """What evaluation decodes with, and what of the checkpoint's ``generation_config`` it
    overrides. Answers are greedy, as the benchmarks' toolkits score them: a generation_config
    that samples (Qwen2.5-VL ships do_sample=True at temperature 1e-6, greedy in effect) is
    overridden, and ``notice`` says so. Every other setting is read as the drop-in API reads it
    (medlvr/dropin/decoding.py, HF's priority: this call over the generation_config): the
    repetition penalty is the generation_config's unless ``repetition_penalty`` is given, and a
    setting medlvr does not implement (n-gram blocking, beams, ...) is refused by name."""
    from medlvr.dropin.decoding import from_hf
    from medlvr.engine.request import check_repetition_penalty

    base = unwrap(model)
    gen = getattr(base, "generation_config", None)
    d = from_hf({"do_sample": False, "max_new_tokens": max_new_tokens}, model_config=gen,
                vocab=base.get_output_embeddings().weight.shape[0], width=None)
    asked = d.repetition_penalty
    penalty = asked if repetition_penalty is None else check_repetition_penalty(repetition_penalty)
    notices = list(d.notes)
    if gen is not None and getattr(gen, "do_sample", False):
        notices.append(f"generation_config samples (do_sample=True, temperature={gen.temperature}, "
                       f"top_p={getattr(gen, 'top_p', None)}); evaluation decodes greedily")
    if repetition_penalty is not None and penalty != asked:
        notices.append(f"repetition_penalty {penalty:g} overrides generation_config's {asked:g}")
    return {"strategy": "greedy", "repetition_penalty": penalty, "max_new_tokens": max_new_tokens, "k_latent": k,
            "backend": backend, "notice": "; ".join(notices) or None}


def hf_greedy(model, batch: dict, *, k: int, max_new_tokens: int, stop_id: int, latent_end_id: int,
              pad_id: int, projector=None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """[B, T] greedy answer tokens (pad after the stop token) for a LEFT-padded prompt batch,
    from the plain-HF reference loop (medlvr/engine/hf_loop.py): K latent steps, then
    <|latent_end|> (k > 0), then tokens. The prompt's last token is <|latent_start|> (k > 0)
    or "assistant\\n" (k == 0)."""
    return latent_loop(model, batch, k=k, max_new_tokens=max_new_tokens, first_token=latent_end_id if k > 0 else None,
                       projector=projector, stop_ids=[stop_id], pad_id=pad_id,
                       repetition_penalty=repetition_penalty).tokens


def _engine_generate(model, batch: dict, *, k: int, max_new_tokens: int, stop_id: int, latent_end_id: int,
                     pad_id: int, projector, max_batch: int, holder: EngineHolder | None = None,
                     repetition_penalty: float = 1.0) -> torch.Tensor:
    """The engine's [B, T] greedy answer tokens (pad after the stop token), from ``holder``'s
    engine (default: a holder for this call). Positions the engine caches: the longest
    prompt, K latents, <|latent_end|> and every answer token but the last."""
    holder = EngineHolder(model, projector=projector) if holder is None else holder
    eng = holder.for_batch(batch, k_max=k, max_new_tokens=max_new_tokens, rows=max_batch)
    out = eng.generate(batch, k_max=k, exit="fixed", max_new_tokens=max_new_tokens, temperature=0.0,
                       stop_ids=[stop_id], latent_end_id=latent_end_id if k > 0 else None, pad_id=pad_id,
                       repetition_penalty=repetition_penalty)
    return out.tokens


def decode_answers(tokenizer, tokens: torch.Tensor, stop_id: int) -> list[str]:
    out = []
    for row in tokens.tolist():
        if stop_id in row:
            row = row[:row.index(stop_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


class GenerationParts(NamedTuple):
    model: Any
    projector: Any
    k: int
    device: torch.device
    tokenizer: Any
    latent: Any
    stop: int
    pad: int
    prompt: Any  # the PromptSettings its prompts are written with


def generation_parts(lm: Any, processor: Any, k: int | None = None) -> GenerationParts:
    """What greedy answer generation reads from a trained unit (a LatentLM or a bare HF model):
    (model, projector, K, device, tokenizer, latent token ids, stop id, pad id, prompt settings).
    K is ``k`` when given, else the unit's own (0 for a bare model); the prompt settings are the
    LatentLM's (the defaults for a bare model)."""
    unit = isinstance(lm, LatentLM)
    k = (lm.k_latent if unit else 0) if k is None else k
    model = lm.model if unit else lm
    ids = policy_tokens(processor)
    return GenerationParts(model, lm.projector if unit else None, k, next(model.parameters()).device,
                           processor.tokenizer, ids.latent, ids.stop, ids.pad,
                           lm.prompt if unit else PromptSettings())


def evaluate(lm, processor, records: Sequence[Any], *, k: int | None = None, batch_size: int = 32,
             max_new_tokens: int = 8, backend: str = "auto", progress: bool = True,
             mixed_precision: str = "no", repetition_penalty: float | None = None,
             protocol: str | None = None, judge: Any = None) -> EvalResult:
    """Greedy-answer ``records`` with ``lm`` (stage1.LatentLM or a bare HF model) and score them.

    k: latent steps (default: the LatentLM's k_latent; 0 for a bare model).
    backend: "engine", "hf" or "auto" (engine when it supports the model, else hf).
    mixed_precision: autocast around generation ("no", "bf16", "fp16", "auto" = bf16 on a
    GPU). The engine runs in the weights' dtype whatever the autocast (its kernels take one
    dtype); the HF loop runs under it. repetition_penalty: None = the model's generation_config
    (:func:`decoding_settings`; ``EvalResult.settings`` records what was used). protocol: the
    scoring protocol (medlvr/data/scoring/; None: its DEFAULT_PROTOCOL); judge: an LLM judge for
    the protocols that have one (supplied by the caller, docs/scoring.md)."""
    from medlvr.data.collate import collate
    from medlvr.data.scoring import protocol as scoring_protocol
    from medlvr.devices import resolve_mixed_precision
    from medlvr.progress import progress

    if backend not in ("auto", "engine", "hf"):
        raise ValueError(f"backend: expected 'auto', 'engine' or 'hf', got {backend!r}")
    if not records:
        raise ValueError("records: expected at least one record to evaluate, got none")
    scorer = scoring_protocol(protocol)  # an unknown name is refused before any model work
    model, projector, k, device, tok, ids, stop, pad, prompt = generation_parts(lm, processor, k)
    mode = resolve_mixed_precision(mixed_precision)
    amp = torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16, enabled=mode != "no")
    # The engine for every model type it has an adapter for (backend="engine" on another
    # type is refused by EngineHolder, naming the supported types); one engine for all batches.
    use_engine = backend == "engine" or (backend == "auto" and supports(unwrap(model)))
    holder = EngineHolder(model, projector=projector) if use_engine else None
    decoding = decoding_settings(model, k=k, max_new_tokens=max_new_tokens, backend="engine" if use_engine else "hf",
                                 repetition_penalty=repetition_penalty)
    rp = decoding["repetition_penalty"]
    was_training = model.training
    model.eval()
    preds: list[dict] = []
    cache: dict = {}
    try:
        for i in progress(range(0, len(records), batch_size), desc="eval", unit="batch", disable=not progress):
            recs = list(records[i:i + batch_size])
            b = collate(recs, processor, k_latent=k, with_answer=False, latent_token_ids=ids,
                        images_cache=cache, prompt=prompt)
            batch = {kk: v.to(device) for kk, v in b.model_inputs().items()}
            with amp:
                if holder is not None:
                    tokens = _engine_generate(model, batch, k=k, max_new_tokens=max_new_tokens, stop_id=stop,
                                              latent_end_id=ids.end, pad_id=pad, projector=projector,
                                              max_batch=min(batch_size, len(records)), holder=holder,
                                              repetition_penalty=rp)
                else:
                    tokens = hf_greedy(model, batch, k=k, max_new_tokens=max_new_tokens, stop_id=stop,
                                       latent_end_id=ids.end, pad_id=pad, projector=projector, repetition_penalty=rp)
            for r, text in zip(recs, decode_answers(tok, tokens.cpu(), stop)):
                s = scorer(text, r, judge=judge)
                preds.append({"id": r.id, "source": r.source or "unknown", "qtype": r.qtype or "unknown",
                              "answer_type": getattr(r, "answer_type", None) or "unknown",
                              "modality": getattr(r, "modality", None) or "unknown", "question": r.question,
                              "answer": r.answer, "prediction": text, "correct": bool(s.correct),
                              "counted": bool(s.counted), "value": float(s.value)})
    finally:
        model.train(was_training)
    result = summarize(preds)
    result.settings = {"prompt": lm.prompt.to_meta() if isinstance(lm, LatentLM) else None, "decoding": decoding,
                       "protocol": scorer.name}
    return result


def counted_accuracy(rows: Sequence[dict], *, empty: float = 0.0) -> tuple[float, int]:
    """(accuracy, n) over the prediction rows the protocol counts (a toolkit may leave some
    out); ``empty`` is the accuracy of no counted row."""
    rows = [r for r in rows if r.get("counted", True)]
    return (sum(r["correct"] for r in rows) / len(rows), len(rows)) if rows else (empty, 0)


def summarize(preds: list[dict]) -> EvalResult:
    acc = counted_accuracy

    by_s, by_q, by_sq = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    for p in preds:
        by_s[p["source"]].append(p)
        by_q[p["qtype"]].append(p)
        by_sq[p["source"]][p["qtype"]].append(p)
    overall, n = acc(preds)
    return EvalResult(overall=overall, n=n, by_source={s: acc(v) for s, v in sorted(by_s.items())},
                      by_qtype={q: acc(v) for q, v in sorted(by_q.items())},
                      by_source_qtype={s: {q: acc(v) for q, v in sorted(d.items())} for s, d in sorted(by_sq.items())},
                      predictions=preds)


def compare(results: dict[str, EvalResult], *, n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, tuple]]:
    """Paired differences of every run against the first one ({"B - A": paired_differences})."""
    from medlvr.eval.paired import paired_differences

    names = list(results)
    return {f"{n} - {names[0]}": paired_differences(results[names[0]], results[n], n_boot=n_boot, seed=seed)
            for n in names[1:]}
