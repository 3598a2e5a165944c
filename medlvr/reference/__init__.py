"""Plain-PyTorch statements of what medlvr computes: the executable specification.

Each module states one op or rule from its definition, plainly (loops over rows are fine:
clarity over speed), and the tests compare production code against it:

- ops (medlvr/ops/): logprobs.py, fused_logprobs.py (also the unfused VLPO objective and the
  lm_head dtype rule), roi_align.py, decode.py, vlpo_loss.py (GRPO's group advantages);
- the engine (medlvr/engine/): exit_rules.py, sampling.py, latent_loop.py (the cacheless
  latent loop that the plain-HF loop, medlvr/engine/hf_loop.py, must equal);
- the drop-in presets (medlvr/dropin/): dropin_loops.py, the public systems' own loops.

The one production use: an op in medlvr/ops may dispatch to a function here as its
"reference" backend (medlvr/_backend.py: the CPU fallback, and every device for an op with
no fast path, e.g. ``roi_pool_targets``), after its own argument checks. Nothing else in
production is to import this package (tests/test_reference_imports.py lists what still
does): the rules production runs live in medlvr/engine/ and medlvr/ops/.
"""
