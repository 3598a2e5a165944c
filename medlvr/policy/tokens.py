"""The token ids the latent policy reads from its processor, with the one pad rule.

Collate (building batches), VLPO (rollouts: where to stop, what to pad with) and evaluation
(greedy answers) all take them from :func:`policy_tokens`, so the pad fallback is written once:
the tokenizer's own pad token, else the family's ``PAD_FALLBACK`` (medlvr/models/qwen_vl.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medlvr.models import LatentTokens, latent_token_ids
from medlvr.policy import families

__all__ = ["PolicyTokens", "policy_tokens"]


@dataclass(frozen=True)
class PolicyTokens:
    """latent: <|latent_start|>, <|latent_end|>, <|latent_pad|>; stop: the token that ends an
    answer (the answer's last label and the decoding stop); pad: what fills a row after it."""
    latent: LatentTokens
    stop: int
    pad: int


def policy_tokens(processor: Any) -> PolicyTokens:
    fam = families.of_processor(processor)
    tok = processor.tokenizer
    stop = int(tok.convert_tokens_to_ids(fam.ANSWER_END))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(fam.PAD_FALLBACK)
    return PolicyTokens(latent=latent_token_ids(processor), stop=stop, pad=int(pad))
