"""bench --transport: the echo carries exactly one step's int8 payload, and a run reports every setting."""

from __future__ import annotations

import pytest
import torch

from splitunet.evaluation.bench.settings import ProblemSize
from splitunet.evaluation.bench.transport import (
    TRANSPORT_VARIANTS,
    TransportVariant,
    make_payload,
    message_bytes,
    payload_bytes,
    run_transport,
    step_layout,
    transport_markdown,
)
from splitunet.wire.codec import entry_bytes, quantize_affine

TINY = ProblemSize("tiny", (32, 32, 32), 2, (4, 4, 8, 8, 16, 4), (0, 1, 2, 3))
NO_X0 = ProblemSize("no_x0", (32, 32, 32), 1, (4, 4, 8, 8, 16, 4), (1, 2, 3))


@pytest.mark.parametrize("problem", [TINY, NO_X0])
def test_the_layout_has_the_bytes_of_the_int8_codec_for_the_step(problem):
    generator = torch.Generator().manual_seed(0)
    expected = 0
    for level in [*problem.skip_levels, 4]:
        size = [s // 2**level for s in problem.crop_size]
        features = torch.randn(problem.batch_size, problem.features[level], *size, generator=generator)
        expected += entry_bytes(*quantize_affine(features, 8))
    layout = step_layout(problem)
    assert payload_bytes(layout) == expected
    assert ("x0" in layout) == (0 in problem.skip_levels)
    for packed in (False, True):
        payload = make_payload(layout, packed, generator)
        assert message_bytes(payload) == expected
        assert (list(payload) == ["packed"]) == packed


def test_the_job_settings_become_config_variables():
    assert TRANSPORT_VARIANTS[0].config_vars() == {}  # FLARE's default: nothing set
    assert TransportVariant("inline", chunk_bytes=0).config_vars() == {"tensor_download_chunk_size": 0}


def test_the_report_marks_the_fastest_setting_and_names_failures():
    def variant(name, seconds, error=None):
        figures = {"seconds_mean": seconds, "seconds_min": seconds, "seconds_max": seconds}
        timed = {} if seconds is None else {**figures, "site_s_mean": 0.1, "hand_out_s_mean": 0.0, "mb_per_s": 5.0}
        return {"name": name, "error": error, **timed}

    report = {
        "command": "splitunet bench --out b --transport",
        "date": "2026-12-04",
        "problem": TINY.to_dict(),
        "sites": 4,
        "message_bytes": 1e6,
        "variants": [variant("slow", 2.0), variant("fast", 1.0), variant("broken", None, "round 0: 1 of 4")],
    }
    text = transport_markdown(report)
    assert "| **fast** |" in text and "| slow |" in text
    assert "| broken | - | - | - | - | round 0: 1 of 4 |" in text


@pytest.mark.e2e
def test_an_echo_run_moves_the_payload_both_ways_under_each_setting(tmp_path):
    variants = (TRANSPORT_VARIANTS[0], TransportVariant("inline, packed", chunk_bytes=0, packed=True))
    report = run_transport(tmp_path, TINY, variants, sites=2, rounds=1, warmup=1, timeout_s=300)
    message = payload_bytes(step_layout(TINY))
    assert (tmp_path / "transport.md").is_file()
    for result in report["variants"]:
        assert result["error"] is None, result
        assert [r["warmup"] for r in result["rounds"]] == [True, False]
        for round_ in result["rounds"]:
            assert round_["bytes_down"] == round_["bytes_up"] == 2 * message
            assert round_["seconds"] >= round_["site_s"] >= 0
        assert result["mb_per_s"] > 0
