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

# What `efflm report` tabulates for MoE runs: the MoE layer's load spread, then each
# router's own statistics (`Router.report_statistics`).
REPORT_STATISTICS = (("load CV", "expert_load_cv"),
                     *dict.fromkeys(s for r in ROUTERS.values() for s in r.report_statistics))

__all__ = ["DISPATCH", "REPORT_STATISTICS", "ROUTERS"]
