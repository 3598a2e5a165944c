"""Stage 1's settings: the policy's shape (medlvr/policy/model.py's PolicyConfig) and the
objective's: how the latent inputs are made and how the ROI alignment term is measured."""
from __future__ import annotations

from dataclasses import dataclass

from medlvr.flags import opt
from medlvr.policy import PolicyConfig

__all__ = ["Stage1Config", "MODES", "ROI_LOSSES", "ROI_POOLINGS"]

MODES = ("recurrent", "teacher-forced")
ROI_LOSSES = ("cosine", "mse")
ROI_POOLINGS = ("area", "bilinear")


@dataclass
class Stage1Config(PolicyConfig):
    """The stage-1 method; each field's metadata makes its ``medlvr sft`` flag (medlvr/flags.py).
    run.json's "stage1" is this dataclass's dict."""
    mode: str = opt("recurrent", "recurrent = the exact latent recurrence, hidden state fed back (default); "
                                 "teacher-forced = one forward with the pooled ROI targets as latent inputs (LVR-style)",
                    choices=MODES)
    roi_weight: float = opt(1.0, "lambda of the ROI alignment term")
    roi_loss: str = opt("cosine", "ROI alignment distance between latent k and its pooled target (default cosine: "
                                  "1 - cos)", choices=ROI_LOSSES)
    roi_pooling: str = opt("area", "pooling of the vision tokens inside the ROI into K targets: area = "
                                   "overlap-weighted mean per bin, bilinear = RoIAlign (default area)",
                           choices=ROI_POOLINGS)

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.roi_loss not in ROI_LOSSES:
            raise ValueError(f"roi_loss: expected 'cosine' or 'mse', got {self.roi_loss!r}")
        if self.roi_pooling not in ROI_POOLINGS:
            raise ValueError(f"roi_pooling: expected 'area' or 'bilinear', got {self.roi_pooling!r}")
        if self.roi_weight < 0:
            raise ValueError(f"roi_weight: expected >= 0, got {self.roi_weight}")
