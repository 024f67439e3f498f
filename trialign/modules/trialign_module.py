"""`TriAlignModule`: the training objective of DESIGN.md as a LightningModule that wires the components it receives.

One training step on a batch of B items × G groups × K samples × T turns (N = B·G·K episodes, one sequence each):

1. one forward of the policy over the episodes → the per-turn action log-probabilities log π(a_t|s_t) (summed over
   the action's tokens) and the backbone's last hidden state at the end of each state s_t;
2. per group g: V_g(s_t) from the group's value head, the value loss L^V_g and advantages from the `value`
   estimator, and the policy loss L^π_g = Σ_i w_i ℓ_i / Σ_i w_i from the `objective` over the group's samples
   (pools: (item, group, turn) for pairwise objectives, (item, group) otherwise);
3. group utilities U_g (`GroupUtility`: SNIS over the batch's samples and, where the probe runs, the exact
   E_π[truth] at the items' states; their mean per group folded into an EMA across steps) and aggregation weights
   ω = `aggregator`(L_g, U, present);
4. the inconsistency `penalty` from a forward of the answer probe under every group's persona (option
   log-likelihoods [B, G, O] summed over the continuation tokens; gold log-probability per token [B, G]);
5. the KL to the reference policy (the same backbone with adapters disabled, no gradient) on the action tokens.

    L = Σ_g ω_g (L^π_g + c_v L^V_g + c_T L^truth_g) + λ·Penalty + β_KL·KL

Cross-group states (DESIGN.md): rows of the rollout without episodes, only every group's first state s_0. A batch
may hold them, episode items, or both: the episode terms (1-3, 5) run on the episode items; the penalty and the
truth term L^truth_g (`trialign.modules.truth`, weight `truth_coef` = c_T) on the probe of every item's s_0.

Where we fill in for the paper:
* U_g is estimated per *turn*: each valid turn is a sample with reward r_t and one-step log-ratio
  log π(a_t|s_t) − log μ(a_t|s_t) (the stored behaviour log-probability). Per-turn ratios have far lower variance
  than episode ratios (a product over turns of multi-token ratios) at the price of ignoring the shift in the state
  distribution; the rollout's log μ is that of its sampling distribution, so the ratio also absorbs the sampling
  temperature, which self-normalization within a group largely cancels.
* The value heads read the hidden state detached from the backbone by default (`detach_value_features`): the
  critic then cannot move the shared LoRA policy, which matters on small offline datasets; set it False for a
  MAPPO-style shared trunk.
* Reference forwards run only when needed: for the KL (β_KL > 0) or for objectives that need reference
  log-probabilities (DPO); and they start at the lowest adapted layer, from that layer's input in the policy
  forward (the layers below hold no adapter, so policy and reference agree there). The probe forward runs only
  when the penalty can be non-zero.
* Validation reads the answer probe on held-out items under every group's persona and updates the audit metrics.
  Free-form items (numeric / short text) are skipped there: their answers need a greedy decode, which `trialign
  evaluate` does; the penalty still uses their gold log-probability in training.

Checkpoints: Lightning checkpoints hold the trainable weights (adapters, heads), the component states (GroupUtility
EMA, GroupRobust weights are buffers) and the optimizer; the frozen base weights are left out (they come from the
model source, and `strict_loading` is off for them only — a checkpoint missing a trainable key is an error). Besides,
every checkpoint and the end of training export `adapter_dir` (default `<log_dir>/adapter`; the CLI's is
`<default_root_dir>/adapter`) with the adapters (`save_pretrained`, safetensors; loadable with
`PeftModel.from_pretrained`) and `value_heads.safetensors`. A checkpoint exports from its own state dict, which under
FSDP (`state_dict_type: full`) is the gathered one; at the end of an FSDP run the live shards are not exported.
Resuming with `ckpt_path` is exact at epoch boundaries; mid-epoch it restarts the epoch's data unless the data
loader is stateful (Lightning's rule).

Divergence guard: `trialign.modules.divergence.DivergenceGuard`, a Callback this module installs
(`configure_callbacks`), checks every loss term before the backward pass and every gradient before the optimizer
step, and stops training with a message naming the step and the term.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from trialign.backbone import DEFAULT_MODEL, LoraSettings, native_bf16
from trialign.config_io import from_cli
from trialign.errors import TriAlignError
from trialign.metrics import audit_metrics, check_group_names, flatten_results
from trialign.modules.aggregators import Aggregator
from trialign.modules.export import check_trainable_keys, split_module_state, write_adapter_folder
from trialign.modules.heads import GroupValueHeads
from trialign.modules.kl import context_kl as language_anchor, reference_kl
from trialign.modules.objectives import PolicyObjective
from trialign.modules.penalties import AnchoredToReference, InconsistencyPenalty, NoPenalty
from trialign.modules.policy import SHARED_ADAPTER, Policy
from trialign.modules.probe_groups import step_groups
from trialign.modules.schedules import check_schedule, lr_factor, total_fit_steps
from trialign.modules.truth import expected_truth, truth_loss
from trialign.modules.utility import GroupUtility, snis_group_means
from trialign.modules.values import ValueEstimator

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
COMPONENTS = ("value", "objective", "aggregator", "penalty")
TRUTH_GROUPS = ("all", "reference")
PER_GROUP_LOSSES = (("loss", "group_loss"), ("policy_loss",) * 2, ("value_loss",) * 2, ("truth_loss",) * 2)


class TriAlignModule(LightningModule):
    """Offline multi-agent alignment: a LoRA policy shared by all groups, one value head per group, and the
    components of the objective (see the module docstring).

    Args:
        group_names: the groups, in the data's order (linked from `data.group_names` by the CLI).
        value: value estimator (Monte-Carlo, TD(λ), expectile).
        objective: policy objective (advantage-weighted, filtered BC, pairwise DPO).
        aggregator: how per-group losses are weighted (utilitarian, NSW, max-min, α-fair, GR-DPO).
        penalty: cross-group inconsistency penalty on the answer probe.
        model: model source of the backbone (embedded alias, local directory, GGUF file or hub id).
        lora: LoRA hyper-parameters.
        dtype: weight dtype of the backbone.
        autocast: bf16 autocast of the training steps' forward passes; None: where bf16 is native on the device
            (`trialign.backbone.native_bf16`: AVX512-BF16/AMX CPUs, bf16 GPUs), where a step runs about 1.7x faster.
        per_group_adapters: one LoRA adapter per group instead of one shared adapter.
        gradient_checkpointing: recompute the backbone's activations in the backward pass.
        reference_group: the no-persona group for the breakage metric (None: no breakage metric).
        value_coef: c_v, weight of the value loss.
        penalty_coef: λ, weight of the inconsistency penalty.
        truth_coef: weight of the truth term on the states' answer distributions (`trialign.modules.truth`),
            added to each group's loss before aggregation; 0 turns it off.
        truth_groups: whose states the truth term trains: "all", or "reference" (the reference group's only; the
            penalty alone carries the truth to the personas, DESIGN.md "Cross-group states").
        probe_groups: groups a training step probes besides the reference group, drawn per step
            (`trialign.modules.probe_groups`); None probes every group.
        kl_coef: β_KL, weight of the KL to the reference policy.
        context_kl_coef: weight of the language anchor (`trialign.modules.kl.context_kl`) on the probe's contexts.
        context_kl_stride: the anchor reads every `context_kl_stride`-th context position (1: all of them).
        utility_ema: EMA factor of the group utilities across steps.
        detach_value_features: value heads read detached hidden states (the critic does not train the adapters).
        optimizer: a callable `params -> Optimizer` (LightningCLI: class_path/init_args of a torch optimizer);
            None is AdamW(lr=1e-4).
        lr_schedule: "constant", "linear" or "cosine" decay of the learning rate over the fit's steps
            (`trialign.modules.schedules`), stepped every optimizer step.
        warmup_steps: optimizer steps of a linear warm-up before the schedule.
        adapter_dir: where adapters and heads are exported (None: `<trainer.log_dir>/adapter`).
        probe_share_prefix: run each probe context once and its options on its KV cache (off automatically
            where gradient checkpointing disables caching: training steps with `gradient_checkpointing`).
        trunk_memo_gib: memory for the frozen trunk's output on the probe rows seen in training
            (`trialign.trunk_cache.TrunkMemo`): from the second epoch on a state runs the adapted layers only; 0 off.
            Needs `probe_share_prefix` (the shared-context probe is the path that records).
    """

    def __init__(
        self,
        group_names: list[str],
        value: ValueEstimator,
        objective: PolicyObjective,
        aggregator: Aggregator,
        penalty: InconsistencyPenalty,
        model: str = DEFAULT_MODEL,
        lora: LoraSettings | None = None,
        dtype: str = "float32",
        autocast: bool | None = False,
        per_group_adapters: bool = False,
        gradient_checkpointing: bool = False,
        reference_group: str | None = None,
        value_coef: float = 0.5,
        penalty_coef: float = 1.0,
        truth_coef: float = 0.0,
        truth_groups: str = "all",
        probe_groups: int | None = None,
        kl_coef: float = 0.05,
        context_kl_coef: float = 0.0,
        context_kl_stride: int = 4,
        utility_ema: float = 0.9,
        detach_value_features: bool = True,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        adapter_dir: str | None = None,
        probe_share_prefix: bool = True,
        trunk_memo_gib: float = 0.0,
    ):
        super().__init__()
        under_cli = from_cli()  # LightningCLI hands save_hyperparameters the parsed config, not live objects
        # Outside the CLI the components are live objects: keep them out of the checkpoint's hyper-parameters
        # (they are already in its state dict, and pickled objects could not be loaded with weights_only=True).
        self.save_hyperparameters(ignore=None if under_cli else [*COMPONENTS, "optimizer", "lora"])
        lora = lora if lora is not None else LoraSettings()
        if not under_cli:
            self.hparams["lora"] = asdict(lora)
        self.group_names = list(check_group_names(group_names))
        from trialign.groups import GROUP_ID_RULE, is_valid_group_id

        bad_names = [g for g in self.group_names if not is_valid_group_id(g)]
        if bad_names:
            raise TriAlignError(f"model.group_names: group id {bad_names[0]!r} must be {GROUP_ID_RULE} (group ids name "
                                "per-group adapter folders)")
        for name, component, base in (("value", value, ValueEstimator), ("objective", objective, PolicyObjective),
                                      ("aggregator", aggregator, Aggregator),
                                      ("penalty", penalty, InconsistencyPenalty)):
            if not isinstance(component, base):
                raise TriAlignError(f"model.{name}: expected a {base.__name__}, got {type(component).__name__}")
        for name, coef in (("value_coef", value_coef), ("penalty_coef", penalty_coef), ("truth_coef", truth_coef),
                           ("kl_coef", kl_coef), ("context_kl_coef", context_kl_coef)):
            if not (math.isfinite(coef) and coef >= 0):
                raise TriAlignError(f"model.{name}: expected a finite value >= 0, got {coef}")
        if reference_group is not None and reference_group not in self.group_names:
            raise TriAlignError(f"model.reference_group: '{reference_group}' is not one of the data's groups "
                                f"{self.group_names}")
        if isinstance(context_kl_stride, bool) or not isinstance(context_kl_stride, int) or context_kl_stride < 1:
            raise TriAlignError(f"model.context_kl_stride: expected an integer >= 1, got {context_kl_stride!r}")
        if truth_groups not in TRUTH_GROUPS:
            raise TriAlignError(f"model.truth_groups: expected one of {list(TRUTH_GROUPS)}, got {truth_groups!r}")
        if truth_groups == "reference" and reference_group is None:
            raise TriAlignError("model.truth_groups: 'reference' needs model.reference_group")
        if probe_groups is not None and not (type(probe_groups) is int and probe_groups >= 1 and reference_group):
            raise TriAlignError(f"model.probe_groups: expected null or an integer >= 1 (with model.reference_group), "
                                f"got {probe_groups!r}")
        for part in penalty.modules():  # a penalty anchored to the reference group needs to know where it is
            if isinstance(part, AnchoredToReference):
                if reference_group is None:
                    raise TriAlignError("model.penalty: AnchoredToReference needs model.reference_group")
                part.reference_index = self.group_names.index(reference_group)
        self.value = value
        self.objective = objective
        self.aggregator = aggregator
        self.penalty = penalty
        self.value_coef = value_coef
        self.penalty_coef = penalty_coef
        self.truth_coef = truth_coef
        self.truth_groups = truth_groups
        self.probe_groups = probe_groups
        self.kl_coef = kl_coef
        self.context_kl_coef = context_kl_coef
        self.context_kl_stride = context_kl_stride
        self.last_loss_parts: dict[str, Tensor] | None = None
        """The last training step's loss terms, detached (the divergence guard reads them)."""
        self.detach_value_features = detach_value_features
        self.per_group_adapters = per_group_adapters
        self.reference_group = reference_group
        self.optimizer_factory = optimizer
        check_schedule(lr_schedule, warmup_steps)
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.adapter_dir = adapter_dir
        self.probe_share_prefix = probe_share_prefix
        if trunk_memo_gib < 0:
            raise TriAlignError(f"trunk_memo_gib: expected 0 (off) or more GiB, got {trunk_memo_gib}")
        self.trunk_memo_gib = trunk_memo_gib
        self.autocast = autocast
        self.policy = Policy(model, lora, self.group_names if per_group_adapters else [SHARED_ADAPTER], dtype=dtype,
                             gradient_checkpointing=gradient_checkpointing)
        self.value_heads: GroupValueHeads | None = None
        self.utility = GroupUtility(self.group_names, ema=utility_ema)
        self.val_metrics = self._validation_metrics()
        # A metric, not a logged per-batch mean: ranks may hold different numbers of items, and summing (penalty x
        # items, items) across ranks gives the mean over all items that one process computes.
        self.val_penalty = MeanMetric()
        self.last_validated_step: int | None = None
        """Global step of the last completed validation or test pass (None before any)."""
        # The frozen base weights are not saved in checkpoints (see on_save_checkpoint).
        self.strict_loading = False

    # --- setup ---------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the backbone, attach the adapters and create the value heads (once)."""
        if self.policy.built:
            return
        self.policy.build()
        self.policy.enable_trunk_memo(int(self.trunk_memo_gib * (1 << 30)))
        self.value_heads = GroupValueHeads(self.group_names, self.policy.hidden_size)

    def _validation_metrics(self) -> MetricCollection:
        reference = self.reference_group if len(self.group_names) > 1 else None
        return audit_metrics(self.group_names, reference, probe_only=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters (all of them, also with per-group adapters) and the value heads."""
        if self.value_heads is None:
            raise RuntimeError("configure_model() must run before the parameters are requested")
        return self.policy.adapter_parameters() + list(self.value_heads.parameters())

    def configure_optimizers(self):
        parameters = self.trainable_parameters()
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(parameters)
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return optimizer
        total = total_fit_steps(self.trainer, self.warmup_steps)
        schedule, warmup = self.lr_schedule, self.warmup_steps
        # A closure, so that LambdaLR's state dict (in every checkpoint) holds only its step count.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, schedule, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clipping by norm under FSDP: Lightning's FSDP precision plugin refuses it (each rank holds a shard of the
        gradients), so the root FSDP module's `clip_grad_norm_` clips by the norm over all shards. Found by the first
        FSDP fit on a GPU (benchmarks/gpu_scale.py); every other strategy clips as Lightning does."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) and gradient_clip_algorithm in (None, "norm"):
            if gradient_clip_val:
                strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- forwards ------------------------------------------------------------------------------------------------

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor, row_groups: Tensor, keep_trunk: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """Last hidden states [R, L, H] of the current policy, and the trunk the reference can start from (see
        `Policy.hidden_states_and_trunk`); with per-group adapters, the rows of group g go through adapter g (only
        the adapters of the groups present get gradient)."""
        if not self.per_group_adapters:
            return self.policy.hidden_states_and_trunk(input_ids, attention_mask, keep_trunk)
        hidden: Tensor | None = None
        trunk: Tensor | None = None
        for group in torch.unique(row_groups).tolist():
            rows = (row_groups == group).nonzero().squeeze(1)
            self.policy.use_adapter(self.group_names[group])
            part, part_trunk = self.policy.hidden_states_and_trunk(input_ids[rows], attention_mask[rows], keep_trunk)
            if hidden is None:
                hidden = part.new_zeros(input_ids.shape[0], *part.shape[1:])
            hidden = hidden.index_copy(0, rows, part)
            if part_trunk is not None:
                trunk = part_trunk.new_zeros(hidden.shape) if trunk is None else trunk
                trunk = trunk.index_copy(0, rows, part_trunk)
        if hidden is None:
            raise ValueError("expected at least one row")
        return hidden, trunk

    def _selected_logprobs(self, hidden: Tensor, input_ids: Tensor, select: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log π of the tokens where `select` [R, L] is True (each predicted from the position before).

        Returns (row, position, logprob), each [M]."""
        rows, positions = select[:, 1:].nonzero(as_tuple=True)
        positions = positions + 1
        logprobs = self.policy.token_logprobs(hidden[rows, positions - 1], input_ids[rows, positions])
        return rows, positions, logprobs

    def _episode_forward(self, batch: dict[str, Any], reference: bool = False, trunk: Tensor | None = None,
                         keep_trunk: bool = False) -> dict[str, Tensor]:
        """Per-turn summed action log-probabilities [N, T], their token counts, the per-token log-probabilities [M]
        and (policy forward only) the values [N, T] and, with `keep_trunk`, the trunk for the reference forward.
        The reference forward (`reference=True`) starts from `trunk` when given."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        action_turn = batch["action_turn"]
        num_rows, num_turns = batch["turn_mask"].shape
        if reference:
            hidden = self.policy.reference_hidden_states(input_ids, attention_mask, trunk)
        else:
            hidden, trunk = self._hidden(input_ids, attention_mask, batch["group_index"], keep_trunk)
        rows, positions, token_logprobs = self._selected_logprobs(hidden, input_ids, action_turn > 0)
        turns = action_turn[rows, positions] - 1
        logp = token_logprobs.new_zeros(num_rows, num_turns).index_put((rows, turns), token_logprobs, accumulate=True)
        counts = torch.zeros(num_rows, num_turns, dtype=torch.long, device=input_ids.device)
        counts = counts.index_put((rows, turns), torch.ones_like(turns), accumulate=True)
        out = {"logp": logp, "counts": counts, "token_logprobs": token_logprobs}
        if not reference:
            out["trunk"] = trunk
            state_end = batch["state_end"].clamp(0, input_ids.shape[1] - 1)
            features = hidden[torch.arange(num_rows, device=hidden.device)[:, None], state_end]  # [N, T, H]
            if self.detach_value_features:
                features = features.detach()
            group_per_turn = batch["group_index"][:, None].expand(num_rows, num_turns).reshape(-1)
            values = self.value_heads(features.reshape(num_rows * num_turns, -1), group_per_turn)
            out["values"] = values.view(num_rows, num_turns)
        return out

    def probe_logprobs(self, batch: dict[str, Any], groups: list[int] | None = None, keep_contexts: bool = False
                       ) -> dict[str, Any]:
        """The answer probe under every group's persona (or only `groups`), as the penalty wants it
        (`Policy.probe_logprobs`)."""
        share = self.probe_share_prefix and not (self.policy.gradient_checkpointing and self.training
                                                 and torch.is_grad_enabled())
        return self.policy.probe_logprobs(batch, self.group_names, share_prefix=share, groups=groups,
                                          keep_contexts=keep_contexts)

    @torch.no_grad()
    def reference_anchor(self, batch: dict[str, Any]) -> Tensor | None:
        """The reference group's option log-likelihoods [B, O] under the reference model (adapters disabled), for a
        penalty anchored to it (`penalty.needs_anchor`); None for other penalties. Items where the reference group
        was not probed hold 0 (the penalty does not count them)."""
        if not self.penalty.needs_anchor:
            return None
        reference = self._reference_index()
        with self.policy.reference():
            probe = self.policy.probe_logprobs(batch, self.group_names, share_prefix=self.probe_share_prefix,
                                               groups=[reference])
        return probe["option_logprobs"][:, reference]

    def _penalty(self, probe: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        """The inconsistency penalty of a probe; `anchor` only for penalties that ask for it (a custom penalty may
        keep the five-argument forward)."""
        anchor = self.reference_anchor(batch)
        return self.penalty(probe["option_logprobs"], batch["option_mask"], probe["gold_logprob"], probe["group_mask"],
                            batch["has_options"], **({} if anchor is None else {"anchor": anchor}))

    # --- training ------------------------------------------------------------------------------------------------

    def _penalty_on(self) -> bool:
        return self.penalty_coef > 0 and not isinstance(self.penalty, NoPenalty)

    def _needs_probe(self) -> bool:
        return self._penalty_on() or self.truth_coef > 0

    def _reference_index(self) -> int:
        return self.group_names.index(self.reference_group)

    def _episode_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-group policy and value losses [G], the groups with episodes [G], this batch's SNIS estimate of the
        episode utilities ([G] means and [G] present) and the KL (steps 1, 2 and 5 of the module docstring)."""
        num_groups = len(self.group_names)
        needs_reference = self.kl_coef > 0 or self.objective.needs_reference
        policy_out = self._episode_forward(batch, keep_trunk=needs_reference)
        logp, counts, values = policy_out["logp"], policy_out["counts"], policy_out["values"]
        group_index = batch["group_index"].long()
        valid = batch["turn_mask"].bool() & (counts > 0)
        rewards = batch["rewards"].to(values.dtype)
        returns = batch["returns"].to(values.dtype)
        reference_out = None
        if needs_reference:
            with torch.no_grad():
                reference_out = self._episode_forward(batch, reference=True, trunk=policy_out["trunk"])

        # Value loss and advantages, group by group (each group has its own critic).
        value_loss_list = [values.new_zeros(())] * num_groups
        advantages = torch.zeros_like(values)
        for group in torch.unique(group_index).tolist():
            rows = group_index == group
            value_loss_list[group], advantages[rows] = self.value(values[rows], rewards[rows], returns[rows],
                                                                  valid[rows])
        value_losses = torch.stack(value_loss_list)

        # Policy loss over the valid samples (one sample = one action a_t).
        num_turns = valid.shape[1]
        sample_group = group_index[:, None].expand_as(valid)[valid]
        sample_item = batch["item_index"].long()[:, None].expand_as(valid)[valid]
        sample_turn = torch.arange(num_turns, device=valid.device)[None, :].expand_as(valid)[valid]
        pool = sample_item * num_groups + sample_group
        if self.objective.needs_pairs:
            pool = pool * num_turns + sample_turn
        sample_loss, sample_weight = self.objective(
            logp[valid], counts[valid], advantages[valid], pool=pool,
            ref_logp_sum=None if reference_out is None else reference_out["logp"][valid])
        weight_sum = sample_loss.new_zeros(num_groups).index_add(0, sample_group, sample_weight)
        weighted = sample_loss.new_zeros(num_groups).index_add(0, sample_group, sample_weight * sample_loss)
        policy_losses = torch.where(weight_sum > 0, weighted / weight_sum.clamp(min=1e-12), weighted * 0)
        present = torch.bincount(sample_group, minlength=num_groups) > 0
        episode_utility = snis_group_means(batch["rewards"][valid].float(), logp[valid].detach() -
                                           batch["behavior_logprob"][valid].float(), sample_group, num_groups)
        kl = policy_losses.new_zeros(())
        if self.kl_coef > 0:
            mask = torch.ones_like(policy_out["token_logprobs"], dtype=torch.bool)
            kl = reference_kl(policy_out["token_logprobs"], reference_out["token_logprobs"], mask)
        return {"policy_loss": policy_losses, "value_loss": value_losses, "present": present,
                "episode_utility": episode_utility, "kl": kl}

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss of a batch and its parts (per-group tensors [G], scalars otherwise).

        A batch holds items with episodes, cross-group states (rows without episodes), or both: the episode terms
        run on the episodes, the penalty and the truth term on every item's state s_0 (states and the first state
        of each episode item alike)."""
        num_groups = len(self.group_names)
        device = batch["option_mask"].device
        estimates = []  # this batch's estimates of U_g: (means [G], present [G]) per kind of data
        if "input_ids" in batch:
            parts = self._episode_losses(batch)
            estimates.append(parts.pop("episode_utility"))
        else:  # states only
            zeros = torch.zeros(num_groups, device=device)
            parts = {"policy_loss": zeros, "value_loss": zeros, "kl": zeros.new_zeros(()),
                     "present": torch.zeros(num_groups, dtype=torch.bool, device=device)}
        truth_losses = torch.zeros(num_groups, device=device)
        penalty = truth_losses.new_zeros(())
        context_kl = truth_losses.new_zeros(())
        if self._needs_probe():
            # Without a penalty, a truth term on the reference group alone needs only that group's probe.
            reference_only = self.truth_groups == "reference" and not self._penalty_on()
            groups = [self._reference_index()] if reference_only else (
                step_groups(num_groups, self._reference_index(), self.probe_groups, self.global_step)
                if self.probe_groups else None)
            probe = self.probe_logprobs(batch, groups=groups, keep_contexts=self.context_kl_coef > 0)
            if self.context_kl_coef > 0:
                context_kl = language_anchor(self.policy, probe["contexts"], self.context_kl_stride)
            penalty = penalty if reference_only else self._penalty(probe, batch)
            answers = (probe["option_logprobs"], batch["option_mask"], batch["correct_options"])
            truth_mask = probe["group_mask"]
            if self.truth_groups == "reference":
                truth_mask = truth_mask & (torch.arange(num_groups, device=device) == self._reference_index())
            truth_losses, with_states = truth_loss(*answers, truth_mask, batch["has_options"])
            estimates.append(expected_truth(*answers, probe["group_mask"], batch["has_options"]))
            if self.truth_coef > 0:
                parts["present"] = parts["present"] | with_states
        # One EMA update per step: where both kinds estimate a group's utility, their mean.
        if estimates:
            counts = sum(present.float() for _, present in estimates)
            means = sum(torch.where(present, m.float(), torch.zeros_like(m.float())) for m, present in estimates)
            parts["utility"] = self.utility.observe(means / counts.clamp(min=1), counts > 0)
        else:
            parts["utility"] = self.utility.utilities()
        group_losses = parts["policy_loss"] + self.value_coef * parts["value_loss"] + self.truth_coef * truth_losses
        if bool(parts["present"].any()):
            weights = self.aggregator(group_losses, parts["utility"], parts["present"])
        else:  # nothing per group to weigh (a batch of states without a truth term)
            weights = torch.zeros_like(parts["utility"])
        aggregated = (weights.to(group_losses.dtype) * group_losses).sum()
        total = (aggregated + self.penalty_coef * penalty + self.kl_coef * parts["kl"]
                 + self.context_kl_coef * context_kl)
        if not total.requires_grad:  # no term reached the weights: a zero loss that still has a gradient
            total = total + sum(p.sum() * 0 for p in self.trainable_parameters())
        parts.update(truth_loss=truth_losses, group_loss=group_losses, weight=weights, penalty=penalty,
                     context_kl=context_kl, loss=total)
        return total, parts

    def configure_callbacks(self):
        """The divergence guard (`trialign.modules.divergence`), on every trainer that fits this module."""
        from trialign.modules.divergence import DivergenceGuard

        return [DivergenceGuard()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.autocast is None:  # resolved on the device the steps run on, and logged once
            self.autocast = native_bf16(self.device)
            log.info("training under bf16 autocast: %s (native bf16 on %s)", self.autocast, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.autocast)):
            total, parts = self.compute_loss(batch)
        self.last_loss_parts = {k: v.detach() for k, v in parts.items()}  # what the divergence guard checks
        batch_size = int(batch["option_mask"].shape[0])
        logged: dict[str, Tensor] = {"train/loss": total.detach(), "train/penalty": parts["penalty"].detach(),
                                     "train/kl": parts["kl"].detach(), "train/context_kl": parts["context_kl"].detach(),
                                     "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"])}
        for index, group in enumerate(self.group_names):
            logged[f"train/utility/{group}"] = parts["utility"][index]
            logged[f"train/weight/{group}"] = parts["weight"][index]
            if bool(parts["present"][index]):
                for name, key in PER_GROUP_LOSSES:
                    logged[f"train/{name}/{group}"] = parts[key][index].detach()
        self.log_dict({k: v.float() for k, v in logged.items()}, on_step=True, on_epoch=False, prog_bar=False,
                      batch_size=batch_size)
        self.log("loss", total.detach().float(), prog_bar=True, logger=False, batch_size=batch_size)
        return total

    # --- validation ----------------------------------------------------------------------------------------------

    def probe_answers(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Answers of the probe on the batch's option items that every group was probed on.

        Returns answers [B', G] (option index, argmax of the summed log-likelihood; first on ties), correct
        [B', G] bool, items [B'] (their batch positions) and the probe tensors."""
        probe = self.probe_logprobs(batch)
        option_mask = batch["option_mask"].bool()
        scores = probe["option_logprobs"].masked_fill(~option_mask[:, None, :], -torch.inf)
        answers = scores.argmax(-1)  # [B, G]
        correct = batch["correct_options"].bool().gather(1, answers)
        keep = batch["has_options"].bool() & probe["group_mask"].all(-1)
        items = keep.nonzero().squeeze(1)
        return {"answers": answers[items], "correct": correct[items], "items": items, **probe}

    def _evaluation_step(self, batch: dict[str, Any], prefix: str) -> None:
        read = self.probe_answers(batch)
        if read["items"].numel():
            self.val_metrics.update(answers=read["answers"], correct=read["correct"])
        penalty = self._penalty(read, batch)
        self.val_penalty.update(penalty.detach().float(), weight=int(batch["option_mask"].shape[0]))

    def _start_evaluation(self) -> None:
        # `trainer.validate` runs in inference mode, the validation inside `fit` does not: states created in one
        # (inference tensors) could not be updated in place in the other, so they are always created outside it.
        with torch.inference_mode(False):
            self.val_metrics.reset()
            self.val_penalty.reset()

    def _end_evaluation(self, prefix: str) -> None:
        results = flatten_results(self.val_metrics.compute(), self.group_names)
        results["penalty"] = self.val_penalty.compute()
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self.last_validated_step = self.global_step
        # compute() has already summed the states across ranks, so every rank holds the same values.
        self.log_dict({f"{prefix}/{name}": float(value) for name, value in results.items()}, sync_dist=False,
                      rank_zero_only=False)

    on_validation_epoch_start = on_test_epoch_start = _start_evaluation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    # --- checkpoints and export -----------------------------------------------------------------------------------

    def _frozen_keys(self) -> set[str]:
        prefix = "policy.model."
        # remove_duplicate=False: a tied output head (lm_head = embed_tokens) is frozen too and must not be saved.
        return {f"{prefix}{name}" for name, p in self.policy.model.named_parameters(remove_duplicate=False)
                if not p.requires_grad} if self.policy.built else set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        # From the checkpoint's state dict, not the live module: under FSDP that is the gathered full one.
        self.export_adapters(state_dict=checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        check_trainable_keys(checkpoint.get("state_dict", {}), set(self.state_dict()) - self._frozen_keys(), path)

    def on_train_end(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            return  # the live parameters are shards; the last checkpoint has exported the full adapters
        self.export_adapters()

    def export_directory(self) -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        trainer = self._trainer
        base = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
        return Path(base) / "adapter"

    def export_adapters(self, directory: str | os.PathLike | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> Path | None:
        """Write the adapters (peft `save_pretrained`, safetensors) and `value_heads.safetensors` to `directory`
        (default `export_directory()`), atomically: into a temporary folder that then replaces the old one.

        The weights come from `state_dict` (this module's keys, e.g. a checkpoint's) when given, else from the
        module itself. Runs on global rank 0 only; returns the folder (None on other ranks)."""

        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        if not self.policy.built or self.value_heads is None:
            return None
        adapter_state, head_state = ((None, self.value_heads.state_dict()) if state_dict is None
                                     else split_module_state(state_dict))
        target = Path(directory) if directory is not None else self.export_directory()
        return write_adapter_folder(target, self.policy, head_state, self.group_names, adapter_state)


__all__ = ["TriAlignModule"]
