"""Loading a Config: YAML presets, `key=value` overrides, saved configs of workdirs.

Presets live in `configs/NAME.yaml`; a preset may name another with `extends: NAME`.
OmegaConf structured configs (`schema`) check keys and types; `validation` checks the
values. Keys that moved into a kind's own section (`MOVED_KEYS`) are an error in presets
and overrides, naming the new key; a workdir's saved config.yaml is migrated when read
(moved keys go to their new places; a setting whose default changed after it was added,
`EARLIER_DEFAULTS`, is read at its earlier value when the file lacks it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import logging
import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from efflm.data import SOURCES, TOKENIZERS, data_tokenizer
from efflm.errors import ConfigError

from .schema import FAMILIES, Config
from .validation import validate, vocab_size

# Flat keys of earlier versions -> where each setting lives now (its kind's section).
MOVED_KEYS = {
    "model.attention.block_size": "model.attention.softmax.block_size",
    "model.attention.feature_map": "model.attention.linear.feature_map",
    "model.attention.normalize": "model.attention.linear.normalize",
    "model.attention.decay": "model.attention.gla.decay",
    "model.attention.gate_rank": "model.attention.gla.gate_rank",
    "model.attention.gate_temperature": "model.attention.gla.gate_temperature",
    "model.attention.feature_dim": "model.attention.based.feature_dim",
    "model.attention.window": "model.attention.based.window",
    "model.attention.short_conv": "model.attention.gated_deltanet.short_conv",
    "model.attention.conv_width": "model.attention.gated_deltanet.conv_width",
    "model.attention.output_gate": "model.attention.gated_deltanet.output_gate",
    "model.moe.relu_rows_per_token": "model.moe.relu.rows_per_token",
    "model.moe.relu_l1": "model.moe.relu.l1",
    "model.moe.bias_rate": "model.moe.sigmoid_bias.bias_rate",
    "model.moe.seq_balance_loss": "model.moe.sigmoid_bias.seq_balance_loss",
    "model.moe.router_hidden": "model.moe.recurrent.hidden",
    "model.depth.unique_layers": "model.depth.recursive.unique_layers",
    "model.depth.recursions": "model.depth.recursive.recursions",
    "model.depth.sharing": "model.depth.recursive.sharing",
    "model.depth.every": "model.depth.mod.every",
    "model.depth.capacity": "model.depth.mod.capacity",
    "model.depth.predictor_loss": "model.depth.mod.predictor_loss",
    "model.depth.predictor_hidden": "model.depth.mod.predictor_hidden",
    "optimizer.b1": "optimizer.adamw.b1",
    "optimizer.b2": "optimizer.adamw.b2",
    "optimizer.eps": "optimizer.adamw.eps",
    "data.val_paths": "data.files.val_paths",
    "data.paths": "data.files.paths",
}


# Settings whose default changed after they were added (each kind's `earlier_defaults`):
# a saved config written before the setting existed ran with the earlier value.
EARLIER_DEFAULTS = {f"{f.path}.{kind}.{name}": value for f in FAMILIES
                    for kind, cls in f.kinds().items()
                    for name, value in cls.earlier_defaults.items()}


def preset_names() -> list[str]:
    root = importlib.resources.files("efflm.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def moved_keys(d: dict) -> list[tuple[str, str]]:
    """(old key, new key) for each key of the nested dict `d` that has moved."""
    return [(k, MOVED_KEYS[k]) for k in flatten(d) if k in MOVED_KEYS]


def migrate(d: dict, origin: str) -> dict:
    """`d` (a nested config dict that a run saved) with each moved key at its new place,
    saying so once, and each of EARLIER_DEFAULTS it lacks at its earlier value."""
    moved = moved_keys(d)
    keys = flatten(d)
    earlier = [k for k in EARLIER_DEFAULTS if k not in keys]
    if not moved and not earlier:
        return d
    out = OmegaConf.create(d)
    for old, new in moved:
        value = OmegaConf.select(out, old)
        parent, leaf = old.rpartition(".")[::2]
        node = OmegaConf.select(out, parent) if parent else out
        del node[leaf]
        OmegaConf.update(out, new, value, force_add=True)
    for key in earlier:
        OmegaConf.update(out, key, EARLIER_DEFAULTS[key], force_add=True)
    if moved:
        logging.warning("%s uses the keys of an earlier efflm; read with %d keys moved to "
                        "their kinds' sections (e.g. %s -> %s)", origin, len(moved),
                        *moved[0])
    return OmegaConf.to_container(out)


def _read_preset(name_or_path: str, seen: tuple[str, ...] = (),
                 saved: bool = False) -> DictConfig:
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
    moved = moved_keys(OmegaConf.to_container(raw))
    if moved and not saved:
        old, new = moved[0]
        raise ConfigError(f"config {name_or_path!r}: {old} is now {new}; rename it"
                          + (f" (and {len(moved) - 1} more moved keys)" if len(moved) > 1
                             else ""))
    if saved:
        raw = OmegaConf.create(migrate(OmegaConf.to_container(raw), name_or_path))
    base = raw.pop("extends", None)
    if "name" not in raw:
        raw.name = default_name
    if base:
        raw = OmegaConf.merge(_read_preset(str(base), seen + (name_or_path,), saved), raw)
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
    if key in MOVED_KEYS:
        raise ConfigError(f"override {item!r}: {key} is now {MOVED_KEYS[key]}; use "
                          f"{MOVED_KEYS[key]}={value}")
    try:
        target = OmegaConf.select(schema, key, throw_on_missing=False)
    except OmegaConfBaseException:
        target = None
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except Exception as e:  # OmegaConf's and YAML's own parse errors
        if not isinstance(target, str):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot parse override {item!r} ({first}); quote a value "
                              f"with special characters, e.g. {key}='{value}'") from None
        parsed = None
    if isinstance(target, str) and (parsed is None
                                    or not isinstance(OmegaConf.select(parsed, key), str)):
        # A string field keeps the text as typed (YAML would read 2:4 as the integer 124).
        parsed = OmegaConf.from_dotlist([])
        OmegaConf.update(parsed, key, value, force_add=True)
    # A list field accepts a bare value or a comma-separated string.
    if isinstance(target, ListConfig):
        v = OmegaConf.select(parsed, key)
        if not isinstance(v, ListConfig):
            items = [] if v in (None, "") else [s for s in str(v).split(",") if s]
            parsed = OmegaConf.from_dotlist([])
            OmegaConf.update(parsed, key, items, force_add=True)
    return parsed


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (),
                saved: bool = False) -> Config:
    """Resolve a preset plus `key=value` overrides into a validated Config. `saved`: the
    file is a workdir's saved config.yaml, whose moved keys are migrated, not refused."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    try:
        preset = _read_preset(name_or_path, saved=saved)
        cfg = OmegaConf.merge(schema, preset)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, f"config {name_or_path!r}") from None
    for item in overrides:
        try:
            cfg = OmegaConf.merge(cfg, _parse_override(item, schema))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override {item!r}", item.split("=", 1)[0]) from None
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    _warn_unused(obj, keys)
    if SOURCES[obj.data.source].tokenizer(obj.data) is not None and not saved:
        tokenizer_keys = ("data.tokenizer", *(f"data.{t}" for t in TOKENIZERS))
        given = [k for k in keys if k.startswith(tokenizer_keys)] + [
            k for k in tokenizer_keys if OmegaConf.select(preset, k, default=None) is not None]
        if given:
            raise ConfigError(f"{given[0]} does not apply: data.source={obj.data.source} "
                              f"yields token ids; drop the tokenizer setting")
    tokenizer = data_tokenizer(obj.data)
    tokenizer.pin(obj.data)
    obj.model.vocab_size = vocab_size(obj.model, tokenizer.vocab_size)
    return obj


def _warn_unused(cfg: Config, keys: list[str]) -> None:
    """One line for each key that sets a kind's own setting when the config does not use
    that kind: a warning (a sweep shares overrides across its variants), or for a strict
    family (the optimizer) an error."""
    for family in FAMILIES:
        chosen = family.chosen(cfg)
        for key in keys:
            kind = key[len(family.path) + 1:].split(".")[0]
            if (key.startswith(family.path + ".") and kind in family.kinds()
                    and kind not in chosen):
                if family.strict:
                    selector = f"{family.path}.{family.selectors[0]}"
                    raise ConfigError(f"{key} applies to {selector}={kind}; this config "
                                      f"uses {selector}={', '.join(sorted(chosen))}")
                logging.warning("%s sets a setting of %s kind %r, which this config does "
                                "not use (it uses %s)", key, family.path, kind,
                                ", ".join(sorted(chosen)) or "none")


def config_from_dict(d: dict, origin: str = "saved config") -> Config:
    """Rebuild a Config from its `to_dict` form (a workdir's config.yaml), moving the
    keys of an earlier efflm to their new places."""
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.create(migrate(d, origin))))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, "saved config") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config, used_only: bool = False) -> str:
    """The config as YAML; `used_only`: without the own settings of kinds it does not
    use (`efflm config show`)."""
    if not used_only:
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    d = to_dict(cfg)
    for family in FAMILIES:
        section = d
        for part in family.path.split("."):
            section = section[part]
        for kind in set(family.kinds()) - family.chosen(cfg):
            section.pop(kind, None)
    return OmegaConf.to_yaml(OmegaConf.create(d))


