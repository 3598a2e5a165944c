"""Stage 1: ROI-supervised latent fine-tuning (objective.py), its settings (config.py), the loss
terms' registry (terms.py) and the ROI term (roi.py)."""
from medlvr.train.sft.config import MODES, ROI_LOSSES, ROI_POOLINGS, Stage1Config
from medlvr.train.sft.objective import EpochSampler, SFTObjective, stage1_loss, train_stage1
from medlvr.train.sft.terms import LOSS_TERMS, LossTerm, TermInputs, register_loss_term, unregister_loss_term

__all__ = ["Stage1Config", "MODES", "ROI_LOSSES", "ROI_POOLINGS", "SFTObjective", "EpochSampler", "stage1_loss",
           "train_stage1", "LOSS_TERMS", "LossTerm", "TermInputs", "register_loss_term", "unregister_loss_term"]
