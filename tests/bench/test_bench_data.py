"""`efflm bench data`: the pipeline's throughput is measured on the batches training reads."""

from conftest import SMALL

from efflm.bench.data import pipeline_tokens_per_sec
from efflm.config import load_config


def test_pipeline_throughput_is_measured_over_whole_batches():
    cfg = load_config("tiny", SMALL)
    assert pipeline_tokens_per_sec(cfg, batches=3, workers=0) > 0
