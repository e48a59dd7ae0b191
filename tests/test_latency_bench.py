"""The benchmark side of the latency search, on made-up run records (nothing is timed): the per-row prediction
check of bench_models.py and the CUDA table of cuda_tables.py."""
from __future__ import annotations

import pytest


def test_each_prediction_row_is_checked_against_10_percent():
    from bench_models import PREDICTION_TARGET, prediction_checks
    rows = [{"model": "vgg16/auto-latency", "device": "cpu", "mode": "compile", "batch": 1, "scaled_error": 0.08,
             "scaled_ms": 5.4, "measured_ms": 5.0, "predicted_ms": 6.0, "error": 0.2},
            {"model": "resnet18/auto-macs", "device": "cpu", "mode": "compile", "batch": 1, "scaled_error": -0.25,
             "scaled_ms": 7.5, "measured_ms": 10.0, "predicted_ms": 9.0, "error": -0.1}]
    checks = prediction_checks(rows)
    assert PREDICTION_TARGET == 0.10
    assert [c["ok"] for c in checks] == [True, False] and [c["value"] for c in checks] == [0.08, -0.25]
    assert "10%" in checks[0]["check"] and "batch 1" in checks[0]["check"]
    assert "predicted 7.50 ms, measured 10.00 ms" in checks[1]["detail"] and "-10.0%" in checks[1]["detail"]


def test_the_prediction_is_checked_against_the_ratio_timed_in_alternation():
    from bench_models import prediction_checks, predictions
    lm = {"mode": "compile", "saved_ms": 3.0, "sites_ms": 6.0, "conv_ms": 4.0, "block_ms": 1.0}
    results = [_result("resnet18", 1, "compile", 10.0, device="cpu"),
               _result("resnet18/auto-macs", 1, "compile", 4.0, device="cpu", latency_model=lm)]
    pairs = [{"a": "resnet18/auto-macs", "b": "resnet18", "device": "cpu", "batch": 1, "ratio": 0.55}]
    (q,) = predictions(results, pairs)
    # by hand: scaled = 10 * (1 - 3/6) = 5 ms against 4 ms measured in separate runs: +25%; the predicted ratio
    # 1 - 3/6 = 0.5 against 0.55 measured in alternation: 0.5 / 0.55 - 1 = -9.09%
    assert q["scaled_ms"] == pytest.approx(5.0) and q["scaled_error"] == pytest.approx(0.25)
    assert q["predicted_ratio"] == pytest.approx(0.5) and q["paired_error"] == pytest.approx(-1 / 11)
    (check,) = prediction_checks([q])
    assert check["ok"] and check["value"] == -0.091 and "ratio to the model" in check["check"]
    assert "measured 0.550 (alternating pairs)" in check["detail"] and "+25.0%" in check["detail"]
    (alone,) = predictions(results)  # no pair: the separate runs' error is what is checked
    assert "paired_error" not in alone and not prediction_checks([alone])[0]["ok"]


def _result(model, batch, mode, ms, **extra):
    return {"model": model, "batch": batch, "mode": mode, "median_ms": ms, "macs": 1_000_000_000, **extra}


def test_the_cuda_table_puts_each_mode_in_its_column_and_names_the_device():
    from cuda_tables import markdown, rows
    verified = {"chosen": "macs", "models": {"macs": {"scaled_error": -0.04}, "latency": {"scaled_error": 0.3}}}
    docs = {
        "vgg16": {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu_model": "Xeon", "cpu_count": 16},
                  "config": {"mode": None},
                  "results": [_result("vgg16", 1, "eager", 2.0), _result("vgg16", 1, "compile", 1.0),
                              _result("vgg16/auto-latency", 1, "eager", 4.0, verified=verified, assignment=[["S"]]),
                              _result("vgg16/auto-latency", 1, "compile", 0.5, verified=verified,
                                      assignment=[["S"]])]},
        "cudagraphs": {"config": {"mode": "reduce-overhead"},
                       "results": [_result("vgg16", 1, "compile", 0.4),
                                   _result("vgg16/auto-latency", 1, "compile", 0.8, verified=verified)]},
    }
    table, machine = rows(docs)
    by = {(r["model"], r["batch"]): r for r in table}
    base, auto = by[("vgg16", 1)], by[("vgg16/auto-latency", 1)]
    assert (base["eager"], base["compile"], base["reduce-overhead"]) == (2.0, 1.0, 0.4)
    assert auto["x_compile"] == pytest.approx(2.0) and auto["x_reduce-overhead"] == pytest.approx(0.5)
    assert auto["check"] == "kept macs, prediction -4%"
    md = markdown(table, machine, ["- step vgg16: done in 12 s"])
    assert "NVIDIA H100 80GB HBM3" in md.splitlines()[0]
    assert "| vgg16/auto-latency | 1 | 1000 | 4.00 (0.50x) | 0.50 (2.00x) | 0.80 (0.50x) | kept macs, prediction -4% |" \
        in md
    assert "| vgg16 | 1 | 1000 | 2.00 | 1.00 | 0.40 |" in md and "- step vgg16: done in 12 s" in md
