"""network_args parsing: strings from the CLI and native values give typed, validated options."""
import pytest

from lycoris_kohya.config import ConfigError, parse_config


@pytest.mark.parametrize("text", ["False", "false", "0", "no", "off"])
def test_false_spellings(text):
    assert parse_config(4, 1, None, {"use_tucker": text}).use_tucker is False


@pytest.mark.parametrize("text", ["True", "true", "1", "yes", True])
def test_true_spellings(text):
    assert parse_config(4, 1, None, {"use_tucker": text}).use_tucker is True


def test_strings_and_native_values_agree():
    a = parse_config("8", "4", None, {"conv_dim": "4", "conv_alpha": "1", "rank_dropout": "0.1", "algo": "LoCon"})
    b = parse_config(8, 4.0, None, {"conv_dim": 4, "conv_alpha": 1.0, "rank_dropout": 0.1, "algo": "locon"})
    assert a == b
    assert (a.dim, a.alpha, a.conv_dim, a.conv_alpha, a.rank_dropout) == (8, 4.0, 4, 1.0, 0.1)


def test_defaults_follow_sd_scripts_and_lycoris():
    c = parse_config(None, None, None, {"dropout": None})
    assert (c.algo, c.dim, c.alpha, c.dropout) == ("locon", 4, 1.0, None)
    assert (c.effective_conv_dim, c.effective_conv_alpha) == (4, 1.0)  # conv_dim defaults to network_dim


def test_aliases_and_disable_conv_cp_means_what_it_says():
    assert parse_config(4, 1, None, {"use_cp": "true"}).use_tucker
    assert parse_config(4, 1, None, {"use_conv_cp": "1"}).use_tucker
    assert parse_config(4, 1, None, {"disable_conv_cp": "True"}).use_tucker is False
    assert parse_config(4, 1, None, {"disable_conv_cp": "False"}).use_tucker is True
    with pytest.raises(ConfigError, match="disagree"):
        parse_config(4, 1, None, {"use_cp": "true", "disable_conv_cp": "true"})


def test_neuron_dropout_and_dropout_kwarg():
    assert parse_config(4, 1, 0.1, {"dropout": None}).dropout == 0.1
    assert parse_config(4, 1, None, {"dropout": "0.2"}).dropout == 0.2


@pytest.mark.parametrize("key,value,match", [
    ("no_such_option", "1", "no_such_option"),
    ("algo", "glora", "algo"),
    ("conv_dim", "-1", "conv_dim"),
    ("conv_dim", "2.5", "conv_dim"),
    ("rank_dropout", "1.0", "rank_dropout"),
    ("module_dropout", "-0.1", "module_dropout"),
    ("use_tucker", "maybe", "use_tucker"),
    ("factor", "0", "factor"),
])
def test_bad_input_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(4, 1, None, {key: value})


def test_unknown_key_lists_accepted_ones():
    with pytest.raises(ConfigError) as e:
        parse_config(4, 1, None, {"conv_dimm": "4"})
    assert "conv_dimm" in str(e.value) and "conv_dim" in str(e.value)


def test_negative_network_dim_is_refused():
    with pytest.raises(ConfigError, match="dim"):
        parse_config(-4, 1, None, {})
