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
