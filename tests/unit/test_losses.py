"""Each loss against a hand computation: explicit loops over rows and pairs in float64 Python arithmetic."""

import math

import pytest
import torch
import torch.nn.functional as F
from proclip_train.training.losses import (
    ContrastiveDistillationLoss,
    ContrastiveLoss,
    InheritanceLoss,
    gather_features,
    instance_alignment,
    pairwise_distances,
    structure_alignment,
)

REDUCTIONS = ["sum", "mean"]
FORMS = ["upstream", "paper"]


# ---- hand computations ---------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> list[list[float]]:
    rows = x.double().tolist()
    return [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in rows]


def sq_dist(a: list[float], b: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b))


def smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def hand_instance(student, teacher, reduction):
    s, t = unit(student), unit(teacher)
    total = sum(sq_dist(s[i], t[i]) for i in range(len(s)))
    return total if reduction == "sum" else total / len(s)


def hand_structure(student, teacher, form, reduction):
    s, t = unit(student), unit(teacher)
    terms = []
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            if form == "upstream":
                terms.append(smooth_l1(math.sqrt(sq_dist(s[i], s[j])) - math.sqrt(sq_dist(t[i], t[j]))))
            else:
                terms.append(abs(sq_dist(s[i], s[j]) - sq_dist(t[i], t[j])))
    return sum(terms) if reduction == "sum" else sum(terms) / len(terms)


def hand_info_nce(image, text, log_scale):
    v, t = unit(image), unit(text)
    scale = math.exp(log_scale)
    n = len(v)

    def mean_ce(queries, keys):
        total = 0.0
        for i in range(n):
            logits = [scale * sum(a * b for a, b in zip(queries[i], keys[j])) for j in range(n)]
            log_norm = math.log(sum(math.exp(z) for z in logits))
            total += log_norm - logits[i]
        return total / n

    return 0.5 * (mean_ce(v, t) + mean_ce(t, v))


def close(value: torch.Tensor, expected: float, rel: float = 1e-5) -> bool:
    return value.item() == pytest.approx(expected, rel=rel, abs=1e-6)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)


@pytest.fixture
def far_pair():
    """Student rows nearly coincide while teacher rows sit at antipodes: |d_s - d_t| > 1 on some pairs, so the
    linear branch of smooth-L1 is exercised next to the quadratic one."""
    g = torch.Generator().manual_seed(1)
    student = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.3 * torch.randn(5, 4, generator=g)
    teacher = torch.randn(5, 4, generator=g)
    teacher[1::2] = -teacher[0:-1:2] + 0.05 * torch.randn(2, 4, generator=g)
    return student, teacher


# ---- pairwise distances -----------------------------------------------------------------------------------


def test_pairwise_distances_match_pdist_order_and_loops(pair):
    x = pair[0]
    rows = x.double().tolist()
    expected = [sq_dist(rows[i], rows[j]) for i in range(6) for j in range(i + 1, 6)]
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(pairwise_distances(x, squared=True), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pairwise_distances(x), F.pdist(x), rtol=1e-5, atol=1e-6)


def test_pairwise_distances_have_finite_zero_gradient_at_coinciding_rows():
    # Seeded, as every test here: unseeded, it drew whatever the tests before it left in torch's generator. In float32
    # the Gram matrix puts two equal rows at d^2 ~ 1e-7, not 0, and the gradient then matches pdist's only to ~1e-4
    # (146 of 2000 seeds miss rtol=1e-4), so the suite's order decided whether this test passed.
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    x[2] = x[0]
    x.requires_grad_(True)
    pairwise_distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # Rows 0 and 2 coincide: their pair contributes nothing, each keeps the gradient of its distances to 1 and 3.
    reference = x.detach().clone().requires_grad_(True)
    d = F.pdist(reference)
    keep = torch.ones_like(d, dtype=torch.bool)
    keep[1] = False  # pair (0, 2) in pdist order (0,1), (0,2), (0,3), (1,2), ...
    d[keep].sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)


# ---- stage 1 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_instance_alignment_equals_hand_computation(pair, reduction):
    student, teacher = pair
    assert close(instance_alignment(student, teacher, reduction), hand_instance(student, teacher, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("data", ["pair", "far_pair"])
def test_structure_alignment_equals_hand_computation(data, form, reduction, request):
    student, teacher = request.getfixturevalue(data)
    value = structure_alignment(student, teacher, form, reduction)
    assert close(value, hand_structure(student, teacher, form, reduction), rel=1e-4)


def test_far_pair_exercises_both_smooth_l1_branches(far_pair):
    gaps = (pairwise_distances(F.normalize(far_pair[0])) - pairwise_distances(F.normalize(far_pair[1]))).abs()
    assert (gaps < 1).any() and (gaps > 1).any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORMS)
def test_inheritance_loss_is_instance_plus_structure(pair, form, reduction):
    student, teacher = pair
    out = InheritanceLoss(reduction=reduction, structure_form=form)(student, teacher)
    assert set(out) == {"loss", "instance", "structure"}
    expected = hand_instance(student, teacher, reduction) + hand_structure(student, teacher, form, reduction)
    assert close(out["loss"], expected, rel=1e-4)
    assert close(out["instance"], hand_instance(student, teacher, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_caption_view_adds_its_own_instance_term_only(pair, reduction):
    student, teacher = pair
    g = torch.Generator().manual_seed(2)
    student_extra, teacher_extra = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = InheritanceLoss(reduction=reduction)
    out = loss(student, teacher, student_extra, teacher_extra)
    single = loss(student, teacher)
    extra = hand_instance(student_extra, teacher_extra, reduction)
    assert close(out["instance_extra"], extra)
    assert close(out["structure"], single["structure"].item())
    assert close(out["loss"], single["loss"].item() + extra, rel=1e-4)
    with pytest.raises(ValueError, match="together"):
        loss(student, teacher, student_extra=student_extra)


def test_upstream_defaults_equal_upstream_code_in_value_and_gradient(pair):
    """ProCLIP's stage-1 code: mse_loss(sum) + smooth_l1_loss(pdist(s), pdist(t), sum) on normalised features."""
    student, teacher = pair[0].clone().requires_grad_(True), pair[1]
    out = InheritanceLoss()(student, teacher)
    out["loss"].backward()

    reference = pair[0].clone().requires_grad_(True)
    s, t = F.normalize(reference), F.normalize(teacher)
    upstream = F.mse_loss(s, t, reduction="sum") + F.smooth_l1_loss(F.pdist(s), F.pdist(t), reduction="sum")
    upstream.backward()
    torch.testing.assert_close(out["loss"], upstream)
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_embeddings_are_normalised_inside_and_teacher_gets_no_gradient(pair):
    student, teacher = pair[0], pair[1].clone().requires_grad_(True)
    scales = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0], [0.1]])
    loss = InheritanceLoss()
    torch.testing.assert_close(loss(student * scales, teacher * scales)["loss"], loss(student, teacher)["loss"])
    assert not loss(student, teacher)["loss"].requires_grad


def test_single_row_has_no_pairs_and_a_finite_mean():
    out = InheritanceLoss(reduction="mean")(torch.randn(1, 4), torch.randn(1, 4))
    assert out["structure"].item() == 0.0 and torch.isfinite(out["loss"])


@pytest.mark.parametrize("form", FORMS)
def test_duplicate_rows_give_finite_gradients(form):
    """A caption twice in a batch: coinciding student rows, teacher rows that coincide or not."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 4, generator=g)
    student[3] = student[1]
    teacher = torch.randn(5, 4, generator=g)
    for teacher_rows in (teacher, torch.cat([teacher[:3], teacher[1:2], teacher[4:]])):
        leaf = student.clone().requires_grad_(True)
        out = InheritanceLoss(structure_form=form)(leaf, teacher_rows, leaf, teacher_rows)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(leaf.grad).all()

    image = student.clone().requires_grad_(True)
    ContrastiveDistillationLoss(structure_form=form)(image, teacher, torch.tensor(2.0), image.detach())[
        "loss"
    ].backward()
    assert torch.isfinite(image.grad).all()


# ---- stage 2 ---------------------------------------------------------------------------------------------


def test_contrastive_loss_equals_hand_info_nce(pair):
    image, text = pair
    out = ContrastiveLoss()(image, text, torch.tensor(math.log(10.0)))
    assert set(out) == {"loss", "contrastive"}
    assert close(out["loss"], hand_info_nce(image, text, math.log(10.0)))


def test_contrastive_loss_takes_the_log_scale_and_differentiates_it(pair):
    image, text = pair
    log_scale = torch.tensor(1.5, requires_grad=True)
    ContrastiveLoss()(image, text, log_scale)["loss"].backward()
    h = 1e-4
    numeric = (hand_info_nce(image, text, 1.5 + h) - hand_info_nce(image, text, 1.5 - h)) / (2 * h)
    assert log_scale.grad.item() == pytest.approx(numeric, rel=1e-3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORMS)
def test_contrastive_distillation_adds_weighted_self_distillation(pair, form, reduction):
    image, text = pair
    teacher = image + 0.2 * torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    out = ContrastiveDistillationLoss(distill_weight=0.3, reduction=reduction, structure_form=form)(
        image, text, torch.tensor(2.0), teacher
    )
    info = hand_info_nce(image, text, 2.0)
    instance = hand_instance(image, teacher, reduction)
    structure = hand_structure(image, teacher, form, reduction)
    assert close(out["contrastive"], info)
    assert close(out["instance"], instance)
    assert close(out["structure"], structure, rel=1e-4)
    assert close(out["distillation"], instance + structure, rel=1e-4)
    assert close(out["loss"], info + 0.3 * (instance + structure), rel=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distill_weight", [0.0, 0.3])
def test_stage2_objective_adds_the_weighted_text_anchor(pair, reduction, distill_weight):
    """The whole stage-2 sum in one module: InfoNCE + lambda * L_reg (when lambda > 0) + mu * L_ins(anchor)."""
    image, text = pair
    generator = torch.Generator().manual_seed(5)
    teacher = image + 0.2 * torch.randn(6, 5, generator=generator)
    anchor, target = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    loss = ContrastiveDistillationLoss(distill_weight, reduction, text_anchor_weight=0.7)
    out = loss(image, text, torch.tensor(2.0), teacher if distill_weight else None, anchor, target)
    regulariser = hand_instance(image, teacher, reduction) + hand_structure(image, teacher, "upstream", reduction)
    expected = hand_info_nce(image, text, 2.0) + distill_weight * regulariser + 0.7 * hand_instance(anchor, target,
                                                                                                    reduction)
    assert close(out["text_anchor"], hand_instance(anchor, target, reduction))
    assert close(out["loss"], expected, rel=1e-4)
    assert ("distillation" in out) == (distill_weight > 0)
    plain = ContrastiveDistillationLoss(0.0)(image, text, torch.tensor(2.0))
    assert set(plain) == {"loss", "contrastive"}
    torch.testing.assert_close(plain["loss"], ContrastiveLoss()(image, text, torch.tensor(2.0))["loss"])


def test_losses_run_in_float32_under_bf16_autocast(pair):
    image, text = pair
    teacher = image.flip(0)
    loss = ContrastiveDistillationLoss()
    plain = loss(image, text, torch.tensor(math.log(100.0)), teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(image, text, torch.tensor(math.log(100.0)), teacher)
    for key in plain:
        assert autocast[key].dtype == torch.float32
        torch.testing.assert_close(autocast[key], plain[key])


def test_gather_features_is_identity_for_one_process_and_refuses_a_missing_group():
    x = torch.randn(3, 2)
    assert gather_features(x, rank=0, world_size=1) is x
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_features(x, rank=1, world_size=2)


def test_unknown_options_are_refused(pair):
    with pytest.raises(ValueError, match="reduction"):
        InheritanceLoss(reduction="none")
    with pytest.raises(ValueError, match="structure_form"):
        ContrastiveDistillationLoss(structure_form="rkd")
    with pytest.raises(ValueError, match="reduction"):
        instance_alignment(*pair, reduction="batchmean")
