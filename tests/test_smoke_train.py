"""The README's main job: scripts/smoke_train.py trains, saves and verifies the reload and merge."""
import smoke_train


def test_smoke_train_cli(tiny_sd, tmp_path):
    rc = smoke_train.main(["--model", tiny_sd, "--steps", "3", "--output_dir", str(tmp_path),
                           "--network_args", "algo=locon", "conv_dim=4", "conv_alpha=1"])
    assert rc == 0
    assert (tmp_path / "smoke_locon.safetensors").exists()


def test_smoke_train_from_toml(tiny_sd, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'''
[model]
pretrained_model_name_or_path = "{tiny_sd}"
[network]
network_module = "lycoris_kohya"
network_dim = 4
network_alpha = 2
network_args = ["algo=locon", "conv_dim=2", "use_tucker=true"]
[training]
max_train_steps = 2
scale_weight_norms = 0.001
output_dir = "{tmp_path}"
output_name = "from_toml"
save_precision = "fp16"
''')
    assert smoke_train.main(["--config", str(cfg)]) == 0
    assert (tmp_path / "from_toml.safetensors").exists()


import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "examples")


@pytest.mark.parametrize("example", sorted(os.listdir(EXAMPLES)))
def test_example_configs_train_as_they_are(tiny_sd, tmp_path, example):
    rc = smoke_train.main(["--config", os.path.join(EXAMPLES, example), "--model", tiny_sd, "--steps", "2",
                           "--output_dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / example.replace(".toml", ".safetensors")).exists()
