"""Stage 2: VLPO. config.py (VLPOConfig, checked once), rollout.py (sampling and the
teacher-forced pass), rewards.py (the registry of rewards), step.py (one step: rollouts,
rewards, advantages, PPO updates), objective.py (the loop's objective and ``train_vlpo``)."""
from medlvr.train.vlpo.config import VLPO_LOOP_FLAGS, VLPOConfig, VLPOTokens, vlpo_loop
from medlvr.train.vlpo.objective import VLPOObjective, train_vlpo
from medlvr.train.vlpo.rewards import REWARDS, Reward, outcome_rewards, register_reward, reward_weights, \
    unregister_reward
from medlvr.train.vlpo.rollout import Rollouts, RolloutSettings, sample_rollouts
from medlvr.train.vlpo.step import LossInputs, PolicyScorer, policy_updater, vlpo_step

__all__ = ["VLPOConfig", "VLPOTokens", "vlpo_loop", "VLPO_LOOP_FLAGS", "VLPOObjective", "train_vlpo", "REWARDS",
           "Reward", "register_reward", "unregister_reward", "reward_weights", "outcome_rewards", "Rollouts",
           "RolloutSettings", "sample_rollouts", "LossInputs", "PolicyScorer", "policy_updater", "vlpo_step"]
