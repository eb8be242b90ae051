"""The Trainer under real `torch.distributed` (gloo, two processes started by torchrun): a stage-2 step with negatives
gathered across ranks equals one process on the whole batch, and a NaN on one rank stops or skips every rank alike."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from proclip_train.cli import main
from safetensors.torch import load_file
from training_data import COMMON, flat_colour_images, image_folder, poison_cached_row


def test_torchrun_two_processes_take_the_same_step_as_one_process_on_the_whole_batch(tmp_path, tiny_proclip_dir):
    """Stage 2 through the Trainer under DDP (gloo): 2 ranks x 4 pairs with negatives gathered across ranks make the
    same SGD step as 1 process x 8 pairs. Flat-colour images make the random crops irrelevant."""
    data = flat_colour_images(tmp_path / "flat")
    common = [
        "train", "--stage", "2", "--model", str(tiny_proclip_dir), "--data", str(data), "--max_steps", "1",
        "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "0", "--weight_decay", "0", "--warmup_steps", "0",
        "--distill_weight", "0", "--lr_scheduler_type", "constant", "--save_strategy", "no", "--use_cpu",
        "--disable_tqdm", "true", "--logging_steps", "1",
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "proclip_train.cli", *common, "--out", str(tmp_path / "two"), "--per_device_train_batch_size", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main([*common, "--out", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tiny_proclip_dir / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.1  # the step is not a no-op
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    losses = [json.loads((tmp_path / run / "training_report.json").read_text())["last_loss_components"] for run in ("one", "two")]
    assert losses[1]["contrastive"] == pytest.approx(losses[0]["contrastive"], rel=1e-5)


def test_under_ddp_every_rank_stops_or_skips_alike(tmp_path, tiny_proclip_dir):
    """Two gloo ranks, the NaN row on one of them: both stop with the message (naming the rank), or with
    --skip_nonfinite_steps both skip that step, so the ranks' weights never part."""
    captions = image_folder(tmp_path / "data", 32)
    main(["embed", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "data"), "--no-teacher"])
    poison_cached_row(tmp_path / "data" / "proclip_embedding_cache", captions[13])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def torchrun(out, *flags):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
             "-m", "proclip_train.cli", "train", "--stage", "2", "--model", str(tiny_proclip_dir), "--data",
             str(tmp_path / "data"), "--out", str(tmp_path / out), "--per_device_train_batch_size", "4",
             "--max_steps", "4", "--learning_rate", "1e-3", "--save_strategy", "no", *COMMON, *flags],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    stopped = torchrun("stopped")
    assert stopped.returncode != 0
    assert stopped.stderr.count("Non-finite loss (nan) at step") == 2  # each rank says it, alike
    assert "on rank" in stopped.stderr and f"{captions[13]!r} (llm_embeds)" in stopped.stderr
    assert not (tmp_path / "stopped" / "model.safetensors").exists()

    skipped = torchrun("skipped", "--skip_nonfinite_steps")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    report = json.loads((tmp_path / "skipped" / "training_report.json").read_text())
    assert (report["steps_skipped_nonfinite"], report["samples_trained"]) == (1, 3 * 8)
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "skipped" / "model.safetensors").values())
