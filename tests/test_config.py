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


def test_every_option_parses_the_same_from_cli_strings_and_toml_values():
    import toml

    cli = ["algo=lokr", "conv_dim=4", "conv_alpha=0.5", "dropout=0.1", "rank_dropout=0.2", "module_dropout=0.05",
           "use_tucker=True", "use_scalar=true", "rs_lora=1", "factor=8", "decompose_both=yes", "full_matrix=False",
           "unbalanced_factorization=false", "dora_wd=True", "wd_on_output=False", "dora_detach_norm=True",
           "loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=8", "loraplus_text_encoder_lr_ratio=4", "preset=attn-mlp",
           "block_dims=" + ",".join(["4"] * 25), "block_alphas=" + ",".join(["2"] * 25),
           "conv_block_dims=" + ",".join(["2"] * 25), "conv_block_alphas=" + ",".join(["1"] * 25),
           "down_lr_weight=sine+0.1", "mid_lr_weight=2", "up_lr_weight=1,1,0.5", "block_lr_zero_threshold=0.1"]
    from_cli = parse_config("8", "4", None, dict(x.split("=", 1) for x in cli))
    native = toml.loads('''
algo = "lokr"
conv_dim = 4
conv_alpha = 0.5
dropout = 0.1
rank_dropout = 0.2
module_dropout = 0.05
use_tucker = true
use_scalar = true
rs_lora = true
factor = 8
decompose_both = true
full_matrix = false
unbalanced_factorization = false
dora_wd = true
wd_on_output = false
dora_detach_norm = true
loraplus_lr_ratio = 16
loraplus_unet_lr_ratio = 8
loraplus_text_encoder_lr_ratio = 4
preset = "attn-mlp"
block_dims = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
block_alphas = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
conv_block_dims = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
conv_block_alphas = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
down_lr_weight = "sine+0.1"
mid_lr_weight = [2]
up_lr_weight = [1.0, 1.0, 0.5]  # the toml package sd-scripts uses wants one number type per array
block_lr_zero_threshold = 0.1
''')
    from_toml = parse_config(8, 4, None, native)
    assert from_cli == from_toml
    assert from_cli.factor == 8 and from_cli.block_dims == (4,) * 25 and from_cli.up_lr_weight == (1.0, 1.0, 0.5)
    assert from_cli.dora_axis == "input" and from_cli.preset == "attn-mlp"


@pytest.mark.parametrize("key,value", [("factor", "4"), ("decompose_both", "true"), ("full_matrix", "true"),
                                       ("unbalanced_factorization", "true")])
def test_lokr_only_options_with_another_algo_are_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        parse_config(4, 1, None, {"algo": "loha", key: value})


def test_harmless_misplaced_options_warn(caplog):
    parse_config(4, 1, None, {"wd_on_output": "true"})
    assert "wd_on_output has no effect" in caplog.text


@pytest.mark.parametrize("args,match", [
    ({"down_lr_weight": "sinus"}, "down_lr_weight"),
    ({"block_dims": "4,x,4"}, r"block_dims\[1\]"),
    ({"block_alphas": "1,1"}, "block_alphas need block_dims"),
    ({"train_norm": "true"}, "train_norm"),
    ({"bypass_mode": "true", "dora_wd": "true"}, "bypass_mode"),
])
def test_more_bad_inputs(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(4, 1, None, args)


@pytest.mark.parametrize("key,flag", [("network_dim", "--network_dim"), ("network_alpha", "--network_alpha"),
                                      ("dim", "--network_dim"), ("alpha", "--network_alpha"),
                                      ("neuron_dropout", "--network_dropout")])
def test_sd_scripts_own_options_as_network_args_are_refused(key, flag):
    with pytest.raises(ConfigError, match=f"network_arg {key}=.*{flag}"):
        parse_config(4, 1, None, {key: "8" if "drop" not in key else "0.1"})


def test_network_dim_network_arg_through_create_network_as_sd_scripts_calls_it(tmp_path):
    """sd-scripts: create_network(1.0, args.network_dim, args.network_alpha, vae, te, unet,
    neuron_dropout=args.network_dropout, **net_kwargs): a network_arg network_dim reaches us as a
    keyword (create_network's first six arguments are positional-only) and gets a ConfigError, not
    Python's "got multiple values for argument 'network_dim'"."""
    import lycoris_kohya
    from test_algorithms import ToyUNet

    net_kwargs = {"network_dim": "8", "dropout": None}
    with pytest.raises(ConfigError, match="--network_dim"):
        lycoris_kohya.create_network(1.0, 4, 1, None, [], ToyUNet(), neuron_dropout=None, **net_kwargs)
    net = lycoris_kohya.create_network(1.0, 4, 1, None, [], ToyUNet(), neuron_dropout=None, dropout=None)
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, None, {})
    # --dim_from_weights: create_network_from_weights(1, file, vae, te, unet, **net_kwargs)
    with pytest.raises(ConfigError, match="--network_alpha"):
        lycoris_kohya.create_network_from_weights(1, path, None, [], ToyUNet(), network_alpha="2")
    with pytest.raises(TypeError, match="positionally"):
        lycoris_kohya.create_network(1.0, 4, 1, None, [], unet=ToyUNet())


def test_override_aliases_still_name_the_override_values():
    from lycoris_kohya.config import parse_overrides

    assert parse_overrides("preset x", {"network_dim": 8, "network_alpha": 2}) == \
        {"dim": 8, "alpha": 2.0, "conv_dim": 8, "conv_alpha": 2.0}
