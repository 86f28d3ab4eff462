"""The one typed Config: dataclass schema, YAML presets and `key=value` overrides.

Presets live in `configs/NAME.yaml`; a preset may name another with `extends: NAME`.
OmegaConf structured configs check keys and types; `validate` checks ranges, and asks
each kind the model uses to check its own settings (`efflm.layers.plan`).

This module sits above the layers: nothing under `efflm.layers`, `efflm.models`,
`efflm.pallas_kernels` or `efflm.mesh` imports it at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from efflm.data import SOURCES, TOKENIZERS, get_tokenizer
from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.plan import quant_targets, validate_kinds
from efflm.layers.quant import QUANT
from efflm.layers.quant.nm import parse_nm
from efflm.shapes import head_dim, num_kv_heads

__all__ = ["Config", "ModelConfig", "check_choice", "check_positive", "head_dim",
           "load_config", "num_kv_heads", "validate"]


@dataclass
class AttentionConfig:
    kind: str = "softmax"
    # Comma-separated mixer kinds repeated over the depth (e.g. "linear,linear,softmax");
    # empty: `kind` in every layer.
    pattern: str = ""
    impl: str = "auto"  # auto | xla | pallas
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: as many as num_heads (grouped-query when fewer)
    head_dim: int = 0  # 0: d_model // num_heads
    rope_theta: float = 10000.0
    # impl=xla: queries in blocks of this many, each over the keys up to its own block
    # (skips what causality masks); 0: one full masked softmax.
    block_size: int = 128
    # Linear kinds (linear, gla, based, gated_deltanet): tokens per chunk of the chunked
    # form.
    chunk_size: int = 64
    # linear: feature map elu (elu+1) | relu | identity, and whether outputs are divided
    # by phi(q).sum(phi(k)) (refused with identity, where it can be zero or negative).
    feature_map: str = "elu"
    normalize: bool = True
    # gla: data (per-key-dimension gates from x, GLA) | fixed (per-head decay, RetNet).
    decay: str = "data"
    gate_rank: int = 16  # gla: rank of the gate projection
    gate_temperature: float = 16.0  # gla: log gates are logsigmoid(.) / this
    # based: projected feature dim d of the Taylor map (1 + d + d^2 features) and the
    # width of its sliding-window softmax branch, in tokens.
    feature_dim: int = 16
    window: int = 64
    # gated_deltanet: a causal depthwise convolution of conv_width taps, then SiLU, on
    # q, k and v (short_conv=false: SiLU alone); the output gate swish(W_g x) times the
    # per-head RMSNorm of the output (output_gate=false: the norm alone).
    short_conv: bool = True
    conv_width: int = 4
    output_gate: bool = True


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    pattern: str = ""  # comma-separated MLP kinds repeated over the depth; empty: `kind`
    d_ff: int = 1024
    # Where `kind` goes when it is not swiglu (e.g. moe): after the first `first_dense`
    # layers, in every `every`-th layer (layers first_dense + every - 1, + 2 * every - 1,
    # ...); the other layers keep a dense swiglu MLP. Ignored when `pattern` is set.
    every: int = 1
    first_dense: int = 0


@dataclass
class MoEConfig:
    """Mixture-of-Experts (`model.mlp.kind=moe`): SwiGLU experts, a router, a dispatch."""

    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 512  # each expert's hidden width (small: fine-grained experts)
    num_shared_experts: int = 0  # experts every token uses, beside the routed ones
    router: str = "topk"
    renormalize: bool = True  # divide the k gates by their sum
    jitter: float = 0.0  # training only: router input times uniform(1 - jitter, 1 + jitter)
    balance_loss: float = 0.01  # weight of E * sum_i f_i * P_i
    router_z_loss: float = 0.001  # weight of mean(logsumexp(logits)^2)
    # dropless: every (token, expert) pair is computed; capacity: each expert takes at
    # most ceil(capacity_factor * tokens * top_k / num_experts), first choices first.
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    # dropless backend. xla: each expert's rows padded to a multiple of `block_rows` and
    # a loop of matmuls over the row blocks (only useful work plus padding); ragged:
    # jax.lax.ragged_dot (computed densely by XLA:CPU); pallas: the grouped matmul
    # kernel. auto: pallas on GPU, xla elsewhere.
    impl: str = "auto"
    # With mesh.expert > 1 the experts are split over the `expert` mesh axis and tokens
    # are exchanged, inside shard_map. gather_scatter: every device gathers its expert
    # group's tokens, computes its experts' share, and the outputs are reduce-scattered
    # (dropless). all_to_all: the pairs are sent to their experts' devices, at most
    # ceil(ep_capacity_factor * pairs / mesh.expert) to each, the rest dropped and
    # counted. Under expert parallelism the local experts run the dropless dispatch.
    ep_exchange: str = "gather_scatter"
    ep_capacity_factor: float = 2.0
    # 0: the largest power of two (8 to 256) with num_experts * block_rows at most a
    # quarter of the (token, expert) pairs, which bounds the padding to that quarter.
    block_rows: int = 0
    # router=expert_choice ("Mixture-of-Experts with Expert Choice Routing"): each expert
    # takes the min(length, ceil(capacity_factor * length * top_k / num_experts)) tokens
    # of each sequence with the highest softmax affinity for it; dispatch=capacity only.
    # NOT CAUSAL: an expert's choice sees the later tokens of the sequence (and the other
    # documents packed into it), so its eval losses are flagged causal=false and
    # efflm generate refuses the model.
    # router=relu (BlockFFN): gates RMSNorm(ReLU(x W_r)) over the experts, any number of
    # experts per token; dispatch=dropless only. Each sequence computes at most
    # ceil(relu_rows_per_token * length) (token, expert) rows, filled in token order
    # (a token's largest gates first); active pairs beyond that are dropped and counted.
    relu_rows_per_token: float = 2.0
    relu_l1: float = 0.01  # weight of the L1 loss on the RMS-normalised ReLU gates
    # router=sigmoid_bias (auxiliary-loss-free balancing, DeepSeek-V3; it uses neither
    # balance_loss nor router_z_loss): after each step every expert's selection bias
    # moves by bias_rate toward an even load (b += bias_rate * sign(mean load - load));
    # seq_balance_loss weighs the complementary sequence-wise balance loss (0: off).
    bias_rate: float = 0.001
    seq_balance_loss: float = 0.0001
    # router=recurrent (Layerwise Recurrent Router, RMoE): width of the projected router
    # input and of the GRU state carried from one MoE layer to the next.
    router_hidden: int = 64


@dataclass
class DepthConfig:
    kind: str = "none"  # none | recursive | mod
    # recursive: `unique_layers` blocks applied `recursions` times; sharing `cycle`
    # (ABCABC: depth unique * recursions) or `middle_cycle` (first and last unique, the
    # middle unique - 2 cycled: depth 2 + (unique - 2) * recursions). model.num_layers
    # must equal that depth.
    unique_layers: int = 2
    recursions: int = 2
    sharing: str = "cycle"
    # mod (Mixture-of-Depths): every `every`-th layer is routed; the top `capacity`
    # fraction of each sequence's tokens go through it, the rest skip it.
    every: int = 2
    capacity: float = 0.5
    predictor_loss: float = 0.01  # weight of the causal predictor's BCE loss
    predictor_hidden: int = 64


@dataclass
class QuantConfig:
    """Number format of the matmuls (`layers/quant/`); parameters stay float32."""

    kind: str = "none"  # none | int8 | ternary
    # Which matmuls the format (and model.sparsity.nm) applies to: attention, mlp, head.
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])


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
class DataConfig:
    source: str = "pycode"  # pycode | files
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    val_fraction: float = 0.02
    tokenizer: str = "byte"
    seq_len: int = 256


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | linear | constant
    # Length of warmup + decay; past it the rate holds its final value. 0: train.steps
    # (a new run saves the resolved value; a resumed run keeps its saved one).
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping


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


# Keys that describe the parameters' shapes and layout: a workdir's checkpoint only
# fits a run whose values agree on all of them, except RESUMABLE_MODEL_KEYS.
SHAPE_KEYS = ("model", "data.tokenizer")
# model.* keys that change no parameter (only how it is computed): a resume may change
# them. model.scan_layers is not one: it stacks the layers' parameters.
RESUMABLE_MODEL_KEYS = ("model.remat", "model.attention.impl", "model.attention.block_size",
                        "model.dtype", "model.max_seq_len", "model.init_std",
                        "model.attention.chunk_size")
# Keys that fix the order of the training data: a saved data position needs them.
DATA_ORDER_KEYS = ("data.source", "data.seq_len", "train.batch_size", "train.seed")


def preset_names() -> list[str]:
    root = importlib.resources.files("efflm.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> DictConfig:
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        text = open(name_or_path, encoding="utf-8").read()
        default_name = os.path.splitext(os.path.basename(name_or_path))[0]
    else:
        resource = importlib.resources.files("efflm.configs") / f"{name_or_path}.yaml"
        if not resource.is_file():
            names = preset_names()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config preset {name_or_path!r}{hint}; presets: {', '.join(names)}"
            )
        text = resource.read_text(encoding="utf-8")
        default_name = name_or_path
    if name_or_path in seen:
        raise ConfigError(f"config presets extend each other in a loop: {' -> '.join(seen)}")
    try:
        raw = OmegaConf.create(text)
    except Exception as e:  # yaml errors
        raise ConfigError(f"config {name_or_path!r} is not valid YAML: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config {name_or_path!r} must be a mapping of keys to values")
    base = raw.pop("extends", None)
    if "name" not in raw:
        raw.name = default_name
    if base:
        raw = OmegaConf.merge(_read_preset(str(base), seen + (name_or_path,)), raw)
    return raw


def _section_keys(schema: DictConfig, dotted: str) -> list[str]:
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(e: OmegaConfBaseException, schema: DictConfig, origin: str,
             key: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or key
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        keys = _section_keys(schema, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"unknown config key {key!r} in {origin}{hint}; valid keys here: "
                           f"{', '.join(keys)}")
    return ConfigError(f"bad value for {key!r} in {origin}: {msg}")


def _parse_override(item: str, schema: DictConfig) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.steps=200")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse override {item!r}: {e}") from None
    # A list field accepts a bare value or a comma-separated string.
    try:
        target = OmegaConf.select(schema, key, throw_on_missing=False)
    except OmegaConfBaseException:
        target = None
    if isinstance(target, str) and not isinstance(OmegaConf.select(parsed, key), str):
        # A string field keeps the text as typed (YAML would read 2:4 as the integer 124).
        parsed = OmegaConf.from_dotlist([])
        OmegaConf.update(parsed, key, value, force_add=True)
    if isinstance(target, ListConfig):
        v = OmegaConf.select(parsed, key)
        if not isinstance(v, ListConfig):
            items = [] if v in (None, "") else [s for s in str(v).split(",") if s]
            parsed = OmegaConf.from_dotlist([])
            OmegaConf.update(parsed, key, items, force_add=True)
    return parsed


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset plus `key=value` overrides into a validated Config."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    try:
        cfg = OmegaConf.merge(schema, _read_preset(name_or_path))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, f"config {name_or_path!r}") from None
    for item in overrides:
        try:
            cfg = OmegaConf.merge(cfg, _parse_override(item, schema))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override {item!r}", item.split("=", 1)[0]) from None
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    obj.model.vocab_size = vocab_size(obj.model, get_tokenizer(obj.data.tokenizer).vocab_size)
    return obj


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its `to_dict` form (a workdir's config.yaml)."""
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.create(d)))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, "saved config") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def validate(cfg: Config) -> None:
    """Check ranges and registry choices; raise ConfigError naming the key."""
    m, a = cfg.model, cfg.model.attention
    check_choice("model.attention.impl", a.impl, ("auto", "xla", "pallas"))
    check_positive("model.mlp.every", m.mlp.every)
    check_positive("model.mlp.first_dense", m.mlp.first_dense, allow_zero=True)
    validate_kinds(m)  # each kind the model uses checks its own settings, then the plan
    check_choice("model.attention.feature_map", a.feature_map, ("elu", "relu", "identity"))
    check_choice("model.attention.decay", a.decay, ("data", "fixed"))
    check_choice("model.dtype", m.dtype, DTYPES)
    check_choice("model.param_dtype", m.param_dtype, DTYPES)
    check_choice("model.remat", m.remat, REMAT_POLICIES)
    check_choice("data.source", cfg.data.source, SOURCES)
    check_choice("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    check_choice("train.loss_impl", cfg.train.loss_impl, ("auto", "naive", "xla", "pallas"))
    check_choice("optimizer.name", cfg.optimizer.name, ("adamw",))
    check_choice("optimizer.schedule", cfg.optimizer.schedule, ("cosine", "linear", "constant"))
    for key, value in [
        ("model.d_model", m.d_model), ("model.num_layers", m.num_layers),
        ("model.max_seq_len", m.max_seq_len), ("model.vocab_multiple", m.vocab_multiple),
        ("model.attention.num_heads", a.num_heads), ("model.mlp.d_ff", m.mlp.d_ff),
        ("data.seq_len", cfg.data.seq_len), ("train.steps", cfg.train.steps),
        ("train.batch_size", cfg.train.batch_size), ("train.grad_accum", cfg.train.grad_accum),
        ("train.eval_batches", cfg.train.eval_batches), ("logging.every", cfg.logging.every),
        ("checkpoint.keep", cfg.checkpoint.keep), ("optimizer.lr", cfg.optimizer.lr),
        ("model.attention.rope_theta", a.rope_theta), ("model.norm_eps", m.norm_eps),
        ("model.attention.chunk_size", a.chunk_size), ("model.attention.gate_rank", a.gate_rank),
        ("model.attention.gate_temperature", a.gate_temperature),
        ("model.attention.feature_dim", a.feature_dim), ("model.attention.window", a.window),
    ]:
        check_positive(key, value)
    for key, value in [
        ("model.vocab_size", m.vocab_size), ("model.attention.num_kv_heads", a.num_kv_heads),
        ("model.attention.head_dim", a.head_dim),
        ("model.attention.block_size", a.block_size), ("optimizer.warmup_steps",
                                                   cfg.optimizer.warmup_steps),
        ("optimizer.decay_steps", cfg.optimizer.decay_steps),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay),
        ("optimizer.clip_norm", cfg.optimizer.clip_norm), ("train.z_loss", cfg.train.z_loss),
        ("train.eval_every", cfg.train.eval_every), ("checkpoint.every", cfg.checkpoint.every),
        ("model.init_std", m.init_std), ("optimizer.eps", cfg.optimizer.eps),
    ]:
        check_positive(key, value, allow_zero=True)
    for key, value in [("optimizer.b1", cfg.optimizer.b1), ("optimizer.b2", cfg.optimizer.b2)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0.0 <= cfg.optimizer.min_lr_ratio <= 1.0:
        raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got "
                          f"{cfg.optimizer.min_lr_ratio}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if a.head_dim == 0 and m.d_model % a.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by "
                          f"model.attention.num_heads={a.num_heads}; set "
                          "model.attention.head_dim explicitly or change one of them")
    if head_dim(m) % 2:
        where = (f"model.attention.head_dim={a.head_dim}" if a.head_dim else
                 f"model.d_model / model.attention.num_heads = {head_dim(m)}")
        raise ConfigError(f"{where} is odd, but rotary position embeddings rotate pairs of "
                          "dimensions; use an even head dimension")
    kv = a.num_kv_heads or a.num_heads
    if a.num_heads % kv:
        raise ConfigError(f"model.attention.num_heads={a.num_heads} must be a multiple of "
                          f"model.attention.num_kv_heads={kv}")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is larger than the model supports "
                          f"(model.max_seq_len={m.max_seq_len}); lower data.seq_len or raise "
                          "model.max_seq_len")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"train.grad_accum={cfg.train.grad_accum}")
    sizes = {k: getattr(cfg.mesh, k) for k in ("data", "fsdp", "tensor", "expert", "sequence")}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k} must be a positive size or -1 (take the remaining "
                              f"devices), got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("at most one mesh axis may be -1; got -1 for "
                          + ", ".join(f"mesh.{k}" for k, v in sizes.items() if v == -1))
    if cfg.data.source == "files" and not cfg.data.paths:
        raise ConfigError("data.source=files needs data.paths, e.g. "
                          "data.paths=[corpus/a.txt,corpus/b.jsonl]")
    _validate_quant(m)


QUANT_TARGETS = ("attention", "mlp", "head")


def _validate_quant(m: ModelConfig) -> None:
    q, sp = m.quant, m.sparsity
    check_choice("model.quant.kind", q.kind, QUANT)
    for t in q.targets:
        check_choice("model.quant.targets entry", t, QUANT_TARGETS)
    check_positive("model.sparsity.decay", sp.decay, allow_zero=True)
    fmt = QUANT[q.kind]
    if fmt is None and not sp.nm:
        return
    if not q.targets:
        raise ConfigError("model.quant.targets is empty; name at least one of "
                          f"{', '.join(QUANT_TARGETS)}")
    if fmt is not None:
        fmt.validate_config(m)
    present = quant_targets(m)  # a kind routes its matmuls through the hook: its target
    for t in q.targets:
        if t not in present:
            raise ConfigError(f"model.quant.targets entry {t!r} matches no layer of this "
                              "model (its layers of that role do not use the quantised "
                              "matmul); drop it")
    if sp.nm:
        _, group = parse_nm(sp.nm)
        widths = {"attention": (m.d_model, m.attention.num_heads * head_dim(m)),
                  "mlp": (m.d_model, m.mlp.d_ff), "head": (m.d_model,)}
        for t in q.targets:
            for width in widths[t]:
                if width % group:
                    raise ConfigError(f"model.sparsity.nm={sp.nm!r}: M={group} does not "
                                      f"divide the input width {width} of the {t} "
                                      "matmuls; choose M dividing it")


def vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    if cfg.vocab_size:
        if cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({tokenizer_vocab})")
        return cfg.vocab_size
    k = cfg.vocab_multiple
    return -(-tokenizer_vocab // k) * k
