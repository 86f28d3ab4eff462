"""The Config schema: typed sections, assembled from the registries.

A family's section (`model.attention`, `model.mlp`, `model.moe`, `model.depth`,
`model.quant`, `data`, `optimizer`) holds the fields every kind of the family shares,
plus one sub-section per registered kind that declares `settings` (a dataclass in the
kind's own file), named as the kind: `model.attention.gla.gate_rank`. A new kind adds
its sub-section by being registered; this module does not change.
"""

import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from efflm.data import SOURCES, TOKENIZERS
from efflm.layers.attention import ATTENTION
from efflm.layers.depth import DEPTH
from efflm.layers.mlp import MLP
from efflm.layers.moe import ROUTERS
from efflm.layers.moe.experts import MoESettings
from efflm.layers.quant import QUANT
from efflm.train.optim import OPTIMIZERS


def with_kinds(name: str, shared: type, *registries: dict) -> type:
    """The dataclass `shared` plus a field per registered kind with settings, named as
    the kind and holding them."""
    taken = {f.name for f in dataclasses.fields(shared)}
    fields = []
    for registry in registries:
        for kind, cls in sorted(registry.items()):
            own = None if cls is None else cls.settings
            if own is None:
                continue
            if kind in taken:
                raise TypeError(f"{name}: kind {kind!r} clashes with a field of that name")
            taken.add(kind)
            fields.append((kind, own, field(default_factory=own)))
    cls = dataclasses.make_dataclass(name, fields, bases=(shared,))
    cls.__module__ = __name__
    return cls


@dataclass
class AttentionShared:
    kind: str = "softmax"
    # Comma-separated mixer kinds repeated over the depth (e.g. "linear,linear,softmax");
    # empty: `kind` in every layer.
    pattern: str = ""
    impl: str = "auto"  # auto | xla | pallas
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: as many as num_heads (grouped-query when fewer)
    head_dim: int = 0  # 0: d_model // num_heads
    rope_theta: float = 10000.0  # kinds with rotary positions (softmax, based)
    # Linear kinds (linear, gla, based, gated_deltanet): tokens per chunk of the chunked
    # form.
    chunk_size: int = 64
    # Under mesh.sequence > 1: auto | zigzag | ring | ulysses | allgather | halo | allscan
    # (layers/attention/context_parallel.py). auto: the first strategy a kind declares
    # (`Mixer.context_parallel`), else XLA's partitioner.
    context_parallel: str = "auto"


@dataclass
class MLPShared:
    kind: str = "swiglu"
    pattern: str = ""  # comma-separated MLP kinds repeated over the depth; empty: `kind`
    d_ff: int = 1024
    # Where `kind` goes when it is not swiglu (e.g. moe): after the first `first_dense`
    # layers, in every `every`-th layer (layers first_dense + every - 1, + 2 * every - 1,
    # ...); the other layers keep a dense swiglu MLP. Ignored when `pattern` is set.
    every: int = 1
    first_dense: int = 0


@dataclass
class DepthShared:
    kind: str = "none"  # none | recursive | mod


@dataclass
class QuantShared:
    """Number format of the matmuls (`layers/quant/`); parameters stay float32."""

    kind: str = "none"  # none | int8 | ternary | fp8 | mxfp4 | qat (model.quant.<kind>.*)
    # Which matmuls the format (and model.sparsity.nm) applies to: attention, mlp
    # (dense MLPs and shared experts), experts (routed), head. The default applies to
    # those of its entries the model has; a named entry must match a layer.
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp", "experts"])


@dataclass
class DataShared:
    source: str = "pycode"  # pycode | files | tfds | mixture | mqar (settings: data.<source>.*)
    val_fraction: float = 0.02
    tokenizer: str = "byte"
    seq_len: int = 256


@dataclass
class OptimizerShared:
    name: str = "adamw"  # its own settings: optimizer.<name>.*
    lr: float = 1e-3
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant
    # Length of warmup + decay; past it the rate holds its final value. 0: train.steps
    # (a new run saves the resolved value; a resumed run keeps its saved one).
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping


AttentionConfig = with_kinds("AttentionConfig", AttentionShared, ATTENTION)
MLPConfig = with_kinds("MLPConfig", MLPShared, MLP)
MoEConfig = with_kinds("MoEConfig", MoESettings, ROUTERS)
DepthConfig = with_kinds("DepthConfig", DepthShared, DEPTH)
QuantConfig = with_kinds("QuantConfig", QuantShared, QUANT)
DataConfig = with_kinds("DataConfig", DataShared, SOURCES, TOKENIZERS)
OptimizerConfig = with_kinds("OptimizerConfig", OptimizerShared, OPTIMIZERS)


@dataclass
class SparsityConfig:
    """N:M weight sparsity with SR-STE (`layers/quant/nm.py`) on model.quant.targets."""

    nm: str = ""  # e.g. "2:4": keep the 2 largest of every 4 along the input; empty: dense
    # SR-STE lambda: adds decay * (pruned weight) to its gradient, once per microbatch.
    decay: float = 2e-4


@dataclass
class ModelConfig:
    d_model: int = 256
    num_layers: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 0  # 0: the tokenizer's vocabulary rounded up to vocab_multiple
    vocab_multiple: int = 8
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, in sequences
    grad_accum: int = 1
    seed: int = 0
    z_loss: float = 0.0
    # auto | naive | xla | pallas: how the head and cross-entropy are computed.
    # naive: full logits; xla/pallas: blockwise over the vocabulary, never holding
    # (tokens x vocab) logits (efflm.pallas_kernels.fused_cross_entropy).
    # auto: pallas on GPUs (xla when mesh.tensor > 1), naive on CPU.
    loss_impl: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    workdir: str = "runs/default"
    fresh: bool = False  # delete an existing workdir's checkpoints instead of resuming
    # all | quant_scales: what the optimizer updates; quant_scales trains the step sizes
    # of model.quant.kind=qat alone (the rest frozen), e.g. resumed from a run trained
    # in full precision.
    trainable: str = "all"


@dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    sequence: int = 1


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 2
    async_save: bool = True


@dataclass
class LoggingConfig:
    every: int = 10
    progress: bool = True
    tensorboard: bool = True


@dataclass
class DistributedConfig:
    coordinator_address: str = ""  # host:port; empty: from the environment, if any
    num_processes: int = 0
    process_id: int = -1
    heartbeat_timeout_s: int = 60


@dataclass
class Config:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass(frozen=True)
class Family:
    """A section whose kinds come from `registries`; `selectors` are its fields that name
    the kinds in use (a kind, or a comma-separated pattern of them)."""

    path: str
    registries: tuple
    selectors: tuple[str, ...]
    # Setting an unchosen kind's own setting: an error when strict, else a warning (a
    # sweep may share overrides across variants of a model).
    strict: bool = False

    def section(self, cfg):
        for part in self.path.split("."):
            cfg = getattr(cfg, part)
        return cfg

    def kinds(self) -> dict:
        return {k: v for r in self.registries for k, v in r.items() if v is not None}

    def chosen(self, cfg) -> set[str]:
        """The kinds the config's selectors name."""
        section = self.section(cfg)
        return {k.strip() for s in self.selectors for k in getattr(section, s).split(",")
                if k.strip()}


FAMILIES = (
    Family("model.attention", (ATTENTION,), ("kind", "pattern")),
    Family("model.mlp", (MLP,), ("kind", "pattern")),
    Family("model.moe", (ROUTERS,), ("router",)),
    Family("model.depth", (DEPTH,), ("kind",)),
    Family("model.quant", (QUANT,), ("kind",)),
    Family("data", (SOURCES, TOKENIZERS), ("source", "tokenizer")),
    Family("optimizer", (OPTIMIZERS,), ("name",), strict=True),
)

# Keys that describe the parameters' shapes and layout: a workdir's checkpoint only
# fits a run whose values agree on all of them, except RESUMABLE_MODEL_KEYS.
SHAPE_KEYS = ("model", "data.tokenizer")
# model.* keys that change no parameter (only how it is computed): a resume may change
# them, and so may each kind's own `resumable` settings. model.scan_layers is not one:
# it stacks the layers' parameters.
RESUMABLE_MODEL_KEYS = ("model.remat", "model.attention.impl", "model.dtype",
                        "model.max_seq_len", "model.init_std", "model.attention.chunk_size",
                        *(f"{f.path}.{kind}.{name}" for f in FAMILIES
                          for kind, cls in f.kinds().items() for name in cls.resumable))
# Keys that fix the order of the training data: a saved data position needs them.
DATA_ORDER_KEYS = ("data.source", "data.seq_len", "train.batch_size", "train.seed")
