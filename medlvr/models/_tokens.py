"""The latent special tokens: their ids, and adding them to a tokenizer + model."""
from __future__ import annotations

from typing import NamedTuple

import torch

LATENT_START = "<|latent_start|>"
LATENT_END = "<|latent_end|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_TOKEN_STRINGS = (LATENT_START, LATENT_END, LATENT_PAD)


class LatentTokens(NamedTuple):
    start: int
    end: int
    pad: int


def _tokenizer_of(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def latent_token_ids(processor) -> LatentTokens:
    """Ids of <|latent_start|>, <|latent_end|>, <|latent_pad|> in `processor`'s tokenizer.

    Raises ValueError when a token is missing (it would otherwise map to an unknown/None id and
    silently corrupt every latent segment).
    """
    tok = _tokenizer_of(processor)
    vocab = tok.get_vocab()
    missing = [t for t in LATENT_TOKEN_STRINGS if t not in vocab]
    if missing:
        raise ValueError(
            f"processor: expected a tokenizer with the latent tokens {list(LATENT_TOKEN_STRINGS)}, "
            f"missing {missing}; load the model with medlvr.models.load() which adds them"
        )
    return LatentTokens(*(int(vocab[t]) for t in LATENT_TOKEN_STRINGS))


def add_latent_tokens(model, processor) -> list[int]:
    """Add the latent tokens to `processor`'s tokenizer when absent and give them embeddings.

    Rows for new ids are set to the mean of the pre-existing rows (input embeddings, and the
    output head when it is not tied): a random row would give the new tokens logits and inputs
    far off the trained distribution, the mean keeps the first steps of fine-tuning stable.
    Checkpoints whose embedding matrix already has spare rows (Qwen's vocab_size exceeds the
    tokenizer length) are not resized, but their spare rows are untrained, so they are mean-set
    too. Returns the ids that were added (empty when all were present).
    """
    from tokenizers import AddedToken

    tok = _tokenizer_of(processor)
    vocab = tok.get_vocab()
    missing = [t for t in LATENT_TOKEN_STRINGS if t not in vocab]
    if not missing:
        return []
    old_len = len(tok)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    new_ids = [int(tok.convert_tokens_to_ids(t)) for t in missing]

    emb = model.get_input_embeddings()
    if len(tok) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        mean = inp[:old_len].float().mean(0).to(inp.dtype)
        inp[new_ids] = mean
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():
            w = out.weight
            w[new_ids] = w[:old_len].float().mean(0).to(w.dtype)
            bias = getattr(out, "bias", None)
            if bias is not None:
                bias[new_ids] = bias[:old_len].float().mean().to(bias.dtype)
    return new_ids
