"""CTR metrics: exact AUC/LogLoss/NE, per-subset metrics, and exact reduction over ranks."""

import math

import pytest
import torch

from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import CTRMetrics, binary_metrics
from tests.multiprocess import run_multiprocess


def _pairwise_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC by its definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).float()
    logits = torch.randn(n, generator=g) + labels  # informative
    logits = torch.round(logits * 4) / 4  # many ties
    cold = torch.rand(n, generator=g) < 0.25
    return logits, labels, cold


class TestBinaryMetrics:
    def test_matches_definitions(self) -> None:
        logits, labels, _ = _data(500, 0)
        p = torch.sigmoid(logits.double())
        out = binary_metrics(p, labels)
        assert out["auc"] == pytest.approx(_pairwise_auc(p, labels), abs=1e-6)  # torchmetrics returns float32
        logloss = float(torch.nn.functional.binary_cross_entropy(p, labels.double()))
        assert out["logloss"] == pytest.approx(logloss, rel=1e-9)
        ctr = float(labels.mean())
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
        assert out["ne"] == pytest.approx(logloss / entropy, rel=1e-6)
        assert out["num_samples"] == 500 and out["ctr"] == pytest.approx(ctr)

    def test_logloss_from_confident_logits_is_exact(self) -> None:
        """From logits, each row's cross-entropy is softplus(l) - y l exactly, also for confident logits (|l| of 6 to
        35, where an early switch of softplus to l itself would be off by up to e^-6 per row)."""
        logits = torch.tensor([6.0, -7.0, 9.0, -12.0, 20.0, 35.0, 6.5, -8.0], dtype=torch.float64)
        labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        out = binary_metrics(torch.sigmoid(logits), labels, logits)
        reference = -(labels * torch.nn.functional.logsigmoid(logits)
                      + (1 - labels) * torch.nn.functional.logsigmoid(-logits)).mean()
        assert out["logloss"] == pytest.approx(float(reference), rel=1e-12)

    def test_calibration_is_predicted_over_actual_clicks_as_torchrec_computes_it(self) -> None:
        """The predicted clicks over the clicks: torchrec's CalibrationMetric, which a CTR model's users watch beside
        AUC and NE (a model can rank well and still predict twice the clicks)."""
        from torchrec.metrics.calibration import compute_calibration

        probabilities = torch.tensor([0.1, 0.4, 0.8, 0.3, 0.9], dtype=torch.float64)
        labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
        out = binary_metrics(probabilities, labels)
        assert out["calibration"] == pytest.approx(2.5 / 2.0)
        torchrec_value = compute_calibration(probabilities.sum(), labels.double().sum())
        assert out["calibration"] == pytest.approx(float(torchrec_value))
        assert math.isnan(binary_metrics(probabilities, torch.zeros(5))["calibration"])  # no click: undefined
        # the predictions as they are (LogLoss clamps them away from 0 and 1; torchrec's calibration does not)
        assert binary_metrics(torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, 0.0]))["calibration"] == 0.0

    def test_no_rows_give_every_metric_as_nan(self) -> None:
        """An empty set (e.g. a subset no row of the test split is in) has the keys of any other, each NaN."""
        out = binary_metrics(torch.zeros(0), torch.zeros(0))
        assert set(out) == set(binary_metrics(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 1.0])))
        assert out["num_samples"] == 0.0
        assert all(math.isnan(value) for key, value in out.items() if key != "num_samples"), out

    def test_one_class_gives_nan_auc(self) -> None:
        out = binary_metrics(torch.full((4,), 0.3), torch.ones(4))
        assert math.isnan(out["auc"]) and out["logloss"] > 0

    @pytest.mark.parametrize("label", [0.0, 1.0])
    def test_one_class_gives_nan_ne(self, label: float) -> None:
        # the entropy of a one-class label set is 0: NE is undefined, not a huge number
        out = binary_metrics(torch.tensor([0.2, 0.6, 0.9]), torch.full((3,), label))
        assert math.isnan(out["ne"]) and math.isfinite(out["logloss"])

    def test_a_saturated_probability_gives_a_finite_logloss(self) -> None:
        """sigmoid of a logit beyond ~37 is exactly 1.0 in float64: clamped to 1 - 1e-12, not log(0)."""
        out = binary_metrics(torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        assert out["logloss"] == pytest.approx((2 * -math.log(1e-12) + 2 * math.log(2)) / 4, rel=1e-6)
        assert math.isfinite(out["ne"])

    def test_subset_and_missing_mask(self) -> None:
        logits, labels, cold = _data(400, 1)
        metrics = CTRMetrics({"cold": "is_cold_item"})
        metrics.update(logits[:150], labels[:150], {"is_cold_item": cold[:150]})
        metrics.update(logits[150:], labels[150:], {"is_cold_item": cold[150:]})
        out = metrics.compute()
        p = torch.sigmoid(logits.double())
        assert out["cold/auc"] == pytest.approx(_pairwise_auc(p[cold], labels[cold]), abs=1e-6)  # torchmetrics returns float32
        assert out["cold/num_samples"] == float(cold.sum())
        with pytest.raises(KeyError, match="needs batch extra 'is_cold_item'"):
            metrics.update(logits, labels, {})


def _ranked_metrics(sizes):
    ctx = init_distributed("cpu")
    logits, labels, cold = _data(sum(sizes), 2)
    start = sum(sizes[: ctx.rank])
    part = slice(start, start + sizes[ctx.rank])
    metrics = CTRMetrics({"cold": "is_cold_item"})
    # Uneven sizes per rank and per batch.
    for chunk in torch.arange(part.start, part.stop).split(37):
        metrics.update(logits[chunk], labels[chunk], {"is_cold_item": cold[chunk]})
    return metrics.compute()


@pytest.mark.multiprocess
@pytest.mark.parametrize("sizes", [[230, 170], [0, 170, 40]])
def test_metrics_over_ranks_equal_single_process(sizes) -> None:
    """Rank 0 computes them from every rank's share (one of them may hold no row) and sends them to the others."""
    per_rank = run_multiprocess(_ranked_metrics, world_size=len(sizes), sizes=sizes)
    logits, labels, cold = _data(sum(sizes), 2)
    single = CTRMetrics({"cold": "is_cold_item"})
    single.update(logits, labels, {"is_cold_item": cold})
    expected = single.compute()
    for result in per_rank:
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-12), key


def test_a_subset_of_every_row_gives_the_whole_sets_metrics_with_extreme_logits() -> None:
    """torchrec's cross entropy clamps its input in place: the NE of the whole set clamped the shared
    probabilities to [1e-12, 1 - 1e-12], which tied the extreme logits of every subset's AUC."""
    logits = torch.tensor([-40.0, -35.0, -30.0, 0.0, 30.0, 35.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    metrics = CTRMetrics({"all": "every_row"})
    metrics.update(logits, labels, {"every_row": torch.ones(6)})
    out = metrics.compute()
    assert out["auc"] == pytest.approx(_pairwise_auc(logits, labels), abs=1e-6)
    for metric in ("auc", "logloss", "ne", "num_samples", "ctr", "calibration"):
        assert out[f"all/{metric}"] == out[metric], metric


def test_binary_metrics_leaves_its_input_alone() -> None:
    probabilities = torch.sigmoid(torch.tensor([-40.0, 0.5, 40.0], dtype=torch.float64))
    before = probabilities.clone()
    binary_metrics(probabilities, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(probabilities, before)


def test_the_auc_ranks_logits_whose_probabilities_round_to_one() -> None:
    """sigmoid of every logit beyond ~37 is 1.0 in float64: ranked by probability, 40 / 50 / 60 / 70 tied
    and the AUC was 0.6667 instead of 0.8333."""
    logits = torch.tensor([40.0, 50.0, 60.0, 70.0, 0.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    metrics = CTRMetrics({"all": "every_row"})
    metrics.update(logits, labels, {"every_row": torch.ones(5)})
    out = metrics.compute()
    assert out["auc"] == pytest.approx(_pairwise_auc(logits, labels), rel=1e-12)
    assert out["all/auc"] == out["auc"]


def test_the_auc_is_exact_over_many_ties() -> None:
    logits, labels, _ = _data(3000, 3)
    out = binary_metrics(torch.sigmoid(logits.double()), labels)
    assert out["auc"] == pytest.approx(_pairwise_auc(logits, labels), rel=1e-12)


def test_the_logloss_of_logits_beyond_float32s_reach_is_that_of_the_logits() -> None:
    """sigmoid(20) is 1 - 2e-9 in float64 but 1.0 in float32: a float32 sigmoid clamped it to 1 - 1e-12 and
    counted 27.6 nats for a negative at logit 20 instead of its 20."""
    logits = torch.tensor([20.0, -20.0, 0.0, 1.0])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    metrics = CTRMetrics()
    metrics.update(logits, labels)
    out = metrics.compute()
    expected = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    assert out["logloss"] == pytest.approx(expected, rel=1e-9)
    assert out["ne"] == pytest.approx(expected / math.log(2), rel=1e-9)  # half clicks: the entropy is log 2


def test_a_reset_starts_every_set_anew_subsets_included() -> None:
    """``evaluate`` resets one CTRMetrics before each evaluation: the next compute is that of the new rows alone."""
    logits, labels, cold = _data(300, 4)
    metrics = CTRMetrics({"cold": "is_cold_item"})
    metrics.update(logits[:100], labels[:100], {"is_cold_item": cold[:100]})
    metrics.compute()
    metrics.reset()
    metrics.update(logits[100:], labels[100:], {"is_cold_item": cold[100:]})
    fresh = CTRMetrics({"cold": "is_cold_item"})
    fresh.update(logits[100:], labels[100:], {"is_cold_item": cold[100:]})
    assert metrics.compute() == fresh.compute()


def test_one_row_has_its_logloss_and_calibration_and_no_auc() -> None:
    """A subset of a single row (e.g. one cold item in a small test split) still has a LogLoss."""
    out = binary_metrics(torch.tensor([0.25], dtype=torch.float64), torch.tensor([1.0]))
    assert out["logloss"] == pytest.approx(math.log(4)) and out["calibration"] == pytest.approx(0.25)
    assert out["num_samples"] == 1.0 and out["ctr"] == 1.0
    assert math.isnan(out["auc"]) and math.isnan(out["ne"])


@pytest.mark.parametrize("marker", [2.0, -1.0])
def test_a_subset_marker_other_than_0_or_1_is_refused_not_counted_in_the_subset(marker: float) -> None:
    """A -1 ("unknown") or 2 in a cold-item column counted as cold (the mask was ``!= 0``)."""
    metrics = CTRMetrics({"cold": "is_cold_item"})
    metrics.update(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                   {"is_cold_item": torch.tensor([1, 0, 1, int(marker)])})
    with pytest.raises(ValueError, match=r"\['is_cold_item'\] hold values other than 0/1"):
        metrics.compute()
    metrics.reset()
    metrics.update(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                   {"is_cold_item": torch.tensor([True, False, True, False])})
    assert metrics.compute()["cold/num_samples"] == 2.0


def _marker_refused_on_every_rank():
    ctx = init_distributed("cpu")
    metrics = CTRMetrics({"cold": "is_cold_item"})
    marker = torch.tensor([1, 0, 2]) if ctx.rank == 1 else torch.tensor([1, 0, 0])  # only rank 1 holds the 2
    metrics.update(torch.tensor([0.1, -0.2, 0.3]), torch.tensor([1.0, 0.0, 1.0]), {"is_cold_item": marker})
    try:
        metrics.compute()
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.multiprocess
def test_a_subset_marker_other_than_0_or_1_on_one_rank_is_refused_on_every_rank() -> None:
    """Every rank raises (rank 0 tells them): none is left waiting in a collective."""
    for message in run_multiprocess(_marker_refused_on_every_rank, world_size=2):
        assert message is not None and "hold values other than 0/1" in message


def test_the_logloss_of_logits_beyond_the_clamp_is_that_of_the_logits() -> None:
    """Probabilities clamped to [1e-12, 1 - 1e-12] capped a row at 27.6 nats: a negative at logit 40 gave a LogLoss
    of 14.16 for these two rows instead of the 20.35 of BCE-with-logits (the run's ``loss``)."""
    logits = torch.tensor([40.0, 0.0, -45.0])
    labels = torch.tensor([0.0, 1.0, 1.0])
    metrics = CTRMetrics({"all": "every_row"})
    metrics.update(logits, labels, {"every_row": torch.ones(3)})
    out = metrics.compute()
    expected = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    assert out["logloss"] == pytest.approx(expected, rel=1e-12) == pytest.approx((40 + math.log(2) + 45) / 3)
    ctr = 2 / 3
    assert out["ne"] == pytest.approx(expected / -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)), rel=1e-9)
    assert out["all/logloss"] == out["logloss"] and out["all/ne"] == out["ne"]


@pytest.mark.parametrize("bad", [["is_cold_item"], "is_cold_item"])
def test_subsets_must_be_a_mapping(bad):
    """CTRMetrics(["is_cold_item"]) failed in dict(): "dictionary update sequence element #0 has length 12"."""
    from recsys_llm.train.metrics import CTRMetrics

    with pytest.raises(TypeError, match="CTRMetrics: subsets must be a mapping of subset name -> extras key"):
        CTRMetrics(bad)


def test_infinite_logits_of_an_fp16_overflow_give_the_logloss_of_their_side_not_nan() -> None:
    """An fp16 logit past 65504 is inf: ``softplus(l) - y l`` was inf - inf = NaN for a positive at +inf (and
    -inf * 0 for a negative at -inf), so LogLoss and NE were NaN; each such row is 0 nats on its correct side and
    inf on its wrong one."""
    logits = torch.tensor([70000.0, -70000.0, 1.0, -1.0]).half()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    metrics = CTRMetrics()
    metrics.update(logits, labels)
    out = metrics.compute()
    expected = 2 * math.log1p(math.exp(-1.0)) / 4
    assert out["logloss"] == pytest.approx(expected, rel=1e-12)
    assert out["ne"] == pytest.approx(expected / math.log(2), rel=1e-12)
    assert out["auc"] == 1.0
    metrics.reset()
    metrics.update(logits, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    wrong = metrics.compute()
    assert wrong["logloss"] == math.inf and wrong["ne"] == math.inf


def test_a_confident_correct_positive_keeps_its_tail() -> None:
    """softplus switched to l itself past 40, so a positive at logit 50 counted 0 nats instead of e^-50: half the
    LogLoss of a set of confident correct rows."""
    logits = torch.tensor([50.0, -50.0], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0])
    out = binary_metrics(torch.sigmoid(logits), labels, logits)
    assert out["logloss"] == pytest.approx(math.exp(-50.0), rel=1e-12, abs=0.0)


def test_soft_labels_keep_the_logloss_of_bce_with_logits() -> None:
    logits = torch.tensor([3.0, -2.0, 0.5, 45.0], dtype=torch.float64)
    labels = torch.tensor([0.25, 0.75, 0.5, 0.9], dtype=torch.float64)
    out = binary_metrics(torch.sigmoid(logits), labels, logits)
    expected = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    assert out["logloss"] == pytest.approx(expected, rel=1e-12)


def test_a_nan_logit_gives_nan_auc_not_a_ranking() -> None:
    # argsort ranks NaN above every score: the positive NaN row made an AUC of 0 look like 0.5
    logits = torch.tensor([float("nan"), 0.5, -0.5])
    labels = torch.tensor([1.0, 0.0, 1.0])
    out = binary_metrics(torch.sigmoid(logits.double()), labels, logits)
    assert math.isnan(out["auc"]) and math.isnan(out["logloss"]) and math.isnan(out["ne"])
    assert binary_metrics(torch.sigmoid(logits[1:].double()), labels[1:], logits[1:])["auc"] == 0.0
