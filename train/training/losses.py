"""ProCLIP's losses (METHOD.md §3-4), as plain modules that return every term they add up.

- Stage 1, representation inheritance: `InheritanceLoss` = instance alignment + structure alignment of
  the adapter's text embeddings (student) to CLIP's text encoder (teacher).
- Stage 2, contrastive tuning: `ContrastiveLoss` (symmetric InfoNCE, negatives gathered from every
  data-parallel rank) and `ContrastiveDistillationLoss`, stage 2's whole objective assembled in one place (as
  open_clip's `loss.py` does): InfoNCE + lambda * the self-distillation regulariser (the same instance + structure
  alignment, between the image encoder and its EMA teacher) + mu * the text anchor (the instance term between the
  adapter's and its frozen starting copy's embeddings of text-only captions).

Every loss takes raw embeddings of shape (B, D) and L2-normalises them itself, so passing the model's
unnormalised `pooler_output` or its already-normalised `image_embeds` / `text_embeds` gives the same value.
Teacher embeddings are detached: they are targets and never receive gradient. Distances and logits are
computed in float32 with autocast off, because distances read off a Gram matrix lose their small values
in half precision.

Reductions of the alignment terms:
- `"sum"` (upstream): instance = sum_i ||s_i - t_i||^2, structure = sum over the B(B-1)/2 pairs i < j.
- `"mean"` (per pair): instance averaged over the B rows, structure averaged over the B(B-1)/2 pairs.
  Sum-reduced terms grow with the batch while the InfoNCE term does not; `"mean"` keeps the weight of the
  regulariser independent of the batch size.

Forms of the structure term:
- `"upstream"`: sum_{i<j} smoothL1_{beta=1}(||s_i - s_j|| - ||t_i - t_j||)
  (= `F.smooth_l1_loss(F.pdist(s), F.pdist(t), reduction="sum")`).
- `"paper"`: sum_{i<j} | ||s_i - s_j||^2 - ||t_i - t_j||^2 |.
"""

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from modeling_proclip import contrastive_loss

Reduction = Literal["sum", "mean"]
StructureForm = Literal["upstream", "paper"]

REDUCTIONS = ("sum", "mean")
STRUCTURE_FORMS = ("upstream", "paper")

# Squared distances below this are treated as 0 before the square root: sqrt has an infinite derivative at
# 0, so two coinciding rows (a caption that occurs twice in a batch) would otherwise give NaN gradients.
_DISTANCE_EPS = 1e-12


def gather_features(features: Tensor, rank: int, world_size: int) -> Tensor:
    """Concatenate every rank's features, in rank order: (B_local, D) -> (world_size * B_local, D).

    The gather is differentiable (open_clip's `gather_with_grad=True`): backward sends each rank the sum,
    over all ranks, of the gradients that reached its shard, so a rank whose rows serve as negatives in
    another rank's loss gets that gradient too. All ranks must pass the same B_local. Every rank must call
    backward through the gathered tensor (the backward is itself a collective).

    Returns `features` itself when `world_size == 1`. Otherwise torch.distributed must be initialised with
    this `rank` and `world_size` (the default process group).
    """
    if world_size == 1:
        return features
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"gather_features got world_size={world_size}, but torch.distributed is not initialised")
    if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
        raise ValueError(
            f"gather_features got rank {rank} of {world_size}, but this process is rank "
            f"{dist.get_rank()} of {dist.get_world_size()} in the default process group"
        )
    return _GatherWithGrad.apply(features, rank, world_size)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gathered gradient and keeps this rank's rows.

    Public collectives only (torch.distributed.nn.functional.all_gather is deprecated), any backend.
    """

    @staticmethod
    def forward(ctx, features: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        shards = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(shards, features.contiguous())
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.chunk(ctx.world_size, dim=0)[ctx.rank], None, None


def pairwise_distances(x: Tensor, squared: bool = False) -> Tensor:
    """Euclidean distances between all pairs of rows i < j, in `F.pdist` order: (B, D) -> (B(B-1)/2,).

    Read off the Gram matrix in float32 (B x B memory, not B^2 x D). Unlike a plain sqrt, the square root is
    taken of max(d^2, eps), so rows that coincide get distance ~0 and a zero, finite gradient.
    With `squared=True`, returns the squared distances (no square root, differentiable everywhere).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        sq_norms = x.pow(2).sum(dim=-1)
        sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    sq_dist = sq_dist[i, j]
    if squared:
        return sq_dist.clamp_min(0.0)
    return sq_dist.clamp_min(_DISTANCE_EPS).sqrt()


def instance_alignment(student: Tensor, teacher: Tensor, reduction: Reduction = "sum") -> Tensor:
    """L_ins = sum_i ||s_i - t_i||^2 on L2-normalised rows (`"mean"`: divided by B). (B, D), (B, D) -> scalar."""
    _checked(reduction, REDUCTIONS, "reduction")
    s, t = _unit(student), _unit(teacher.detach())
    per_row = (s - t).pow(2).sum(dim=-1)
    return per_row.sum() if reduction == "sum" else per_row.mean()


def structure_alignment(
    student: Tensor, teacher: Tensor, structure_form: StructureForm = "upstream", reduction: Reduction = "sum"
) -> Tensor:
    """L_struct between the pairwise distances of the L2-normalised student and teacher rows.

    (B, D), (B, D) -> scalar; see the module docstring for the two forms. `"mean"` divides by the number of
    pairs B(B-1)/2; a batch of one row has no pairs and gives 0.
    """
    _checked(reduction, REDUCTIONS, "reduction")
    _checked(structure_form, STRUCTURE_FORMS, "structure_form")
    s, t = _unit(student), _unit(teacher.detach())
    if structure_form == "upstream":
        per_pair = F.smooth_l1_loss(pairwise_distances(s), pairwise_distances(t), reduction="none", beta=1.0)
    else:
        per_pair = (pairwise_distances(s, squared=True) - pairwise_distances(t, squared=True)).abs()
    total = per_pair.sum()
    return total if reduction == "sum" else total / max(per_pair.numel(), 1)


class InheritanceLoss(nn.Module):
    """Stage 1 (representation inheritance): L = L_ins + w * L_struct [+ L_ins of a second caption view].

    Args:
        reduction: `"sum"` (upstream) or `"mean"` (per row / per pair), see the module docstring.
        structure_form: `"upstream"` (smooth-L1 of distances) or `"paper"` (|difference of squared distances|).
        structure_weight: w; 0 is the paper's `w/o L_struct` ablation (the term is still computed and reported).
    """

    def __init__(
        self, reduction: Reduction = "sum", structure_form: StructureForm = "upstream", structure_weight: float = 1.0
    ):
        super().__init__()
        self.reduction = _checked(reduction, REDUCTIONS, "reduction")
        self.structure_form = _checked(structure_form, STRUCTURE_FORMS, "structure_form")
        self.structure_weight = structure_weight

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        student_extra: Tensor | None = None,
        teacher_extra: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            student: (B, D) adapter embeddings of the captions.
            teacher: (B, D) CLIP text-encoder embeddings of the same captions.
            student_extra, teacher_extra: (B, D) both embeddings of a second caption per sample (upstream's
                "noise" caption, e.g. the raw alt-text beside a recaption); given together or not at all.
                They add their own instance term; the structure term uses the first view only, as upstream.

        Returns:
            `{"loss", "instance", "structure"}`, plus `"instance_extra"` when a second view is given: scalars.
        """
        if (student_extra is None) != (teacher_extra is None):
            raise ValueError("student_extra and teacher_extra must be given together")
        out = {
            "instance": instance_alignment(student, teacher, self.reduction),
            "structure": structure_alignment(student, teacher, self.structure_form, self.reduction),
        }
        out["loss"] = out["instance"] + self.structure_weight * out["structure"]
        if student_extra is not None:
            out["instance_extra"] = instance_alignment(student_extra, teacher_extra, self.reduction)
            out["loss"] = out["loss"] + out["instance_extra"]
        return out


class ContrastiveLoss(nn.Module):
    """Stage 2 symmetric InfoNCE with negatives from every data-parallel rank.

    open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`: each rank scores its own B_local image
    rows against the W * B_local gathered texts (and its text rows against all images); its row i matches
    column rank * B_local + i. The returned loss is the rank's local loss

        L_r = 1/2 [CE(exp(logit_scale) * V_r T^T, labels_r) + CE(exp(logit_scale) * T_r V^T, labels_r)],

    CE averaged over the B_local rows. The mean of L_r over ranks equals the single-process loss on the
    concatenated batch of W * B_local pairs, and so does its gradient once DDP averages gradients over
    ranks: the gather's backward sums over ranks (each rank's raw gradient on its own embeddings is W times
    the single-process one) and DDP's 1/W averaging cancels that factor; `logit_scale` gets its gradient
    from the local loss only, which DDP averages to the single-process one.
    Gradient accumulation does not add negatives: they come from the current micro-batch of every rank.

    Args:
        rank, world_size: this process's place among the data-parallel ranks. `None` reads them from
            torch.distributed at call time when it is initialised, and means a single process otherwise.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        """
        Args:
            image_embeds: (B_local, D) image embeddings of this rank's pairs (normalised here).
            text_embeds: (B_local, D) text embeddings of the same pairs (normalised here).
            logit_scale: scalar, the *log* of the temperature scale (`model.logit_scale`); exp is taken here.

        Returns:
            `{"loss", "contrastive"}`: scalars, both the local InfoNCE loss L_r.
        """
        rank, world_size = self._rank_and_world_size()
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            image, text = _unit(image_embeds), _unit(text_embeds)
            all_image = gather_features(image, rank, world_size)
            all_text = gather_features(text, rank, world_size)
            scale = logit_scale.float().exp()
            logits_per_image = scale * image @ all_text.T
            logits_per_text = scale * text @ all_image.T
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        loss = contrastive_loss(logits_per_image, logits_per_text, labels)
        return {"loss": loss, "contrastive": loss}

    def _rank_and_world_size(self) -> tuple[int, int]:
        initialised = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if initialised else 0)
        world_size = self.world_size if self.world_size is not None else (dist.get_world_size() if initialised else 1)
        return rank, world_size


class ContrastiveDistillationLoss(ContrastiveLoss):
    """Stage 2's objective: L = L_info + lambda * L_reg + mu * L_anchor, each weighted term only when its weight is
    above 0 (`ContrastiveStage` computes the embeddings, this module every term and their sum).

    L_reg = L_ins(v, u) + w * L_struct(v, u) is stage 1's alignment applied to the trainable image encoder's
    embeddings v and its EMA teacher's u. It is computed on the local batch only, like upstream: on W ranks, `"sum"`
    adds up this rank's B_local rows and B_local(B_local-1)/2 pairs, and the structure term never compares rows of
    two ranks. With `"mean"`, the instance term averaged over ranks equals the single-process one; the structure
    term is the mean over within-rank pairs.

    L_anchor = L_ins(s, t) (beyond the paper: the text anchor) between the trainable adapter's embeddings s of a batch
    of text-only captions and those of a frozen copy of the adapter as stage 2 started, t; local, `reduction` alike.

    Args:
        distill_weight: lambda, the weight of L_reg (0: InfoNCE alone, no EMA teacher embeddings needed).
        reduction, structure_form, structure_weight: as for `InheritanceLoss`.
        rank, world_size: as for `ContrastiveLoss`.
        text_anchor_weight: mu, the weight of L_anchor (0: no anchor embeddings needed).
    """

    def __init__(
        self,
        distill_weight: float = 1.0,
        reduction: Reduction = "sum",
        structure_form: StructureForm = "upstream",
        structure_weight: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        text_anchor_weight: float = 0.0,
    ):
        super().__init__(rank=rank, world_size=world_size)
        self.distill_weight = distill_weight
        self.reduction = _checked(reduction, REDUCTIONS, "reduction")
        self.structure_form = _checked(structure_form, STRUCTURE_FORMS, "structure_form")
        self.structure_weight = structure_weight
        self.text_anchor_weight = text_anchor_weight

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        teacher_image_embeds: Tensor | None = None,
        anchor_embeds: Tensor | None = None,
        anchor_target_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            image_embeds, text_embeds, logit_scale: as for `ContrastiveLoss`.
            teacher_image_embeds: (B_local, D) the EMA teacher's embeddings of the same images (lambda > 0).
            anchor_embeds, anchor_target_embeds: (A, D) the trainable and the frozen starting adapter's embeddings of
                the batch's text-anchor captions (mu > 0).

        Returns:
            `{"loss", "contrastive"}`, plus `"instance", "structure", "distillation"` when lambda > 0 and
            `"text_anchor"` when mu > 0: scalars, where `distillation` = instance + structure_weight * structure and
            `loss` = contrastive + lambda * distillation + mu * text_anchor.
        """
        out = super().forward(image_embeds, text_embeds, logit_scale)
        if self.distill_weight > 0:
            out["instance"] = instance_alignment(image_embeds, teacher_image_embeds, self.reduction)
            out["structure"] = structure_alignment(
                image_embeds, teacher_image_embeds, self.structure_form, self.reduction
            )
            out["distillation"] = out["instance"] + self.structure_weight * out["structure"]
            out["loss"] = out["contrastive"] + self.distill_weight * out["distillation"]
        if self.text_anchor_weight > 0:
            out["text_anchor"] = self.text_anchor(anchor_embeds, anchor_target_embeds)
            out["loss"] = out["loss"] + self.text_anchor_weight * out["text_anchor"]
        return out

    def text_anchor(self, anchor_embeds: Tensor, anchor_target_embeds: Tensor) -> Tensor:
        """L_anchor: the instance term between the adapter's (A, D) anchor embeddings and their frozen targets."""
        return instance_alignment(anchor_embeds, anchor_target_embeds, self.reduction)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _checked(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
