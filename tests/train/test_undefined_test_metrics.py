"""A test split of one class has no AUC: training says so, as it does for the validation split."""
import math
import warnings

import pytest

from recsys_llm.train.runner import warn_undefined_test_metrics


def test_a_test_split_of_one_class_is_named():
    with pytest.warns(UserWarning, match=r"test AUC and NE are undefined .* 1 row\(s\) hold one class only "
                                         r"\(click rate 1\.000\)"):
        warn_undefined_test_metrics({"auc": math.nan, "ne": math.nan, "ctr": 1.0, "num_samples": 1.0})


def test_a_defined_auc_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_undefined_test_metrics({"auc": 0.7, "ne": 0.9, "ctr": 0.3, "num_samples": 10.0})


def test_a_test_split_without_a_click_says_its_calibration_is_undefined_too():
    """It said "its LogLoss and calibration stand" while the table printed calibration nan (no click to divide by)."""
    with pytest.warns(UserWarning, match=r"test AUC, NE and calibration are undefined .* \(click rate 0\.000\); "
                                         r"its LogLoss stands \(calibration, predicted over actual clicks, is "
                                         r"undefined without a click\)"):
        warn_undefined_test_metrics({"auc": math.nan, "ne": math.nan, "ctr": 0.0, "calibration": math.nan,
                                     "num_samples": 3.0})
    with pytest.warns(UserWarning, match=r"test AUC and NE are undefined .*; its LogLoss and calibration stand"):
        warn_undefined_test_metrics({"auc": math.nan, "ne": math.nan, "ctr": 1.0, "calibration": 0.8,
                                     "num_samples": 3.0})
