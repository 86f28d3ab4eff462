"""`efflm export`: the quantised weights of a trained run, with their scales.

The file is a numpy `.npz` (no pickled objects): for each hooked matmul of
model.quant.targets (routed experts are not: they stay float32 parameters, quantised
again when loaded) its quantised weights (`quantized/<module path>/weight`: int8 as
int8, ternary packed four 2-bit codes per byte, fp8 as its bytes, mxfp4 two E2M1 codes
per byte) and `scale` (float32; mxfp4's E8M0, one byte per block of 32); every other
parameter in float32 under
`params/<path>`; and `meta`, a JSON string with the format, the shapes and the config.
`load_export` rebuilds the variables whose forward pass is the quantised one.
"""

from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from efflm.config import config_from_dict, to_dict
from efflm.errors import EfflmError
from efflm.layers.quant import QUANT
from efflm.layers.quant.matmul import QUANTIZED


def _latent_kernel(path: tuple[str, ...], tie_embeddings: bool):
    """The parameter a hooked matmul's exported weight replaces (None: the tied head)."""
    if path[-1] == "head_matmul":
        return None if tie_embeddings else ("head",)
    return (*path[:-1], "kernel")  # Dense/<name>/matmul -> Dense/<name>/kernel


def export_quantized(program, state, out: str) -> dict:
    """Write the export of `state` to `out` (atomically); returns its size report."""
    cfg = program.cfg
    kind = cfg.model.quant.kind
    fmt = QUANT[kind]
    if fmt is None:
        formats = " or ".join(k for k, f in QUANT.items() if f is not None)
        raise EfflmError(f"model.quant.kind={kind}: there are no quantised weights to "
                         f"export; train with model.quant.kind={formats}")
    if cfg.model.scan_layers:
        raise EfflmError("export does not support model.scan_layers=true yet")
    dummy = jnp.zeros((1, 8), jnp.int32)
    with program.context():
        _, captured = jax.jit(lambda v: program.model.apply(v, dummy, mutable=[QUANTIZED]))(
            state.variables())
    # Routed experts are not hooked matmuls: with only `experts` targeted, none is.
    quantized = flax.traverse_util.flatten_dict(jax.device_get(captured.get(QUANTIZED, {})))
    params = flax.traverse_util.flatten_dict(jax.device_get(state.params))
    arrays, replaced, shapes = {}, {}, {}
    quant_bytes = target_elements = 0
    for path, value in quantized.items():
        value = np.asarray(value)
        name = "/".join(path)
        if path[-1] == "weight":
            shapes[name] = list(value.shape)
            target_elements += value.size
            value = np.asarray(fmt.pack(jnp.asarray(value)))
            kernel = _latent_kernel(path[:-1], cfg.model.tie_embeddings)
            # The latent kernel and the matmul's own parameters (qat's step sizes and
            # zero points, which the scale holds).
            for p in [kernel, *(p for p in params if p[:len(path) - 1] == path[:-1])]:
                if p is not None:
                    replaced["/".join(p)] = list(params[p].shape)
        elif path[-1] == "scale":
            value = np.asarray(fmt.pack_scale(jnp.asarray(value)))
        arrays[f"{QUANTIZED}/{name}"] = value
        quant_bytes += value.nbytes
    float_bytes = 0
    for path, value in params.items():
        name = "/".join(path)
        if name not in replaced:
            arrays[f"params/{name}"] = np.asarray(value, np.float32)
            float_bytes += arrays[f"params/{name}"].nbytes
    meta = {"kind": kind, "weight_shapes": shapes, "replaced_params": replaced,
            "config": to_dict(cfg)}
    arrays["meta"] = np.asarray(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    num_params = sum(np.size(v) for v in params.values())
    # quantized_bytes (integer weights and scales) against the same weights in bf16;
    # file_bytes (everything, other parameters in float32) against all of them in bf16.
    return {"path": out, "kind": kind, "quantized_bytes": int(quant_bytes),
            "quantized_as_bf16_bytes": int(2 * target_elements),
            "float_bytes": int(float_bytes), "file_bytes": os.path.getsize(out),
            "bf16_bytes": int(2 * num_params),
            "ratio_vs_bf16": os.path.getsize(out) / (2 * num_params)}


def load_export(path: str):
    """(Config, variables) of an export: `LM(cfg.model).apply(variables, tokens)` runs
    the quantised forward pass from the exported integer weights."""
    if not os.path.isfile(path):
        raise EfflmError(f"export {path!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        cfg = config_from_dict(meta["config"])
        params, quantized = {}, {}
        for key in data.files:
            if key.startswith("params/"):
                params[tuple(key[7:].split("/"))] = data[key]
            elif key.startswith(f"{QUANTIZED}/"):
                name = key[len(QUANTIZED) + 1:]
                value = data[key]
                fmt = QUANT[meta["kind"]]
                if name in meta["weight_shapes"]:
                    value = np.asarray(fmt.unpack(
                        jnp.asarray(value), tuple(meta["weight_shapes"][name])))
                elif name.endswith("/scale"):
                    value = np.asarray(fmt.unpack_scale(jnp.asarray(value)))
                quantized[tuple(name.split("/"))] = value
    # The latent kernels the integer weights replace are never read: zeros of their shape.
    for name, shape in meta["replaced_params"].items():
        params[tuple(name.split("/"))] = np.zeros(shape, np.float32)
    variables = {"params": flax.traverse_util.unflatten_dict(params),
                 QUANTIZED: flax.traverse_util.unflatten_dict(quantized)}
    return cfg, variables
