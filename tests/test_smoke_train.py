"""The README's main job: scripts/smoke_train.py trains, saves and verifies the reload and merge
(one process, and two under torchrun; SDXL in test_sdxl_smoke.py)."""
import pytest

import smoke_train

pytestmark = pytest.mark.slow  # every test here is a smoke train, end to end (python -m pytest -m slow)


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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "configs", "examples")


@pytest.mark.parametrize("example", sorted(os.listdir(EXAMPLES)))
def test_example_configs_train_as_they_are(tiny_sd, tmp_path, example):
    rc = smoke_train.main(["--config", os.path.join(EXAMPLES, example), "--model", tiny_sd, "--steps", "2",
                           "--output_dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / example.replace(".toml", ".safetensors")).exists()


def test_smoke_train_two_processes(tiny_sd, tmp_path):
    """torchrun, 2 processes: DDP over gloo as sd-scripts runs it (gradients averaged by hand, one
    save from the main process), module and rank dropout on, keys rescaled by max-norm; the script
    checks that both ranks skipped the same modules, got identical max-norm results at every step
    and end with bit-identical weights, then reloads and merges the file."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "scripts", "smoke_train.py"), "--model", tiny_sd, "--steps", "4",
           "--output_dir", str(tmp_path), "--scale_weight_norms", "0.01",
           "--network_args", "algo=lokr", "dora_wd=true", "module_dropout=0.3", "rank_dropout=0.2", "conv_dim=2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "training on SD1.x in 2 process(es), 4 steps: lokr network" in out  # its one log line of what was built
    assert "2 ranks: identical max-norm results at all 4 steps and bit-identical adapter weights" in out
    scaled = [int(s.split(",")[0]) for s in out.split("per step: ", 1)[1].splitlines()[0].strip("()").split("), (")]
    assert sum(scaled) > 0  # the compared max-norm results include rescaling
    assert "smoke train passed" in out and (tmp_path / "smoke_lokr.safetensors").exists()


def test_two_processes_seeded_apart_stop_with_a_clear_error(tiny_sd, tmp_path):
    """Without --seed, musubi-tuner and sd-scripts seed each process with its own random seed: their
    module_dropout decisions then differ, and the gradients, averaged one parameter at a time, would
    pair up wrongly. The network says so before the first forward, on every process."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "scripts", "smoke_train.py"), "--model", tiny_sd, "--steps", "2",
           "--output_dir", str(tmp_path), "--seed_per_process",
           "--network_args", "algo=locon", "module_dropout=0.3"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert out.count("module_dropout with 2 processes needs every process to skip the same modules") >= 2, out[-3000:]
    assert "Pass --seed" in out and "the ranks skipped different modules" not in out
