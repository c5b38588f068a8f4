"""Scan geometry per DECTRIS series (``streaming/scan_plan.py``): the detector's own image count (SIMPLON v1
``nimages``/``ntrigger``, v2 ``number_of_images``), requests for the next or a named series, the hook, the shape
derived from the count, and what a count mismatch does (logged, recorded, refused when asked); through the
decoders and the series book into the registry."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.service.config import ScanConfig
from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming import dectris_v2 as v2
from ptylive.streaming.dectris_v1 import DectrisV1Decoder
from ptylive.streaming.dectris_v2 import DectrisV2Decoder
from ptylive.streaming.protocol import Frame, SeriesStart, decode
from ptylive.streaming.router import Router
from ptylive.streaming.scan_geometry import Optics, ScanGeometry, SeriesTemplate
from ptylive.streaming.scan_plan import (
    HOOK_GROUP,
    DetectorCount,
    ScanHookEnv,
    ScanPlan,
    ScanRequest,
    load_scan_hook,
    plan_from_settings,
    request_from_settings,
    simplon_v1_count,
    simplon_v2_count,
)
from ptylive.streaming.series import SeriesRegistry
from ptylive.streaming.series_book import SeriesBook

OPTICS = Optics(300e3, 20.0, 0.0, 1.0)
DETECTOR = (6, 6)


def count(n: int | None) -> DetectorCount:
    return DetectorCount(n, "" if n is None else f"ntrigger {n}")


# ---------------------------------------------------------------------------------- the detector's own count


def test_simplon_v1_counts_images_times_triggers() -> None:
    assert simplon_v1_count({"nimages": 1, "ntrigger": 320, "trigger_mode": "exts"}).n_images == 320
    assert simplon_v1_count({"nimages": 20, "ntrigger": 16}).n_images == 320
    assert simplon_v1_count({"nimages": 5, "ntrigger": 256, "trigger_mode": "exte"}).n_images == 256  # 1 per trigger
    assert simplon_v1_count({"nimages": 5, "ntrigger": 256, "trigger_mode": "inte"}).n_images == 256
    assert simplon_v1_count({"ntrigger": 64}).n_images == 64
    assert simplon_v1_count({"nimages": {"value": 4}, "ntrigger": {"value": 8}}).n_images == 32  # REST form
    said = simplon_v1_count({"nimages": 1, "ntrigger": 320, "trigger_mode": "exts", "count_time": 1e-3})
    assert said.source == "nimages 1 × ntrigger 320 (exts)" and said.settings["count_time"] == 1e-3


@pytest.mark.parametrize("config", [None, {}, {"x_pixels_in_detector": 96}, {"nimages": 0, "ntrigger": 4},
                                    {"nimages": "4"}, {"ntrigger": True}, ["nimages", 4]])
def test_simplon_v1_without_a_usable_count_says_none(config: Any) -> None:
    assert simplon_v1_count(config).n_images is None


def test_simplon_v2_counts_number_of_images() -> None:
    said = simplon_v2_count({"type": "start", "number_of_images": 100, "image_size_x": 8, "flatfield": {"t": b"x"}})
    assert said.n_images == 100 and said.source == "number_of_images 100"
    assert "flatfield" not in said.settings and said.settings["image_size_x"] == 8  # scalars only, for hooks
    assert simplon_v2_count({"type": "start"}).n_images is None
    assert simplon_v2_count({"type": "start", "number_of_images": -3}).n_images is None


# ---------------------------------------------------------------------------------------- what is asked


def test_requests_are_checked_and_normalised() -> None:
    request = ScanRequest.from_mapping({"shape": [16, -1], "step_A": 0.5, "rotation_deg": 3, "snake": True})
    assert request.shape == (16, -1) and request.step_A == (0.5, 0.5) and request.rotation_deg == 3.0
    for bad in ({"shape": [0, 4]}, {"shape": [4]}, {"shape": [4.0, 4]}, {"shape": [True, 4]}, {"shape": [-2, 4]},
                {"shape": [5000, 5000]}, {"step_A": 0}, {"step_A": [1, float("nan")]}, {"rotation_deg": "90"},
                {"snake": 1}, {"flyback_frames": -1}, {"flyback_at": "middle"}, {"rows": 4}):
        with pytest.raises(ValueError):
            ScanRequest.from_mapping(bad)


def test_the_scan_section_is_the_default_request() -> None:
    assert request_from_settings(ScanConfig()).shape is None
    assert request_from_settings(ScanConfig(rows=0, cols=16)).shape == (-1, 16)
    section = ScanConfig(rows=16, cols=16, step_row_A=0.5, step_col_A=0.25, snake=True, flyback_frames=2)
    assert request_from_settings(section) == ScanRequest((16, 16), (0.5, 0.25), 0.0, True, 2, "end")
    plan = plan_from_settings(ScanConfig(rows=4, cols=5, on_count_mismatch="refuse"))
    assert plan.on_count_mismatch == "refuse" and plan.resolve("1", count(20)).geometry == ScanGeometry(4, 5)


# ------------------------------------------------------------------------------------- the count decides


def test_a_matching_count_is_no_mismatch() -> None:
    decision = ScanPlan(ScanRequest((16, 20))).resolve("7", count(320))
    assert decision.geometry == ScanGeometry(16, 20) and decision.count_mismatch is None
    assert decision.source == "config" and decision.refusal is None


def test_the_issues_series_16_by_16_with_320_triggers(caplog: pytest.LogCaptureFixture) -> None:
    """[scan] 16×16 and 320 triggers once ended `complete` with 64 frames rejected, nothing logged."""
    with caplog.at_level(logging.WARNING, "ptylive.streaming.scan_plan"):
        decision = ScanPlan(ScanRequest((16, 16))).resolve("7", simplon_v1_count({"nimages": 1, "ntrigger": 320}))
    assert decision.geometry == ScanGeometry(20, 16)  # the line kept, its number from the count
    assert decision.count_mismatch == ("series '7': the detector takes 320 images (nimages 1 × ntrigger 320), the "
                                       "config scan 16×16 takes 256; using 20×16 (the line kept, the number of lines "
                                       "from the detector's count)")
    assert f"count mismatch: {decision.count_mismatch}" in caplog.messages
    assert decision.snapshot()["count_mismatch"] == decision.count_mismatch
    assert decision.result_attrs() == {"scan_source": "config", "detector_images": 320,
                                       "detector_images_source": "nimages 1 × ntrigger 320",
                                       "count_mismatch": decision.count_mismatch}


def test_rows_from_count_with_a_partial_last_line_and_flyback() -> None:
    decision = ScanPlan(ScanRequest((4, 8), flyback_frames=2)).resolve("7", count(45))  # lines of 10 images
    assert decision.geometry == ScanGeometry(5, 8, flyback_frames=2)
    assert decision.count_mismatch is not None and "the last line 5 of 10 images" in decision.count_mismatch
    fewer = ScanPlan(ScanRequest((16, 16))).resolve("7", count(200))
    assert fewer.geometry is not None and (fewer.geometry.rows, fewer.geometry.cols) == (13, 16)


def test_keep_shape_and_refuse() -> None:
    kept = ScanPlan(ScanRequest((16, 16)), on_count_mismatch="keep_shape").resolve("7", count(320))
    assert kept.geometry == ScanGeometry(16, 16) and kept.refusal is None
    assert kept.count_mismatch is not None and "64 images past it will be rejected" in kept.count_mismatch
    refused = ScanPlan(ScanRequest((16, 16)), on_count_mismatch="refuse").resolve("7", count(320))
    assert refused.geometry is None and refused.refusal == refused.count_mismatch
    assert refused.refusal is not None and 'on_count_mismatch = "refuse"' in refused.refusal
    with pytest.raises(ValueError, match="on_count_mismatch"):
        ScanPlan(on_count_mismatch="guess")


def test_an_unknown_count_runs_the_scan_unchecked() -> None:
    decision = ScanPlan(ScanRequest((16, 16))).resolve("7", count(None))
    assert decision.geometry == ScanGeometry(16, 16) and decision.count_mismatch is None


def test_no_shape_anywhere_derives_a_square_or_refuses_clearly() -> None:
    plan = ScanPlan()
    square = plan.resolve("1", count(256))
    assert square.geometry == ScanGeometry(16, 16) and square.source == "count" and square.count_mismatch is None
    odd = plan.resolve("2", count(320))
    assert odd.geometry is None and odd.refusal is not None
    assert odd.refusal.startswith("series '2': the detector's 320 images are not a square scan (n × n); set the shape")
    assert 'POST /control {"action": "scan", "shape": [rows, cols]}' in odd.refusal
    silent = plan.resolve("3", count(None))
    assert silent.refusal is not None and "the detector did not say how many images it takes" in silent.refusal
    with_flyback = ScanPlan(ScanRequest(flyback_frames=2)).resolve("4", count(8 * 10))  # 8 lines of 8 + 2
    assert with_flyback.geometry == ScanGeometry(8, 8, flyback_frames=2)


def test_placeholders_are_filled_from_the_count() -> None:
    plan = ScanPlan()
    assert plan.resolve("1", count(320)).geometry is None  # not square
    plan.request(ScanRequest(shape=(-1, 16)))
    rows = plan.resolve("2", count(320))
    assert rows.geometry == ScanGeometry(20, 16) and rows.source == "request+count" and rows.asked == (-1, 16)
    plan.request(ScanRequest(shape=(20, -1)))
    assert plan.resolve("3", count(320)).geometry == ScanGeometry(20, 16)
    plan.request(ScanRequest(shape=(21, -1)))
    assert "do not split into 21 lines" in (plan.resolve("4", count(320)).refusal or "")
    plan.request(ScanRequest(shape=(-1, 16)))
    assert "is to be filled from the detector's image count" in (plan.resolve("5", count(None)).refusal or "")


def test_an_absurd_count_is_refused() -> None:
    assert "exceeds" in (ScanPlan(ScanRequest((-1, 4))).resolve("1", count(4 * 2**25)).refusal or "")


# ----------------------------------------------------------------------------------------- requests per series


def test_a_request_is_for_the_next_series_once_over_the_scan_section() -> None:
    plan = ScanPlan(ScanRequest((16, 16), (0.5, 0.5), 0.0, False, 0, "end"))
    message = plan.request(ScanRequest(shape=(8, 32), snake=True))
    assert message == "scan for the next series: shape 8×32, snake True"
    assert plan.snapshot()["pending"]["next"]["shape"] == [8, 32]
    used = plan.resolve("1", count(256))
    assert used.geometry == ScanGeometry(8, 32, (0.5, 0.5), snake=True) and used.source == "request"
    assert plan.resolve("2", count(256)).geometry == ScanGeometry(16, 16, (0.5, 0.5))  # used once
    assert plan.snapshot()["pending"]["next"] is None


def test_a_request_for_a_named_series_waits_for_it() -> None:
    plan = ScanPlan(ScanRequest((16, 16)))
    plan.request(ScanRequest(shape=(4, 64)), series_id="9")
    plan.request(ScanRequest(shape=(2, 128)))  # the next series: any id but 9
    plan.request(ScanRequest(shape=(1, 256)))  # replaces the one before
    assert plan.resolve("8", count(256)).geometry == ScanGeometry(1, 256)
    assert plan.resolve("9", count(256)).geometry == ScanGeometry(4, 64)
    assert plan.resolve("10", count(256)).geometry == ScanGeometry(16, 16)
    assert plan.counts["requested"] == 3 and plan.decision("9") is not None and plan.decision("11") is None


def test_named_requests_and_decisions_are_bounded() -> None:
    plan = ScanPlan(ScanRequest((2, 2)), history=3, max_pending=2)
    for k in range(4):
        plan.request(ScanRequest(shape=(1, 4)), series_id=str(k))
    assert sorted(plan.snapshot()["pending"]["series"]) == ["2", "3"]
    for k in range(5):
        plan.resolve(f"s{k}", count(4))
    assert [plan.decision(f"s{k}") is not None for k in range(5)] == [False, False, True, True, True]


# ------------------------------------------------------------------------------------------------------ the hook


def square_hook(env: ScanHookEnv) -> tuple[int, int] | None:
    """A hook as acquisition software would write it: line length from its own settings, lines from the count."""
    return None if env.n_images is None else (env.n_images // 16, 16)


def test_the_hook_sees_the_count_and_what_would_run() -> None:
    seen: list[ScanHookEnv] = []

    def hook(env: ScanHookEnv) -> Any:
        seen.append(env)
        return {"shape": [env.n_images // 10, 10], "rotation_deg": 12.5}

    plan = ScanPlan(ScanRequest((16, 16), (0.4, 0.4)), hook=hook, hook_name="lab:hook")
    plan.request(ScanRequest(snake=True))
    decision = plan.resolve("5", DetectorCount(320, "number_of_images 320", {"count_time": 0.001}))
    assert decision.geometry == ScanGeometry(32, 10, (0.4, 0.4), 12.5, snake=True) and decision.source == "hook"
    env = seen[0]
    assert env.series_id == "5" and env.n_images == 320 and env.count.settings == {"count_time": 0.001}
    assert env.proposed == ScanRequest((16, 16), (0.4, 0.4), snake=True) and env.requested == ScanRequest(snake=True)
    assert plan.snapshot()["hook"] == "lab:hook" and plan.counts["hook"] == 1


@pytest.mark.parametrize("result, expected", [(None, ScanGeometry(16, 16)), ((20, 16), ScanGeometry(20, 16)),
                                              (tuple(np.array([20, 16])), ScanGeometry(20, 16)),
                                              (ScanGeometry(10, 32, snake=True), ScanGeometry(10, 32, snake=True)),
                                              (ScanRequest(shape=(-1, 32)), ScanGeometry(10, 32))])
def test_what_a_hook_may_return(result: Any, expected: ScanGeometry) -> None:
    assert ScanPlan(ScanRequest((16, 16)), hook=lambda env: result).resolve("1", count(320 if result else 256)
                                                                            ).geometry == expected


@pytest.mark.parametrize("hook", [lambda env: 1 / 0, lambda env: "16x16", lambda env: {"rows": 16}])
def test_a_failing_hook_refuses_its_series_and_the_next_one_runs(hook: Any) -> None:
    plan = ScanPlan(ScanRequest((16, 16)), hook=hook, hook_name="broken")
    refused = plan.resolve("1", count(256))
    assert refused.geometry is None and (refused.refusal or "").startswith("the scan hook broken failed: ")
    plan.hook = None
    assert plan.resolve("2", count(256)).geometry == ScanGeometry(16, 16)


def test_hooks_load_by_import_path_and_are_checked() -> None:
    hook = load_scan_hook("tests.streaming.test_scan_plan:square_hook")
    assert ScanPlan(hook=hook).resolve("1", count(320)).geometry == ScanGeometry(20, 16)
    for spec, message in [("tests.streaming.no_such_module:hook", "cannot be loaded: ModuleNotFoundError"),
                          ("tests.streaming.test_scan_plan:nothing", "cannot be loaded: AttributeError"),
                          ("tests.streaming.test_scan_plan:OPTICS", "not callable"),
                          ("no-such-entry-point", "no entry point 'no-such-entry-point' in group")]:
        with pytest.raises(ValueError, match=message):
            load_scan_hook(spec)


def test_a_hook_loads_by_its_entry_point_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[scan] hook = "lab-square"``: the name an acquisition package registers under ``ptylive.scan_hooks``
    (here a distribution installed as a ``.dist-info`` folder on ``sys.path``, its module beside it)."""
    module = "ptylive_test_lab_acquisition"
    (tmp_path / f"{module}.py").write_text("def square_hook(env):\n    return (env.n_images // 8, 8)\n")
    info = tmp_path / "ptylive_test_lab_acquisition-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ptylive-test-lab-acquisition\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{HOOK_GROUP}]\nlab-square = {module}:square_hook\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = ScanConfig(hook="lab-square")
    try:
        hook = load_scan_hook(settings.hook)
    finally:
        sys.modules.pop(module, None)  # the entry point imported it from tmp_path
    assert hook.__module__ == module and hook.__name__ == "square_hook"
    decision = plan_from_settings(settings, hook).resolve("1", count(320))
    assert decision.geometry == ScanGeometry(40, 8) and decision.source == "hook"
    with pytest.raises(ValueError, match=r"no entry point 'lab-round' in group 'ptylive.scan_hooks' \(installed: "
                                         r"\[.*'lab-square'.*\]\)"):
        load_scan_hook("lab-round")


# ------------------------------------------------------------------------- through the decoders and the book


def template(scan: ScanGeometry | None = None) -> SeriesTemplate:
    return SeriesTemplate(scan, OPTICS)


def pixels(n: int) -> np.ndarray:
    return np.random.default_rng(3).poisson(4.0, (n, *DETECTOR)).astype(np.uint16)


def v1_series(series_id: int, n: int, config: dict[str, Any] | None, detail: str = "basic") -> list[list[bytes]]:
    return ([v1.header_message(series_id, detail, config)]
            + [v1.image_message(series_id, k, frame) for k, frame in enumerate(pixels(n))]
            + [v1.end_message(series_id)])


def decoded_messages(decoder: Any, messages: list[list[bytes]]) -> list[Any]:
    out = []
    for message in messages:
        out += [m for m in decoder.feed(message) if not isinstance(m, Exception)]
    return out


def test_a_simplon_v1_series_takes_its_shape_from_the_detector_config_alone() -> None:
    decoder = DectrisV1Decoder(template(), ScanPlan())  # no [scan] raster at all
    decoded = decoded_messages(decoder, v1_series(7, 36, {"nimages": 1, "ntrigger": 36, "trigger_mode": "exts"}))
    start = decoded[0][0]
    assert isinstance(start, SeriesStart) and start.scan_shape == (6, 6) and start.n_positions == 36
    frames = [decode(parts) for message, parts in decoded if isinstance(message, Frame)]
    assert sorted(f.frame_index for f in frames) == list(range(36))  # type: ignore[union-attr]
    assert decoder.plan.decision("7") is not None and decoder.plan.decision("7").source == "count"  # type: ignore


def test_header_detail_none_gives_no_count() -> None:
    plan = ScanPlan(ScanRequest((4, 5)))
    decoded_messages(DectrisV1Decoder(template(), plan), v1_series(7, 20, None, detail="none"))
    decision = plan.decision("7")
    assert decision is not None and decision.count.n_images is None and decision.geometry == ScanGeometry(4, 5)


def test_a_simplon_v2_start_gives_the_count() -> None:
    plan = ScanPlan(ScanRequest((-1, 4)))
    messages = ([[v2.start_message(3, ["t1"], DETECTOR, 12)]]
                + [[v2.image_message(3, k, {"t1": p})] for k, p in enumerate(pixels(12))] + [[v2.end_message(3)]])
    decoded = decoded_messages(DectrisV2Decoder(template(), plan=plan), messages)
    assert decoded[0][0].scan_shape == (3, 4) and plan.decision("3").count.source == "number_of_images 12"  # type: ignore


def test_the_default_plan_is_the_templates_scan_checked_against_the_count() -> None:
    decoder = DectrisV1Decoder(template(ScanGeometry(4, 4)))
    decoded = decoded_messages(decoder, v1_series(7, 20, {"nimages": 1, "ntrigger": 20}))
    assert decoded[0][0].scan_shape == (5, 4)
    assert decoder.plan.decision("7").count_mismatch is not None  # type: ignore[union-attr]


def book_for(plan: ScanPlan) -> SeriesBook:
    return SeriesBook(lambda start: Router(lambda p: np.zeros(len(p), dtype=int), 1), SeriesRegistry(), 1,
                      scan_of=plan.decision)


def feed_book(book: SeriesBook, decoder: Any, messages: list[list[bytes]]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for message, _ in decoded_messages(decoder, messages):
        if isinstance(message, SeriesStart):
            outcomes["forwarded_start"] += book.start(message)
        elif isinstance(message, Frame):
            outcomes["routed"] += book.route(message.header_view()) is not None
        else:
            book.end(message)
    return outcomes


def test_the_registry_record_says_count_mismatch_and_how_the_scan_was_chosen() -> None:
    plan = ScanPlan(ScanRequest((4, 4)))
    book = book_for(plan)
    outcomes = feed_book(book, DectrisV1Decoder(template(), plan), v1_series(7, 20, {"nimages": 1, "ntrigger": 20}))
    assert outcomes == Counter(forwarded_start=1, routed=20)  # every image placed on the 5×4 the count gave
    record = book.snapshot()[0]["finished"][-1]
    assert record["scan_shape"] == [5, 4] and record["received"] == 20 and record["rejected"]["index_out_of_range"] == 0
    assert record["count_mismatch"] == plan.decision("7").count_mismatch  # type: ignore[union-attr]
    assert record["scan"]["source"] == "config" and record["scan"]["detector_images"] == 20


def test_a_refused_scan_refuses_the_series_before_admission() -> None:
    plan, admitted = ScanPlan(), []
    book = book_for(plan)
    book.admit = lambda start: admitted.append(start) or None  # type: ignore[func-returns-value]
    outcomes = feed_book(book, DectrisV1Decoder(template(), plan), v1_series(7, 20, {"nimages": 1, "ntrigger": 20}))
    assert outcomes == Counter() and admitted == []  # nothing forwarded, not even the start
    record = book.snapshot()[0]["finished"][-1]
    assert record["refusal"].startswith("series '7': the detector's 20 images are not a square scan")
    assert record["rejected"]["refused_series"] == 20
