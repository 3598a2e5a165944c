"""The latent policy: the unit both stages train, VLPO rolls out and evaluation decodes.

    batch.py     the batch layout, its check, the latent shift (mu_t from column P + t - 1), ROI bins
    latent.py    the teacher-forced forwards: recurrent, and with the latents given; answer CE
    head.py      the lm_head choice (fused op on the weight, or the head's forward; FSDP gather)
    model.py     LatentLM, its config, the builder, load_trained
    families.py  which model family's facts apply (registry keyed by model_type)
    tokens.py    latent / stop / pad token ids (the one pad rule)
    prompt.py    a prompt batch's positions, mask and embeddings, built once per step
    lora.py      the one contact with peft
    run_dir.py   the run folder every stage saves and every reader loads
    fsdp.py      sharding the policy (FSDP2)
"""
from medlvr.policy import families
from medlvr.policy.batch import IGNORE_INDEX, MODEL_INPUTS, Batch, latent_mu, latent_start, roi_bins
from medlvr.policy.latent import LatentOutput, LatentProjector, forward_with_latents, recurrent_forward
from medlvr.policy.model import LatentLM, PolicyConfig, build_trainable, load_trained
from medlvr.policy.prompt import PromptSettings
from medlvr.policy.run_dir import RunDir, run_meta
from medlvr.policy.tokens import PolicyTokens, policy_tokens

__all__ = ["Batch", "MODEL_INPUTS", "IGNORE_INDEX", "latent_mu", "latent_start", "roi_bins", "LatentOutput",
           "LatentProjector", "forward_with_latents", "recurrent_forward", "LatentLM", "PolicyConfig",
           "build_trainable", "load_trained", "PromptSettings", "RunDir", "run_meta", "PolicyTokens", "policy_tokens", "families"]
