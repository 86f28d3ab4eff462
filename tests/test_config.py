import pytest

from efflm.cli import main
from efflm.config import load_config, preset_names
from efflm.errors import ConfigError


def test_presets_load_and_extend():
    assert {"tiny", "small"} <= set(preset_names())
    tiny = load_config("tiny")
    assert (tiny.model.d_model, tiny.model.num_layers, tiny.model.attention.num_heads,
            tiny.model.mlp.d_ff, tiny.data.seq_len, tiny.train.batch_size) == (
        256, 4, 4, 1024, 256, 16)
    assert tiny.model.vocab_size == 264  # 256 bytes + 3 specials, rounded up to 8
    small = load_config("small")
    assert small.model.d_model == 768 and small.name == "small"
    assert small.data.source == tiny.data.source  # inherited through `extends`


def test_overrides_are_typed():
    cfg = load_config("tiny", ["model.attention.kind=softmax", "train.steps=7",
                               "optimizer.lr=3e-4", "model.tie_embeddings=false",
                               "data.files.val_paths=a.txt,b.txt"])
    assert cfg.train.steps == 7 and cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.tie_embeddings is False
    assert cfg.data.files.val_paths == ["a.txt", "b.txt"]
    cfg = load_config("tiny", ["data.files.paths=[x.txt,y.jsonl]", "data.source=files"])
    assert cfg.data.files.paths == ["x.txt", "y.jsonl"]


@pytest.mark.parametrize("override, words", [
    ("model.d_modle=3", ["unknown config key", "model.d_modle", "d_model"]),
    ("train.stepz=3", ["unknown config key", "did you mean 'steps'"]),
    ("train.steps=abc", ["train.steps", "abc"]),
    ("model.attention.kind=softmaxx", ["softmaxx", "choose one of", "softmax"]),
    ("model.mlp.kind=mo", ["model.mlp.kind", "did you mean 'moe'", "swiglu"]),
    ("data.seq_len=4096", ["larger than the model supports", "max_seq_len"]),
    ("train.batch_size=0", ["train.batch_size", "> 0"]),
    ("mesh.data=-1", []),
    ("model.d_model=28", ["model.d_model / model.attention.num_heads = 7 is odd", "even"]),
    ("optimizer.adamw.b2=1.0", ["optimizer.adamw.b2", "[0, 1)"]),
    ("optimizer.adamw.eps=inf", ["optimizer.adamw.eps must be a finite number"]),
    ("optimizer.decay_steps=-1", ["optimizer.decay_steps", ">= 0"]),
    ("steps", ["key=value"]),
    ("model.attention.gla.gate_rnk=4", ["unknown config key", "did you mean 'gate_rank'"]),
    ("model.attention.gate_rank=4", ["model.attention.gate_rank is now "
                                     "model.attention.gla.gate_rank"]),
    ("data.paths=a.txt", ["data.paths is now data.files.paths"]),
    ("model.attention.pattern=,", ["model.attention.pattern", "empty entry"]),
    ("model.attention.pattern=gla,,softmax", ["empty entry"]),
])
def test_bad_overrides_name_the_key(override, words):
    if not words:
        load_config("tiny", [override])  # valid: -1 is allowed once
        return
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    for w in words:
        assert w in str(e.value)


def test_two_flexible_mesh_axes_rejected():
    with pytest.raises(ConfigError, match="at most one mesh axis"):
        load_config("tiny", ["mesh.data=-1", "mesh.fsdp=-1"])


def test_misspelled_preset():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_config_show_cli(capsys):
    assert main(["config", "show", "--config", "tiny", "model.d_model=128"]) == 0
    out = capsys.readouterr().out
    assert "d_model: 128" in out and "kind: softmax" in out
    # The shared settings, and only the own settings of the kinds in use.
    assert "block_size: 128" in out and "gate_rank" not in out and "relu:" not in out
    assert "adamw:" in out and "files:" not in out
    assert main(["config", "show", "--config", "tiny_moe", "model.moe.router=relu",
                 "model.attention.pattern=gla,softmax", "model.moe.relu.l1=0.5"]) == 0
    out = capsys.readouterr().out
    assert "gate_rank: 16" in out and "l1: 0.5" in out and "seq_balance_loss" not in out


def test_kind_settings_sit_beside_their_kinds():
    from efflm.config import FAMILIES
    from efflm.layers.attention.gla import GLASettings

    cfg = load_config("tiny", ["model.attention.kind=gla", "model.attention.gla.gate_rank=8"])
    assert isinstance(cfg.model.attention.gla, GLASettings)
    assert cfg.model.attention.gla.gate_rank == 8 and cfg.model.attention.num_heads == 4
    # Every registered kind with settings has its section, named as the kind.
    for family in FAMILIES:
        section = family.section(cfg)
        for kind, cls in family.kinds().items():
            assert hasattr(section, kind) == (cls.settings is not None), (family.path, kind)


def test_a_setting_of_an_unused_kind_is_a_warning(caplog):
    cfg = load_config("tiny", ["model.attention.gla.gate_rank=8"])
    assert cfg.model.attention.gla.gate_rank == 8
    warned = [r.getMessage() for r in caplog.records]
    assert any("model.attention.gla.gate_rank" in w and "does not use" in w for w in warned)
    caplog.clear()
    load_config("tiny", ["model.attention.pattern=gla,softmax",
                         "model.attention.gla.gate_rank=8"])
    assert not caplog.records


def test_a_preset_with_a_moved_key_names_the_new_one(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("extends: tiny\nmodel:\n  depth:\n    kind: mod\n    capacity: 0.25\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.depth.capacity is now model.depth.mod.capacity" in err
    assert err.count("\n") == 1


def test_cli_errors_exit_2(capsys):
    assert main(["config", "show", "--config", "tiny", "model.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efflm: error:") and "model.nope" in err
    assert err.count("\n") == 1


def test_small_preset_is_gpt2_small_sized():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from efflm.models import LM
    from efflm.train.step import count_params

    cfg = load_config("small")
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(LM(cfg.model).init, jax.random.key(0), tokens))
    # GPT-2 small without its 38M-parameter embedding of a 50K vocabulary has 85M.
    assert 80e6 < count_params(params) < 90e6
    assert cfg.model.dtype == "bfloat16" and cfg.model.scan_layers
