import math

import pytest
import torch

from recsys_llm.modules.distillation import RepresentationDistillation, ScoreDistillation
from recsys_llm.train.config import ConfigError, load_config


class TestScoreDistillation:
    def test_bce_matches_formula(self):
        torch.manual_seed(0)
        zs, zt = torch.randn(8), torch.randn(8)
        t = 2.0
        p, q = torch.sigmoid(zt / t), torch.sigmoid(zs / t)
        expected = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).mean() * t * t
        torch.testing.assert_close(ScoreDistillation(t, "bce")(zs, zt), expected)

    def test_kl_matches_formula_and_is_zero_at_teacher(self):
        torch.manual_seed(1)
        zs, zt = torch.randn(8), torch.randn(8)
        p, q = torch.sigmoid(zt / 3.0), torch.sigmoid(zs / 3.0)
        expected = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean() * 9.0
        kd = ScoreDistillation(3.0, "kl")
        torch.testing.assert_close(kd(zs, zt), expected)
        assert abs(float(kd(zt.clone(), zt))) < 1e-6

    def test_gradient_only_reaches_student(self):
        zs = torch.tensor([0.3, -1.0], requires_grad=True)
        zt = torch.tensor([1.0, 2.0], requires_grad=True)
        ScoreDistillation(1.0)(zs, zt).backward()
        assert zt.grad is None
        # d/dzs of mean BCE = (sigmoid(zs) - sigmoid(zt)) / B
        torch.testing.assert_close(zs.grad, (torch.sigmoid(zs) - torch.sigmoid(zt)).detach() / 2)

    def test_kl_of_an_infinite_teacher_logit_is_finite(self):
        """A teacher logit of +-inf (fp16 overflow) made the entropy inf - inf: a NaN loss, a finite gradient."""
        zs = torch.zeros(2, requires_grad=True)
        for kind in ("bce", "kl"):
            loss = ScoreDistillation(1.0, kind)(zs, torch.tensor([float("inf"), -float("inf")]))
            assert math.isfinite(float(loss)), kind
        torch.testing.assert_close(ScoreDistillation(1.0, "kl")(zs, torch.tensor([float("inf"), -float("inf")])),
                                   torch.tensor(math.log(2.0)))  # KL(1 || 0.5) = log 2 per row

    @pytest.mark.parametrize("kind", ["bce", "kl"])
    def test_a_half_precision_student_distils_against_float32_targets(self, kind):
        """Under autocast a bf16 student rounded the float32 teacher's target to bf16: near the teacher the
        gradient q - p was mostly rounding."""
        torch.manual_seed(3)
        teacher = torch.randn(4096) * 3
        student = (teacher + 0.01 * torch.randn(4096)).bfloat16().requires_grad_()
        loss = ScoreDistillation(2.0, kind)(student, teacher)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, student)
        exact = (torch.sigmoid(student.detach().float() / 2) - torch.sigmoid(teacher / 2)) * 2 / 4096
        assert float((grad.float() - exact).norm() / exact.norm()) < 0.02  # bf16 rounding of the gradient alone

    def test_bad_settings(self):
        with pytest.raises(ValueError, match="temperature"):
            ScoreDistillation(0.0)
        with pytest.raises(ValueError, match="kind"):
            ScoreDistillation(1.0, "mse")
        # NaN passed `temperature <= 0` and made every loss NaN
        for bad in (float("nan"), float("inf"), "2"):
            with pytest.raises(ValueError, match="ScoreDistillation: temperature must be a finite number > 0"):
                ScoreDistillation(bad)
        with pytest.raises(ValueError, match="RepresentationDistillation: teacher_dim must be an integer >= 1, got 0"):
            RepresentationDistillation(4, 0)


class TestRepresentationDistillation:
    def test_mse_identity_when_sizes_match(self):
        torch.manual_seed(2)
        hs, ht = torch.randn(4, 6), torch.randn(4, 6)
        kd = RepresentationDistillation(6, 6, "mse")
        assert isinstance(kd.projection, torch.nn.Identity)
        torch.testing.assert_close(kd(hs, ht), ((hs - ht) ** 2).mean())

    def test_cosine_with_projection(self):
        torch.manual_seed(3)
        kd = RepresentationDistillation(4, 6, "cosine")
        hs, ht = torch.randn(5, 4), torch.randn(5, 6)
        projected = kd.projection(hs)
        expected = (1 - torch.nn.functional.cosine_similarity(projected, ht, dim=-1)).mean()
        torch.testing.assert_close(kd(hs, ht), expected)
        with torch.no_grad():  # the loss of a target along the projection, as a number
            assert kd(hs, 3.0 * kd.projection(hs)).item() == pytest.approx(0.0, abs=1e-6)

    @pytest.mark.parametrize("kind", ["mse", "cosine"])
    def test_representations_of_other_rows_are_refused_not_broadcast(self, kind):
        kd = RepresentationDistillation(4, 6, kind)
        for teacher in (torch.randn(1, 6), torch.randn(6), torch.randn(3, 6)):  # e.g. one row, or a mean over rows
            with pytest.raises(ValueError, match=r"the student's \(B, 4\) and the teacher's \(B, 6\) representations "
                                                 r"of the same B rows, got \(5, 4\) and"):
                kd(torch.randn(5, 4), teacher)

    def test_a_half_precision_student_is_compared_with_float32_targets(self):
        torch.manual_seed(4)
        kd = RepresentationDistillation(16, 16)
        teacher = torch.randn(512, 16)
        student = (teacher + 0.01 * torch.randn(512, 16)).bfloat16()
        loss = kd(student, teacher)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ((student.float() - teacher) ** 2).mean())

    def test_training_the_projection_lowers_the_loss(self):
        torch.manual_seed(4)
        hs = torch.randn(64, 4)
        ht = hs @ torch.randn(4, 8)  # a linear map exists
        kd = RepresentationDistillation(4, 8, "mse")
        optimizer = torch.optim.Adam(kd.parameters(), lr=0.05)
        first = kd(hs, ht).detach().item()
        for _ in range(200):
            optimizer.zero_grad()
            loss = kd(hs, ht)
            loss.backward()
            optimizer.step()
        assert loss.detach().item() < 0.05 * first and not math.isnan(loss.detach().item())


def test_score_kd_without_temperature_scaling_is_the_term_at_its_size_at_t() -> None:
    """elec.distill.temperature_scaling (ours): the T² of Hinton et al. is a choice the paper does not make."""
    zs, zt = torch.randn(16, generator=torch.Generator().manual_seed(1)), torch.randn(16)
    for kind in ("bce", "kl"):
        scaled = ScoreDistillation(3.0, kind)(zs, zt)
        torch.testing.assert_close(ScoreDistillation(3.0, kind, scale_by_temperature=False)(zs, zt), scaled / 9.0)
    config = load_config(None, ["elec.task=distill", "elec.distill.temperature_scaling=false", "data.schema=x"])
    assert config.elec["distill"]["temperature_scaling"] is False  # a config key; refused when mistyped
    with pytest.raises(ConfigError, match="temperature_scaling"):
        load_config(None, ["elec.task=distill", "elec.distill.temperature_scaling=maybe", "data.schema=x"])


@pytest.mark.parametrize("bad", ["false", 0, None])
def test_scale_by_temperature_is_a_bool(bad):
    """ScoreDistillation(2.0, "kl", "false") scaled by T² ("false" is truthy)."""
    with pytest.raises(ValueError, match="ScoreDistillation: scale_by_temperature must be True or False"):
        ScoreDistillation(2.0, "kl", bad)


class TestCosineDistillationAtExtremeNorms:
    """1 - cos against a float64 reference, where F.cosine_similarity's eps clamp and float32 norms gave way."""

    @staticmethod
    def _reference(student: torch.Tensor, teacher: torch.Tensor) -> float:
        s, t = student.double(), teacher.double()
        return float((1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean())

    @pytest.mark.parametrize("scale", [1e-12, 1.0, 1e4, 1e25])
    def test_matches_the_float64_cosine_at_any_norm(self, scale):
        torch.manual_seed(5)
        student, teacher = torch.randn(3, 4) * scale, torch.randn(3, 4) * scale
        kd = RepresentationDistillation(4, 4, "cosine")
        assert kd(student, teacher).item() == pytest.approx(self._reference(student, teacher), rel=1e-6)

    def test_a_zero_student_row_counts_cos_0_and_sends_no_gradient(self):
        torch.manual_seed(6)
        student = torch.randn(2, 4)
        student[0] = 0.0  # e.g. every ReLU of the last layer off for that sample
        student.requires_grad_()
        teacher = torch.randn(2, 4)
        loss = RepresentationDistillation(4, 4, "cosine")(student, teacher)
        loss.backward()
        expected = (1.0 + 1.0 - float(torch.nn.functional.cosine_similarity(student[1:].detach(), teacher[1:])[0])) / 2
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert torch.equal(student.grad[0], torch.zeros(4))  # was ~1e8 / B (the 1e-8 eps of cosine_similarity)
        assert bool(student.grad.isfinite().all())

    def test_zero_teacher_row_and_nan_row(self):
        kd = RepresentationDistillation(4, 4, "cosine")
        assert kd(torch.ones(1, 4), torch.zeros(1, 4)).item() == 1.0
        assert math.isnan(kd(torch.tensor([[float("nan"), 1.0, 1.0, 1.0]]), torch.ones(1, 4)).item())

    def test_gradient_matches_gradcheck_in_float64(self):
        torch.manual_seed(7)
        kd = RepresentationDistillation(4, 4, "cosine").double()
        student = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
        teacher = torch.randn(3, 4, dtype=torch.double)
        assert torch.autograd.gradcheck(lambda s: kd(s, teacher), (student,))
