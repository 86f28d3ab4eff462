"""Mixture-of-Experts parts: `model.moe.router` -> router class, `model.moe.dispatch`
-> dispatch function. The MoE layer itself is the `moe` entry of `efflm.layers.mlp.MLP`."""

from efflm.layers.moe.dispatch import DISPATCH
from efflm.layers.moe.expert_choice import ExpertChoiceRouter
from efflm.layers.moe.recurrent import RecurrentRouter
from efflm.layers.moe.relu import ReluRouter
from efflm.layers.moe.sigmoid_bias import SigmoidBiasRouter
from efflm.layers.moe.topk import TopKRouter

ROUTERS = {"topk": TopKRouter, "sigmoid_bias": SigmoidBiasRouter,
           "recurrent": RecurrentRouter, "expert_choice": ExpertChoiceRouter,
           "relu": ReluRouter}

__all__ = ["DISPATCH", "ROUTERS"]
