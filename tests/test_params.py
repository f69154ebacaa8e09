"""params.json parsing, shard layout and presets."""

import json

import pytest

from llama_mp import LlamaMPError
from llama_mp.checkpoints import layout
from llama_mp.checkpoints.params import load_params, load_preset, parse_params, preset_names

LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}


def test_meta_params_parse_and_imply_the_published_sizes():
    args = parse_params(LLAMA2_7B)
    assert (args.head_dim, args.kv_heads, args.ffn_hidden_dim) == (128, 32, 11008)
    assert args.with_vocab(32000).parameter_count() == 6_738_415_616


@pytest.mark.parametrize("name, shards, hidden, billions", [
    ("llama-7b", 1, 11008, 6.74), ("llama-13b", 2, 13824, 13.02), ("llama-33b", 4, 17920, 32.53),
    ("llama-65b", 8, 22016, 65.29), ("llama-2-70b", 8, 28672, 68.98), ("codellama-34b", 4, 22016, 33.74),
])
def test_presets_match_the_published_models(name, shards, hidden, billions):
    args, k = load_preset(name)
    assert k == shards and args.ffn_hidden_dim == hidden
    assert args.parameter_count() / 1e9 == pytest.approx(billions, abs=0.01)
    assert shards in layout.valid_world_sizes(args)


def test_all_presets_load():
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b"} <= set(preset_names())
    for name in preset_names():
        load_preset(name)
    with pytest.raises(LlamaMPError, match="Unknown model preset"):
        load_preset("llama-9b")


@pytest.mark.parametrize("change, words", [
    ({"n_heads": None}, "missing field"),
    ({"use_scaled_rope": True, "rope_scaling": 8}, "unknown field"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope must be true or false"),
    ({"dim": "4096"}, "dim must be an integer"),
    ({"n_kv_heads": 5}, "n_kv_heads 5 must be positive and divide"),
    ({"dim": 4095}, "not divisible by n_heads"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_bad_params_name_the_field(change, words):
    raw = dict(LLAMA2_7B, **change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(LlamaMPError, match=words):
        parse_params(raw)


def test_params_file_errors(tmp_path):
    with pytest.raises(LlamaMPError, match="does not exist"):
        load_params(str(tmp_path))
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(LlamaMPError, match="not valid JSON"):
        load_params(str(tmp_path))
    (tmp_path / "params.json").write_text(json.dumps(LLAMA2_7B))
    assert load_params(str(tmp_path)).dim == 4096


def test_layout_follows_meta_sharding():
    args = parse_params(dict(LLAMA2_7B, n_kv_heads=8)).with_vocab(32000)
    shapes = layout.shard_shapes(args, 2)
    assert shapes["tok_embeddings.weight"] == (32000, 2048)       # embedding dim split
    assert shapes["output.weight"] == (16000, 4096)               # vocab split
    assert shapes["layers.0.attention.wq.weight"] == (2048, 4096)
    assert shapes["layers.0.attention.wk.weight"] == (512, 4096)  # 8 kv heads of 128, split in two
    assert shapes["layers.0.attention.wo.weight"] == (4096, 2048)
    assert shapes["layers.0.feed_forward.w2.weight"] == (4096, 5504)
    assert shapes["layers.0.ffn_norm.weight"] == (4096,)
    assert layout.valid_world_sizes(args) == [1, 2, 4, 8, 16, 32]  # past 8: kv heads replicated


# ----------------------------------------------------------------------------------------------
# Hostile values: json reads NaN and Infinity, which pass every comparison-based range check, and
# nothing stops a file from holding strings, bools or numbers no model can have.

from hypothesis import given, settings, strategies as st  # noqa: E402

FLOAT_FIELDS = ["norm_eps", "rope_theta", "ffn_dim_multiplier"]
INT_FIELDS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"]
NOT_NUMBERS = st.one_of(st.text(max_size=8), st.booleans(), st.lists(st.integers(), max_size=2))
BAD_FLOATS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 10 ** 400, -(10 ** 400)]),
    st.floats(max_value=0.0, allow_nan=False),  # zero and negative
    NOT_NUMBERS,
)
BAD_INTS = st.one_of(
    st.integers(max_value=-2), st.just(0),
    st.integers(min_value=2 ** 31, max_value=10 ** 30),  # no tensor dimension is that large
    st.floats(allow_nan=True, allow_infinity=True),  # 4096.0 is not an integer either
    NOT_NUMBERS,
)


def refused_fields(raw):
    with pytest.raises(LlamaMPError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message and message.count("is not a valid LLaMA params file") == 1
    return message


@settings(max_examples=50, deadline=None)
@given(bad=st.dictionaries(st.sampled_from(FLOAT_FIELDS), BAD_FLOATS, min_size=1))
def test_every_non_finite_or_impossible_float_field_is_named_in_one_message(bad):
    message = refused_fields(dict(LLAMA2_7B, **bad))
    for name in bad:
        assert f"{name} must be" in message, message


@settings(max_examples=50, deadline=None)
@given(bad=st.dictionaries(st.sampled_from(INT_FIELDS), BAD_INTS, min_size=1),
       bad_float=st.sampled_from(FLOAT_FIELDS), float_value=BAD_FLOATS)
def test_every_bad_integer_field_is_named_together_with_bad_float_fields(bad, bad_float, float_value):
    message = refused_fields(dict(LLAMA2_7B, **bad, **{bad_float: float_value}))
    for name in [*bad, bad_float]:
        assert name in message, message


@settings(max_examples=50, deadline=None)
@given(norm_eps=st.floats(min_value=1e-12, max_value=0.5), rope_theta=st.floats(min_value=1.0, max_value=1e9),
       ffn_dim_multiplier=st.floats(min_value=0.01, max_value=100.0))
def test_finite_values_in_range_are_accepted(norm_eps, rope_theta, ffn_dim_multiplier):
    args = parse_params(dict(LLAMA2_7B, norm_eps=norm_eps, rope_theta=rope_theta,
                             ffn_dim_multiplier=ffn_dim_multiplier))
    assert (args.norm_eps, args.rope_theta) == (norm_eps, rope_theta) and args.ffn_hidden_dim > 0


def test_nan_and_infinity_in_a_params_file_are_refused(tmp_path):
    (tmp_path / "params.json").write_text(
        '{"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "vocab_size": -1, '
        '"norm_eps": NaN, "rope_theta": Infinity, "ffn_dim_multiplier": -Infinity}')
    with pytest.raises(LlamaMPError, match=r"params\.json is not a valid LLaMA params file: "
                                           r"norm_eps must be a finite number, got nan .*; "
                                           r"rope_theta must be a finite number, got inf .*; "
                                           r"ffn_dim_multiplier must be a finite number, got -inf"):
        load_params(str(tmp_path))


@pytest.mark.parametrize("change, words", [
    ({"norm_eps": 1.0}, "norm_eps must be positive and below 1"),
    ({"ffn_dim_multiplier": 1e-9}, "FFN width of 0"),
    ({"ffn_dim_multiplier": 1e300}, "FFN width of"),
    ({"dim": 2 ** 40}, "dim 1099511627776 is impossibly large"),
])
def test_values_no_model_can_have_are_refused(change, words):
    with pytest.raises(LlamaMPError, match=words):
        parse_params(dict(LLAMA2_7B, **change))
