"""The engine's step state: per-row buffers, preallocated once on the device.

Row b < ``batch`` is sample b of the current request; rows up to ``bucket`` are inert
padding (inactive, length 0) so that a CUDA graph captured for a bucket serves every
batch size that rounds up to it. A decode step reads and writes only these buffers (and
the KV cache), never host values, which is what makes it capturable.
"""
from __future__ import annotations

import torch

MAX_STOP_IDS = 16  # stop ids live in a fixed-size device buffer so graphs need no recapture


def penalty_inverse(penalty: float) -> float:
    """1 / penalty as torch computes it for a division by a Python float on CUDA: both in fp32,
    correctly rounded (medlvr/engine/sampling.py: repetition_penalty's ``inverse``)."""
    one, p = torch.ones((), dtype=torch.float32), torch.tensor(penalty, dtype=torch.float32)
    return float(one / p)


class DecodeState:
    """Buffers of the latent and text steps, and where the current request stands.

    Per row: ``x`` the next input embedding z, ``mu`` its mean feedback(h) (z = mu + sigma
    eps), ``h`` the post-norm hidden that produced it, ``length`` valid cache entries,
    ``pos`` (P, max_batch) the next rotary position, ``active`` (not exited / stopped),
    ``num_latent``, ``tok`` / ``logprob`` the last sampled token and its log-prob,
    ``text_len``, ``logits`` and ``noise`` (Exp(1) draws for the sampler), ``seen``
    (max_batch, V + 1) bool: the token ids in the row's cache (its unpadded prompt, then every
    token fed; the last column absorbs what must not count), which the repetition penalty
    reads. Scalars of the request: ``threshold``, ``sigma``, ``latent_end``, ``temperature``,
    ``top_p``, ``penalty``, ``stop_ids``, ``pad``. ``host_len`` is a host-side upper bound of max(length), so
    capacity checks never sync. ``bucketed``: pad batches to power-of-two buckets (on with
    CUDA graphs; can be switched on elsewhere to exercise the padding rows).
    """

    def __init__(self, *, max_batch: int, hidden_size: int, vocab_size: int, position_rows: int,
                 dtype: torch.dtype, device: torch.device, bucketed: bool):
        def z(*shape, dt=torch.long):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.max_batch, self.bucketed = max_batch, bucketed
        self.x, self.mu, self.h = (z(max_batch, hidden_size, dt=dtype) for _ in range(3))
        self.length = z(max_batch)
        self.pos = z(position_rows, max_batch)
        self.active = z(max_batch, dt=torch.bool)
        self.num_latent = z(max_batch)
        self.tok = z(max_batch)
        self.logprob = z(max_batch, dt=torch.float32)
        self.text_len = z(max_batch)
        self.logits = z(max_batch, vocab_size, dt=torch.float32)
        self.noise = torch.ones(max_batch, vocab_size, dtype=torch.float32, device=device)
        self.seen = z(max_batch, vocab_size + 1, dt=torch.bool)
        # exit_scope="batch" (medlvr/engine/exit_rules.py): the running count of firings,
        # the batch size it must reach, and the latent pad id of after_exit="mirage"
        self.fired_count = z(())
        self.batch_size = z(())
        self.latent_pad = z(1)
        self.k_row = z(max_batch)  # exit="count": latent steps of each row
        self.end_emb = z(hidden_size, dt=torch.float32)  # exit="end_distance": the learned end embedding
        self.threshold = z((), dt=torch.float32)
        self.sigma = z((), dt=torch.float32)
        self.latent_end = z(1)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        self.penalty = torch.ones((), dtype=torch.float32, device=device)
        self.penalty_inv = torch.ones((), dtype=torch.float32, device=device)  # fp32(1 / fp32(penalty))
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)
        self.pad = z(())
        # Grouped generation (medlvr/engine/group.py): row b reads prompt prefix_row[b]'s K/V
        # (prefix_row_len[b] positions, 0 on padding rows) from the shared prefix cache;
        # prefix_len[p] per prompt. group = G rows per prompt (0: independent rows).
        self.prefix_row, self.prefix_row_len, self.prefix_len = z(max_batch), z(max_batch), z(max_batch)
        self.group, self.prompts, self.prefix_host_len = 0, 0, 0
        self.batch = 0  # real samples of the current request (0: no prefill yet)
        self.bucket = 0
        self.host_len = 0
        self._segment_out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------ public face
    @property
    def lengths(self) -> torch.Tensor:
        """(bucket,) valid cache entries per row (padding rows: 0). A view."""
        return self.length[:self.bucket]

    @property
    def positions(self) -> torch.Tensor:
        """(P, bucket) next rotary position per row. A view."""
        return self.pos[:, :self.bucket]

    def bucket_for(self, batch: int) -> int:
        """Rows a batch of ``batch`` samples runs as: itself, or the next power of two
        (capped at max_batch) when bucketed."""
        if not self.bucketed:
            return batch
        bucket = 1
        while bucket < batch:
            bucket *= 2
        return min(bucket, self.max_batch)

    def reset(self) -> None:
        """Zero every buffer a step mutates (all rows inactive, length 0)."""
        for buf in self.mutable():
            buf.zero_()

    def seek(self, length: int) -> None:
        """Put every row of the current batch at ``length`` cached positions, next position
        ``length`` (a synthetic context: benchmarks time steps at a given cache length)."""
        if self.batch == 0:
            raise RuntimeError("seek: no batch; call prefill first")
        self.length[:self.batch].fill_(length)
        self.pos[:, :self.batch].fill_(length)
        self.host_len = length

    def mutable(self) -> list[torch.Tensor]:
        """The buffers a step mutates (besides the KV cache and per-call outputs): what a
        graph capture saves and restores around its warm-up runs."""
        return [self.x, self.mu, self.h, self.length, self.pos, self.active, self.num_latent, self.tok,
                self.logprob, self.text_len, self.logits, self.fired_count, self.seen]

    # ------------------------------------------------------------ engine side
    def start(self, batch: int, *, lengths: torch.Tensor, next_positions: torch.Tensor, hidden: torch.Tensor,
              mu: torch.Tensor, host_len: int, prompt: dict[str, torch.Tensor], repeat: int = 1) -> None:
        """A new request of ``batch`` rows after its prefill of ``prompt`` (input_ids and
        attention_mask; with ``repeat`` = G each prompt is G rows)."""
        self.bucket = self.bucket_for(batch)
        self.reset()
        self.mark_prompt(prompt["input_ids"], prompt["attention_mask"], repeat)
        self.length[:batch].copy_(lengths)
        self.pos[:, :batch].copy_(next_positions)
        self.h[:batch].copy_(hidden)
        self.mu[:batch].copy_(mu)
        self.x[:batch].copy_(mu)
        self.active[:batch] = True
        self.batch, self.host_len = batch, host_len
        self.group, self.prompts, self.prefix_host_len = 0, 0, 0

    def share_prefix(self, group: int, prompt_lengths: torch.Tensor, host_len: int) -> None:
        """After ``start``: the batch is len(prompt_lengths) prompts x ``group`` rows (row
        p * group + j), each row's cache holding only what follows its prompt, the prompt
        itself shared from the prefix cache (medlvr/engine/group.py)."""
        P = prompt_lengths.shape[0]
        self.prefix_len.zero_()
        self.prefix_row.zero_()
        self.prefix_row_len.zero_()
        self.prefix_len[:P].copy_(prompt_lengths)
        self.prefix_row[:P * group].copy_(torch.arange(P, device=self.prefix_row.device).repeat_interleave(group))
        self.prefix_row_len[:P * group].copy_(prompt_lengths.repeat_interleave(group))
        self.group, self.prompts, self.prefix_host_len = group, P, host_len

    def segment_buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, hidden, eps), each (bucket, k, D): the segment's outputs and noise,
        kept per (bucket, k) so a captured graph writes to the same memory every replay."""
        key = (self.bucket, k)
        if key not in self._segment_out:
            self._segment_out[key] = tuple(self.x.new_zeros(self.bucket, k, self.x.shape[1]) for _ in range(3))
        return self._segment_out[key]

    def mark_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1) -> None:
        """``seen`` := the ids of each row's prompt; padding (attention_mask 0) and ids past the
        logits' vocabulary (they cannot be sampled) go to the last column, as HF does."""
        V = self.seen.shape[1] - 1
        ids = input_ids.masked_fill(attention_mask == 0, V).clamp(max=V)
        if repeat > 1:
            ids = ids.repeat_interleave(repeat, dim=0)
        self.seen.zero_()
        self.seen[:ids.shape[0]].scatter_(1, ids, True)

    def mark_fed(self, active: torch.Tensor) -> None:
        """Add each active row's fed token ``tok`` to ``seen`` (inside the captured text step)."""
        Bk = active.shape[0]
        self.seen[:Bk].scatter_(1, self.tok[:Bk].masked_fill(~active, self.seen.shape[1] - 1)[:, None], True)

    def start_text(self, stop_ids: tuple[int, ...], *, pad_id: int, temperature: float, top_p: float,
                   repetition_penalty: float = 1.0) -> None:
        """A text decode's scalars; every row of the batch active again."""
        self.stop_ids.fill_(-1)
        if stop_ids:
            self.stop_ids[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
        self.pad.fill_(pad_id)
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        self.penalty.fill_(repetition_penalty)
        self.penalty_inv.fill_(penalty_inverse(repetition_penalty))
        self.active[:self.batch] = True
        self.text_len.zero_()

    def feed(self, mu: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The fed latent z = mu + sigma * eps in mu's dtype, computed in fp32 (fp64 for an fp64
        model: the package's fp64 rule, checked against medlvr/reference/latent_loop.py)."""
        c = torch.promote_types(mu.dtype, torch.float32)
        return (mu.to(c) + self.sigma * eps.to(c)).to(mu.dtype)

    def draw_noise(self, generator: torch.Generator | None) -> None:
        """The sampler's Exp(1) draws for one text step, from the caller's generator,
        outside any graph."""
        self.noise[:self.bucket].exponential_(generator=generator)

    def record(self, t: int, tokens: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Copy the step's token, log-prob (and logits) of the batch rows into column t."""
        B = tokens.shape[0]
        tokens[:, t].copy_(self.tok[:B])
        logprobs[:, t].copy_(self.logprob[:B])
        if logits is not None:
            logits[:, t].copy_(self.logits[:B])

    def advance(self, active: torch.Tensor) -> None:
        """One position more for the active rows of the bucket."""
        step = active.long()
        self.length[:self.bucket] += step
        self.pos[:, :self.bucket] += step
