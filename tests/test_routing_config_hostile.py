"""DeepSeek-V2/V3 routing settings read from a hostile config.json: every value is honoured as written
or refused with one line; none is silently replaced by a default, none raises anything but ConfigError."""

import math

import pytest

pytest.importorskip("torch")

from edge_sdk.errors import ConfigError  # noqa: E402
from edge_sdk.modelspec import shape_from_config  # noqa: E402


def tiny_cfg(arch="deepseek_v3", **over):
    from edge_sdk.converters.tiny import tiny_config

    cfg = tiny_config(arch, 1024, **over)
    return {k: v for k, v in cfg.items() if v is not None}


def check(cfg):
    from edge_sdk.converters.deepseek_v2 import check_config

    return check_config(cfg, shape_from_config(cfg))


@pytest.mark.parametrize("over, words", [
    ({"n_group": 10 ** 400}, "routing n_group"),  # a JSON integer past float range
    ({"routed_scaling_factor": 10 ** 400}, "routing routed_scaling_factor"),
    ({"topk_group": -(10 ** 400)}, "routing topk_group"),
    ({"routed_scaling_factor": 0}, "routing routed_scaling_factor 0 "),  # was read as the default 2.5
    ({"routed_scaling_factor": False}, "routing routed_scaling_factor False "),
    ({"routed_scaling_factor": -2.5}, "routing routed_scaling_factor -2.5 "),
    ({"routed_scaling_factor": 1e308}, "routing routed_scaling_factor 1e\\+308 "),
    ({"n_group": False}, "routing n_group False "),
    ({"n_group": 0}, "routing n_group 0 "),
    ({"topk_group": []}, "routing topk_group \\[\\] "),
    ({"topk_method": 0}, "routing topk_method 0 is not supported"),
    ({"topk_method": ""}, "routing topk_method '' is not supported"),
    ({"scoring_func": False}, "routing scoring_func False is not supported"),
    ({"norm_topk_prob": "false"}, "norm_topk_prob 'false' is not true or false"),  # was read as true
    ({"norm_topk_prob": 0}, "norm_topk_prob 0 is not true or false"),
])
def test_hostile_routing_values_are_one_line(over, words):
    with pytest.raises(ConfigError, match=words) as e:
        check(tiny_cfg(**over))
    assert "\n" not in str(e.value) and e.value.hint


@pytest.mark.parametrize("arch, name", [("deepseek_v2", "DeepseekV2ForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM")])
def test_absent_and_null_keys_take_the_defaults(arch, name):
    from edge_sdk.converters.deepseek_v2 import ROUTING, routing

    for key, default in ROUTING[name]["defaults"].items():
        cfg = tiny_cfg(arch)
        cfg.pop(key)
        assert routing(cfg)[key] == routing(cfg | {key: None})[key] == default


def test_any_json_number_is_honoured_or_refused():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    numbers = st.one_of(st.integers(), st.integers(-2 ** 1400, 2 ** 1400), st.floats(), st.booleans(), st.none(),
                        st.text(max_size=3), st.lists(st.integers(), max_size=1))
    keys = st.sampled_from(["n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "topk_method", "scoring_func"])

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(arch=st.sampled_from(["deepseek_v2", "deepseek_v3"]), over=st.dictionaries(keys, numbers, max_size=3))
    def run(arch, over):
        cfg = tiny_cfg(arch) | over
        try:
            r = check(cfg)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
        for key, v in over.items():  # what was written is what is used
            if v is not None:
                assert r[key] == v, key
        assert 0 < r["routed_scaling_factor"] and math.isfinite(r["routed_scaling_factor"])
        assert isinstance(r["norm_topk_prob"], bool) and r["n_group"] >= 1 and r["topk_group"] >= 1

    run()


@pytest.mark.parametrize("over, words", [
    ({"n_routed_experts": 10 ** 12}, "n_routed_experts 1000000000000 is not an integer in \\[0, 4096\\]"),  # was: names for every expert built
    ({"n_routed_experts": "8"}, "n_routed_experts '8' is not an integer"),  # was read as 8
    ({"num_experts_per_tok": 2.5}, "num_experts_per_tok 2.5 is not an integer"),  # was read as 2
    ({"moe_intermediate_size": True}, "moe_intermediate_size True is not an integer"),
    ({"n_shared_experts": -1}, "n_shared_experts -1 is not an integer"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace -1 is not an integer"),
    ({"moe_layer_freq": "1"}, "moe_layer_freq '1' is not an integer"),
])
def test_hostile_expert_counts_are_one_line_before_any_name_is_listed(over, words):
    with pytest.raises(ConfigError, match=words) as e:
        check(tiny_cfg(**over))
    assert "\n" not in str(e.value) and e.value.hint


@pytest.mark.parametrize("archs", [[["DeepseekV3ForCausalLM"]], [{}], [3], [None]])
def test_an_architecture_that_is_not_a_name_is_one_line(archs):
    with pytest.raises(ConfigError, match="is not supported") as e:
        shape_from_config(tiny_cfg() | {"architectures": archs})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("archs", ["DeepseekV3ForCausalLM", {"x": 1}, 5])
def test_routing_follows_the_architecture_the_shape_was_read_as(archs):
    from edge_sdk.converters.deepseek_v2 import ROUTING, routing

    cfg = tiny_cfg() | {"architectures": archs, "model_type": "DeepseekV3ForCausalLM"}
    assert shape_from_config(cfg).architecture == "DeepseekV3ForCausalLM"
    assert check(cfg) == routing(cfg) and check(cfg)["topk_method"] in ROUTING["DeepseekV3ForCausalLM"]["topk_method"]
