"""--use-gpu sizing from measured rates (#22), resolved from the cluster's resources: tested without
a GPU by handing the planner the resources `ray.cluster_resources()` would report."""

from __future__ import annotations

import pytest

from kneescreen.errors import KneescreenError
from kneescreen.screen import sizing
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.sizing import plan_screening

def _cfg(**kw) -> ScreenConfig:
    return ScreenConfig(input="in", output="out", bundle="b", **kw)


def test_one_h200_node_is_decode_bound_and_says_by_how_much():
    plan = plan_screening(_cfg(use_gpu=True), {"CPU": 16.0, "GPU": 1.0})
    assert (plan.actors, plan.batch_size) == (1, 256)
    assert plan.model_rate == 17_955.0  # the measured H200 rate at batch 256
    assert plan.decode_tasks == 16 and plan.decode_rate == 16 * 35.0  # every CPU decodes
    assert plan.decode_cpus_wanted == 462  # 0.9 x 17,955 / 35 per core
    assert plan.bottleneck == "decode" and plan.expected_rate == 560.0
    text = plan.describe()
    assert "decode-bound" in text and "462 decode CPUs" in text


def test_decode_tasks_stop_at_what_the_gpus_consume():
    # 8 GPUs and 4,000 CPUs: 8 x 0.9 x 17,955 / 35 = 3,694 decode tasks, not 4,000.
    plan = plan_screening(_cfg(use_gpu=True), {"CPU": 4000.0, "GPU": 8.0})
    assert plan.actors == 8 and plan.decode_tasks == 3694 == plan.decode_cpus_wanted
    assert plan.bottleneck == "model"


def test_a_faster_decode_path_needs_fewer_cpus():
    plan = plan_screening(_cfg(use_gpu=True, decode_rate=500.0), {"CPU": 64.0, "GPU": 2.0})
    assert plan.decode_cpus_wanted == 65 and plan.decode_tasks == 64 and plan.bottleneck == "decode"
    plan = plan_screening(_cfg(use_gpu=True, decode_rate=1000.0), {"CPU": 64.0, "GPU": 2.0})
    assert plan.decode_tasks == 33 and plan.bottleneck == "model"


def test_settings_the_user_gave_win():
    plan = plan_screening(_cfg(use_gpu=True, actors=2, batch_size=32, decode_tasks=10), {"CPU": 64.0, "GPU": 4.0})
    assert (plan.actors, plan.batch_size, plan.decode_tasks) == (2, 32, 10)
    assert plan.model_rate == 2 * 3_615.0  # the measured batch-32 rate


def test_an_autoscaling_cluster_without_gpus_yet_plans_one_actor():
    plan = plan_screening(_cfg(use_gpu=True), {"CPU": 4.0})
    assert plan.actors == 1 and plan.decode_tasks == 4


def test_cpu_runs_keep_the_cpu_rule():
    plan = plan_screening(_cfg(), {"CPU": 16.0})
    assert (plan.actors, plan.batch_size, plan.decode_tasks, plan.model_rate) == (8, 32, None, None)
    assert plan.describe() == "8 actor(s) x batch 32"


def test_model_rate_between_and_below_measured_batches():
    assert sizing.model_rate(128) == 3_615.0 and sizing.model_rate(512) == 17_955.0
    assert sizing.model_rate(16) == pytest.approx(3_615.0 / 2)


@pytest.mark.parametrize("field, value", [("decode_tasks", 0), ("decode_rate", 0.0), ("decode_rate", -3.0)])
def test_bad_sizing_settings_are_refused(field, value):
    with pytest.raises(KneescreenError, match=field.replace("_", "-")):
        _cfg(**{field: value}).validate()
