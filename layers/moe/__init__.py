"""Mixture-of-Experts parts: `model.moe.router` -> router class, `model.moe.dispatch`
-> dispatch function. The MoE layer itself is the `moe` entry of `efflm.layers.mlp.MLP`."""

from efflm.layers.moe.dispatch import capacity_dispatch, dropless_dispatch
from efflm.layers.moe.expert_choice import ExpertChoiceRouter
from efflm.layers.moe.recurrent import RecurrentRouter
from efflm.layers.moe.relu_router import ReluRouter
from efflm.layers.moe.routers import TopKRouter
from efflm.layers.moe.sigmoid_bias import SigmoidBiasRouter

ROUTERS = {"topk": TopKRouter, "sigmoid_bias": SigmoidBiasRouter,
           "recurrent": RecurrentRouter, "expert_choice": ExpertChoiceRouter,
           "relu": ReluRouter}
DISPATCH = {"dropless": dropless_dispatch, "capacity": capacity_dispatch}
