"""Checks of a Config's values: ranges and choices of the shared settings; each kind
the config uses checks its own (`validate_config` and, for layer kinds, the plan:
`efflm.layers.plan.validate_kinds`)."""

from efflm.data import SOURCES, TOKENIZERS
from efflm.data.sources import mixture_parts
from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.attention.context_parallel import STRATEGIES as CONTEXT_PARALLEL
from efflm.layers.plan import quant_targets, validate_kinds
from efflm.layers.quant import QUANT
from efflm.layers.quant.nm import parse_nm
from efflm.shapes import head_dim
from efflm.train.optim import OPTIMIZERS, SCHEDULES

from .schema import Config, ModelConfig, QuantShared

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def validate(cfg: Config) -> None:
    """Check ranges and registry choices; raise ConfigError naming the key."""
    m, a = cfg.model, cfg.model.attention
    check_choice("model.attention.impl", a.impl, ("auto", "xla", "pallas"))
    check_choice("model.attention.context_parallel", a.context_parallel, CONTEXT_PARALLEL)
    check_positive("model.mlp.every", m.mlp.every)
    check_positive("model.mlp.first_dense", m.mlp.first_dense, allow_zero=True)
    validate_kinds(m)  # each kind the model uses checks its own settings, then the plan
    check_choice("model.dtype", m.dtype, DTYPES)
    check_choice("model.param_dtype", m.param_dtype, DTYPES)
    check_choice("model.remat", m.remat, REMAT_POLICIES)
    check_choice("data.source", cfg.data.source, SOURCES)
    check_choice("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    check_choice("train.loss_impl", cfg.train.loss_impl, ("auto", "naive", "xla", "pallas"))
    check_choice("train.trainable", cfg.train.trainable, ("all", "quant_scales"))
    fmt = QUANT.get(m.quant.kind)
    if cfg.train.trainable == "quant_scales" and (fmt is None or not fmt.scale_params):
        learned = ", ".join(k for k, f in QUANT.items() if f is not None and f.scale_params)
        raise ConfigError(f"train.trainable=quant_scales trains learned quantisation step "
                          f"sizes, and model.quant.kind={m.quant.kind} has none (kinds that "
                          f"have: {learned})")
    check_choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    check_choice("optimizer.schedule", cfg.optimizer.schedule, SCHEDULES)
    for key, value in [
        ("model.d_model", m.d_model), ("model.num_layers", m.num_layers),
        ("model.max_seq_len", m.max_seq_len), ("model.vocab_multiple", m.vocab_multiple),
        ("model.attention.num_heads", a.num_heads), ("model.mlp.d_ff", m.mlp.d_ff),
        ("data.seq_len", cfg.data.seq_len), ("train.steps", cfg.train.steps),
        ("train.batch_size", cfg.train.batch_size), ("train.grad_accum", cfg.train.grad_accum),
        ("train.eval_batches", cfg.train.eval_batches), ("logging.every", cfg.logging.every),
        ("checkpoint.keep", cfg.checkpoint.keep), ("optimizer.lr", cfg.optimizer.lr),
        ("model.attention.rope_theta", a.rope_theta), ("model.norm_eps", m.norm_eps),
        ("model.attention.chunk_size", a.chunk_size),
    ]:
        check_positive(key, value)
    for key, value in [
        ("model.vocab_size", m.vocab_size), ("model.attention.num_kv_heads", a.num_kv_heads),
        ("model.attention.head_dim", a.head_dim),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps),
        ("optimizer.decay_steps", cfg.optimizer.decay_steps),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay),
        ("optimizer.clip_norm", cfg.optimizer.clip_norm), ("train.z_loss", cfg.train.z_loss),
        ("train.eval_every", cfg.train.eval_every), ("checkpoint.every", cfg.checkpoint.every),
        ("model.init_std", m.init_std),
    ]:
        check_positive(key, value, allow_zero=True)
    OPTIMIZERS[cfg.optimizer.name].validate_config(cfg.optimizer)
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
    SOURCES[cfg.data.source].validate_config(cfg.data)
    mixture_parts(cfg.data)  # each source of a mixture checks its own settings
    _validate_quant(m)


QUANT_TARGETS = ("attention", "mlp", "experts", "head")


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
    default = q.targets == QuantShared().targets
    if fmt is not None and fmt.custom_matmul and "experts" in q.targets and not default:
        raise ConfigError(f"model.quant.kind={q.kind} does not cover routed experts (it "
                          "computes each matmul itself, with its own state, parameters or "
                          "gradients); drop experts from model.quant.targets")
    for t in q.targets:  # the defaults apply to the roles the model has
        if t not in present and not default:
            raise ConfigError(f"model.quant.targets entry {t!r} matches no layer of this "
                              "model (its layers of that role do not use the quantised "
                              "matmul); drop it")
    targets = [t for t in q.targets if t in present]
    if not targets:
        raise ConfigError(f"model.quant.targets {q.targets} match no layer of this model; "
                          f"name some of: {', '.join(sorted(present))}")
    shared = m.moe.num_shared_experts * m.moe.expert_d_ff
    widths = {"attention": (m.d_model, m.attention.num_heads * head_dim(m)),
              "mlp": (m.d_model, m.mlp.d_ff, *([shared] if shared else [])),
              "experts": (m.d_model, m.moe.expert_d_ff), "head": (m.d_model,)}
    # (multiple, what, hint): each targeted input width must be a multiple of N:M's M
    # and of the format's block or group.
    rules = [(parse_nm(sp.nm)[1], f"model.sparsity.nm={sp.nm!r}: M={parse_nm(sp.nm)[1]}",
              "; choose M dividing it")] if sp.nm else []
    if fmt is not None:
        rules.append((*fmt.input_multiple(m), ""))
    for t in targets:
        for width in widths[t]:
            for multiple, what, hint in rules:
                if width % multiple:
                    raise ConfigError(f"{what} does not divide the input width {width} of "
                                      f"the {t} matmuls{hint}")


def vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    if cfg.vocab_size:
        if cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the "
                              f"data's vocabulary ({tokenizer_vocab} token ids)")
        return cfg.vocab_size
    k = cfg.vocab_multiple
    return -(-tokenizer_vocab // k) * k
