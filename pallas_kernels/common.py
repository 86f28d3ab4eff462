"""Small pieces shared by the Pallas kernels."""

import jax.numpy as jnp
from jax import lax


def mm(a, b, trans_a=False, trans_b=False):
    """a @ b (either side transposed) accumulated in float32, in any Pallas backend."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def alias_initial_outputs(args, in_specs, out_specs, initial_outputs):
    """Append `initial_outputs` as inputs aliased to the outputs, so a kernel writes into
    them in place (for tests: filled with NaN, they show every element is written).
    None leaves the call as it is. Returns (args, in_specs, input_output_aliases)."""
    if initial_outputs is None:
        return list(args), list(in_specs), {}
    aliases = {len(args) + n: n for n in range(len(initial_outputs))}
    return [*args, *initial_outputs], [*in_specs, *out_specs], aliases
