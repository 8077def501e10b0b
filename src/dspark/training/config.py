"""The settings of a training run, saved as ``train_config.json`` beside its checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from dspark.drafters.dspark.config import MARKOV_W1_VOCABS, DSparkConfig
from dspark.drafters.families import LAYER_FAMILIES
from dspark.training.loss import DFLASH_WEIGHTS, EAGLE3_WEIGHTS, LossWeights

VARIANTS = ("dspark", "dflash", "eagle3")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as train_config.json)."""

    out_dir: str
    """Checkpoints, logs and the final drafter go here."""
    variant: str = "dspark"
    """"dspark" (Markov + confidence heads, CE+TV+BCE), "dflash" (heads off, CE only) or
    "eagle3" (one layer, chain drafting, soft CE over the γ-step training-time test)."""
    num_layers: int = 2
    """Draft transformer layers (EAGLE-3 has exactly one)."""
    layer_family: str = ""
    """Block family of the draft layers (llama, qwen3, gemma3); "" = the drafter config's
    default (``for_target``: qwen3 for dspark and dflash, the target's own for eagle3).
    Recorded as given, so a resume with another value is refused."""
    block_size: int = 7
    """γ."""
    markov_rank: int = 32
    """r of the Markov head (dspark only)."""
    markov_head_type: str = "vanilla"
    """"vanilla" or "rnn" (dspark only)."""
    markov_w1_vocab: str = "target"
    """Rows of the Markov head's W1 (dspark only): "target" (V) or "draft" (N + 1; needs a
    reduced draft vocabulary), see DSparkConfig.markov_w1_vocab."""
    target_layer_ids: tuple[int, ...] = ()
    """Feature layers; empty = 5 spread over the target's depth."""
    init_from_target: bool = True
    """Warm-start the draft layers from the target's top layers (DSparkModel.init_from_target)."""
    steps: int = 1000
    """Optimizer steps in total."""
    batch_size: int = 4
    """Sequences per step across all ranks (the global batch)."""
    anchors_per_sequence: int = 64
    """N: blocks sampled per sequence; all share one context pass, so dense anchors are cheap."""
    draft_vocab_size: int = 0
    """Tokens the drafter predicts over (the most frequent training targets); 0 = all."""
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss_ce: float = 0.1
    loss_tv: float = 0.9
    loss_conf: float = 1.0
    gamma_w: float = 4.0
    """Position decay γ_w of w_k = exp(-(k-1)/γ_w); 4 as in every DeepSpec config."""
    max_epochs: float = 3.0
    """Refuse runs that would pass over the data more often than this (they memorise)."""
    init_from: str = ""
    """A drafter folder to warm-start from (weights whose names and shapes fit); "" = none."""
    heldout_batches: int = 4
    """Held-out batches scored at each checkpoint (the best τ estimate is kept in best/)."""
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    max_length: int = 1024
    """Training sequences were cut to this many tokens (the loader's; recorded so a resume checks it)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be dspark, dflash or eagle3, got {self.variant!r}")
        if self.variant == "eagle3" and self.num_layers != 1:
            raise ValueError(f"eagle3 drafts with one decoder layer; num_layers must be 1, got {self.num_layers}")
        if self.layer_family and self.layer_family not in LAYER_FAMILIES:
            raise ValueError(f"layer_family must be one of {', '.join(LAYER_FAMILIES)} (or empty), got {self.layer_family!r}")
        if self.markov_w1_vocab not in MARKOV_W1_VOCABS:
            raise ValueError(f"markov_w1_vocab must be {' or '.join(MARKOV_W1_VOCABS)}, got {self.markov_w1_vocab!r}")
        if self.markov_w1_vocab == "draft" and (self.variant != "dspark" or not self.draft_vocab_size):
            raise ValueError("markov_w1_vocab draft needs the dspark variant and a reduced draft vocabulary (draft_vocab_size > 0)")
        for name in ("steps", "batch_size", "anchors_per_sequence", "num_layers", "block_size", "save_every", "log_every",
                     "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.draft_vocab_size < 0 or self.max_epochs <= 0 or self.heldout_batches < 0:
            raise ValueError("draft_vocab_size and heldout_batches must be >= 0, max_epochs > 0")

    @property
    def loss_weights(self) -> LossWeights:
        if self.variant == "dflash":
            return dataclasses.replace(DFLASH_WEIGHTS, gamma_w=self.gamma_w)
        if self.variant == "eagle3":
            return dataclasses.replace(EAGLE3_WEIGHTS, gamma_w=self.gamma_w)
        return LossWeights(ce=self.loss_ce, tv=self.loss_tv, conf=self.loss_conf, gamma_w=self.gamma_w)

    def drafter_config(self, target):
        """The drafter's config for ``target``: a DSparkConfig, or an Eagle3Config for eagle3."""
        overrides = dict(block_size=self.block_size)
        if self.layer_family:
            overrides["layer_family"] = self.layer_family
        if self.draft_vocab_size and self.draft_vocab_size < target.vocab_size:
            overrides["draft_vocab_size"] = self.draft_vocab_size
        if self.target_layer_ids:
            overrides["target_layer_ids"] = tuple(self.target_layer_ids)
        if self.variant == "eagle3":
            from dspark.drafters.eagle3.config import Eagle3Config

            return Eagle3Config.for_target(target, **overrides)
        overrides["num_hidden_layers"] = self.num_layers
        if self.variant == "dflash":
            overrides.update(markov_rank=0, enable_confidence_head=False)
        else:
            overrides.update(markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
                             markov_w1_vocab=self.markov_w1_vocab)
        return DSparkConfig.for_target(target, **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)
