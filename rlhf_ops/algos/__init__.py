"""RLHF algorithms as small pure torch functions (no I/O, no config objects).

Modules: :mod:`.masked` (masked reductions), :mod:`.logprobs` (chunked token logprobs/entropy),
:mod:`.kl` (KL estimators, KL controllers), :mod:`.advantages` (GAE, returns, group baselines,
``compute_advantages``), :mod:`.losses` (PPO policy/value, entropy, KL loss) and
:mod:`.preference` (pairwise RM, DPO/IPO, PRM losses).
"""

from rlhf_ops.algos.advantages import (
    AdvantageEstimator,
    AdvantageOut,
    compute_advantages,
    discounted_returns,
    dr_grpo_PG,
    gae,
    group_mean_baseline_PG,
    group_norm_PG,
    rloo_baseline_PG,
    token_rewards_with_kl,
)
from rlhf_ops.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLKind,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
)
from rlhf_ops.algos.logprobs import IGNORE_INDEX, sequence_logprob_sums, token_entropy, token_logprobs
from rlhf_ops.algos.losses import (
    LossAgg,
    PolicyLossOut,
    ValueLossOut,
    aggregate_loss,
    entropy_loss,
    kl_loss,
    ppo_policy_loss,
    value_loss,
)
from rlhf_ops.algos.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_ops.algos.preference import (
    DPOLossOut,
    PairwiseLossOut,
    PRMLossOut,
    dpo_loss,
    pairwise_reward_loss,
    prm_loss,
    select_prm_logits,
)

__all__ = [
    "AdaptiveKLController",
    "AdvantageEstimator",
    "AdvantageOut",
    "DPOLossOut",
    "FixedKLController",
    "IGNORE_INDEX",
    "KLKind",
    "LossAgg",
    "PRMLossOut",
    "PairwiseLossOut",
    "PolicyLossOut",
    "ValueLossOut",
    "aggregate_loss",
    "compute_advantages",
    "discounted_returns",
    "dpo_loss",
    "dr_grpo_PG",
    "entropy_loss",
    "gae",
    "group_mean_baseline_PG",
    "group_norm_PG",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "prm_loss",
    "rloo_baseline_PG",
    "select_prm_logits",
    "sequence_logprob_sums",
    "token_entropy",
    "token_logprobs",
    "token_rewards_with_kl",
    "value_loss",
]
