"""Stage 2 under FSDP: two CPU processes (torchrun, gloo) take the same steps as one process on the whole batch.

`proclip train --stage 2 --fsdp "full_shard auto_wrap"` runs transformers' FSDP integration (FSDP2, `fully_shard`,
the default `fsdp_config["version"]`) on 2 ranks x 4 image-caption pairs, and plain `proclip train` on 1 process x 8
pairs. Two SGD steps with the EMA teacher in the loss: negatives are gathered across ranks (InfoNCE), and the
self-distillation term is the per-sample instance term (`--reduction mean --structure_weight 0`, which a rank-local
computation reproduces exactly; the structure term's pairs would span ranks). The EMA after step 1 (momentum 0.5,
updated from the sharded parameters' full values) sets step 2's distillation loss and gradient, so the logged loss
components of both steps and the final weights must agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from proclip_train.cli import main
from safetensors.torch import load_file
from training_data import flat_colour_images

FSDP_CONFIG = {"transformer_layer_cls_to_wrap": ["CLIPEncoderLayer", "ProCLIPAdapterBlock"],
               "state_dict_type": "FULL_STATE_DICT"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_components(out) -> list[dict]:
    """The loss components logged at each step (the Trainer's log history, from its last checkpoint-free state)."""
    report = json.loads((out / "training_report.json").read_text())
    return report["last_loss_components"]


def test_fsdp_two_processes_take_the_same_steps_as_one_process_on_the_whole_batch(tmp_path, tiny_proclip_dir):
    data = flat_colour_images(tmp_path / "flat")
    common = [
        "train", "--stage", "2", "--model", str(tiny_proclip_dir), "--data", str(data), "--max_steps", "2",
        "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--weight_decay", "0", "--warmup_steps", "0",
        "--distill_weight", "50", "--ema_momentum", "0.5", "--reduction", "mean", "--structure_weight", "0",
        "--lr_scheduler_type", "constant", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
        "--logging_steps", "1", "--seed", "0",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "proclip_train.cli", *common, "--out", str(tmp_path / "two"), "--per_device_train_batch_size", "4",
         "--fsdp", "full_shard auto_wrap", "--fsdp_config", json.dumps(FSDP_CONFIG)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    main([*common, "--out", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tiny_proclip_dir / "model.safetensors")
    assert set(two) == set(one)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.1  # the steps are not no-ops
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    losses = {run: logged_components(tmp_path / run) for run in ("one", "two")}
    assert losses["one"]["distillation"] > 0  # step 2: the student has left the EMA teacher
    for key in ("contrastive", "distillation", "instance"):
        assert losses["two"][key] == pytest.approx(losses["one"][key], rel=1e-5), key
