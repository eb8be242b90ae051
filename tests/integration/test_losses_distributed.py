"""Stage-2 losses under real torch.distributed: two gloo processes with B/2 pairs each against one process with B.

What equals what (W = 2 ranks, B = W * B_local pairs):
- contrastive: mean over ranks of the local losses == the single-process loss on B.
- DDP-averaged parameter gradients (projections and logit_scale) == the single-process gradients on B.
- each rank's raw gradient on its own embeddings == W * the single-process gradient of those rows (the
  gather's backward sums over ranks; DDP's 1/W averaging cancels the W).
- with self-distillation, whose regulariser is computed on each rank's local batch: mean over ranks of the
  local losses == single-process contrastive on B + lambda * mean over ranks of the regulariser of each shard,
  and gradients as above against that reference; with reduction "mean", the instance term averaged over
  ranks also equals the single-process instance term on B.
"""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from proclip_train.training.losses import (
    ContrastiveDistillationLoss,
    ContrastiveLoss,
    instance_alignment,
    structure_alignment,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

WORLD_SIZE = 2
LOCAL_BATCH = 4
BATCH = WORLD_SIZE * LOCAL_BATCH
LAMBDA = 0.5
CASES = {  # name -> (reduction, structure_form); None: contrastive loss only
    "contrastive": None,
    "distill_sum_upstream": ("sum", "upstream"),
    "distill_mean_paper": ("mean", "paper"),
}


class Towers(nn.Module):
    """Stand-ins for the trainable image encoder and adapter: the parameters DDP averages gradients of."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 5)
        self.text = nn.Linear(7, 5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, pixels, tokens):
        return self.image(pixels), self.text(tokens), self.logit_scale


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 5, generator=g)


def make_loss(case, rank):
    """The contrastive case names its rank explicitly; the others leave rank and world size to the process group."""
    if CASES[case] is None:
        return ContrastiveLoss(rank=rank, world_size=WORLD_SIZE)
    reduction, form = CASES[case]
    return ContrastiveDistillationLoss(LAMBDA, reduction, form)


def worker(rank, port, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        pixels, tokens, teacher = batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for case in CASES:
            model = DistributedDataParallel(Towers())
            image, text, logit_scale = model(pixels[rows], tokens[rows])
            image.retain_grad()
            text.retain_grad()
            extra = () if CASES[case] is None else (teacher[rows],)
            out = make_loss(case, rank)(image, text, logit_scale, *extra)
            out["loss"].backward()  # DDP all-reduces and averages the parameter gradients here
            terms = torch.stack([v.detach() for v in out.values()])
            dist.all_reduce(terms)
            results[(case, rank)] = {
                "local_loss": out["loss"].item(),
                "mean_terms": dict(zip(out, (terms / WORLD_SIZE).tolist())),
                "params": {n: p.grad.clone() for n, p in model.module.named_parameters()},
                "image_grad": image.grad,
                "text_grad": text.grad,
            }
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=WORLD_SIZE, join=True)
        return dict(results)


def single_process_reference(case):
    """One process, B pairs; the regulariser (if any) averaged over the shards the ranks see."""
    pixels, tokens, teacher = batch()
    model = Towers()
    image, text, logit_scale = model(pixels, tokens)
    image.retain_grad()
    text.retain_grad()
    terms = {"contrastive": ContrastiveLoss(rank=0, world_size=1)(image, text, logit_scale)["loss"]}
    if CASES[case] is not None:
        reduction, form = CASES[case]
        shards = [slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH) for r in range(WORLD_SIZE)]
        terms["instance"] = sum(instance_alignment(image[s], teacher[s], reduction) for s in shards) / WORLD_SIZE
        terms["structure"] = sum(structure_alignment(image[s], teacher[s], form, reduction) for s in shards) / WORLD_SIZE
        terms["distillation"] = terms["instance"] + terms["structure"]
    terms["loss"] = terms["contrastive"] + LAMBDA * terms.get("distillation", 0.0)
    terms["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {k: v.item() for k, v in terms.items()}, grads, image.grad, text.grad


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(distributed_results, case):
    terms, param_grads, image_grad, text_grad = single_process_reference(case)
    for rank in range(WORLD_SIZE):
        result = distributed_results[(case, rank)]
        assert result["mean_terms"].keys() == terms.keys()
        for name, value in terms.items():
            assert result["mean_terms"][name] == pytest.approx(value, rel=1e-5), name
        # DDP averaged the parameter gradients over ranks: identical on each rank, equal to one process's.
        for name, grad in param_grads.items():
            torch.testing.assert_close(result["params"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["image_grad"], WORLD_SIZE * image_grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["text_grad"], WORLD_SIZE * text_grad[rows], rtol=1e-5, atol=1e-6)


def test_mean_instance_term_over_ranks_is_the_single_process_term(distributed_results):
    pixels, tokens, teacher = batch()
    with torch.no_grad():
        image = Towers().image(pixels)
    full = instance_alignment(image, teacher, "mean").item()
    assert distributed_results[("distill_mean_paper", 0)]["mean_terms"]["instance"] == pytest.approx(full, rel=1e-5)


def test_each_rank_returns_the_loss_of_its_own_rows(distributed_results):
    """Not a replicated global loss: the ranks' values differ, and only their mean is the single-process loss."""
    local = [distributed_results[("contrastive", r)]["local_loss"] for r in range(WORLD_SIZE)]
    assert local[0] != pytest.approx(local[1], rel=1e-3)
    assert sum(local) / WORLD_SIZE == pytest.approx(single_process_reference("contrastive")[0]["loss"], rel=1e-5)
