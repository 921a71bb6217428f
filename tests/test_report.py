import base64
import re

from factory.evaluate.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script>"


def make_result(**overrides):
    result = {
        "task": "support-triage",
        "kind": "classification",
        "dataset_version": "v3-abc123",
        "n_test": 4,
        "n_validation": 5,
        "columns": {
            "base": {"score": 0.25, "macro_f1": 0.1234},
            "specialist": {"score": 0.8125, "macro_f1": 0.7777},
            "teacher": {"score": 0.9375},
        },
        "calibration": {
            "split": "test",
            "threshold": 0.61,
            "coverage": 0.75,
            "quality": 0.9412,
            "kept": 3,
            "n": 4,
            "target": 0.9375,
            "delta": 0.1,
            "validation": {"n": 5, "coverage": 0.6, "quality": 1.0, "lower_bound": 0.4642, "target": 0.45,
                           "min_kept": 3},
            "map": {"method": "platt", "a": 1.5, "b": -0.2},
            "ece": {"raw": 0.3125, "calibrated": 0.1234},
            "reliability": {"raw": [[0.35, 0.0, 1], [0.85, 1.0, 3]], "calibrated": [[0.3, 0.0, 1], [0.9, 1.0, 3]]},
            "curve": [[0.9, 0.2, 1.0, 0.1], [0.61, 0.6, 1.0, 0.4642], [0.1, 1.0, 0.8, 0.3]],
            "test_curve": [[0.9, 0.25, 1.0], [0.61, 0.75, 0.9412], [0.1, 1.0, 0.8125]],
        },
        "confusion": {"labels": ["$a_{$", HOSTILE], "matrix": [[2, 0, 1], [0, 1, 0]]},
        "worst": [
            {
                "id": "ex-1",
                "prompt": f"Please classify {HOSTILE} and ``` fence",
                "reference": {"content": "billing", "tool_calls": []},
                "prediction": {"content": HOSTILE, "tool_calls": []},
                "score": 0.0,
                "confidence": 0.42,
            }
        ],
    }
    result.update(overrides)
    return result


def test_writes_files_with_values_and_embedded_png(tmp_path):
    paths = write_report(tmp_path / "out", make_result())
    assert set(paths) == {"markdown", "html", "curve", "reliability", "confusion"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    for image in ("curve", "reliability", "confusion"):
        assert paths[image].read_bytes().startswith(PNG_MAGIC)
    assert not list((tmp_path / "out").glob(".*tmp"))

    page = paths["html"].read_text()
    for value in ("0.8125", "0.7777", "0.9375", "0.1234", "0.6100", "v3-abc123", "macro_f1"):
        assert value in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert base64.b64decode(images[0]) == paths["curve"].read_bytes()
    assert base64.b64decode(images[1]) == paths["reliability"].read_bytes()

    markdown = paths["markdown"].read_text()
    assert "| score | 0.2500 | 0.8125 | 0.9375 |" in markdown
    assert "| macro\\_f1 | 0.1234 | 0.7777 | - |" in markdown
    assert "](coverage_quality.png)" in markdown and "](confusion.png)" in markdown and "](reliability.png)" in markdown


def test_calibration_figures_name_their_split(tmp_path):
    markdown = write_report(tmp_path, make_result())["markdown"].read_text()
    assert "- threshold: 0.6100 (certified on 5 validation examples)" in markdown
    assert "- validation lower bound (90%): 0.4642" in markdown
    assert "- test coverage (held out): 0.7500 (3 of 4)" in markdown
    assert "- test quality of kept answers (held out): 0.9412" in markdown
    assert "- test ECE, raw confidence: 0.3125" in markdown and "- test ECE, calibrated: 0.1234" in markdown
    assert "- calibration map (fitted on validation): platt" in markdown


def test_hostile_strings_are_escaped(tmp_path):
    result = make_result(task=HOSTILE, columns={HOSTILE: {"score": 0.5, HOSTILE: 1.0}})
    paths = write_report(tmp_path, result)
    page = paths["html"].read_text()
    assert "<script" not in page
    assert "&lt;script&gt;" in page

    markdown = paths["markdown"].read_text()
    outside_code = re.sub(r"(`{3,})text\n.*?\n\1", "", markdown, flags=re.S)
    assert "<script" not in outside_code
    # the prompt contains ``` so its block needs a longer fence that it cannot close
    assert "````text\nPlease classify" in markdown


def test_no_confusion_and_no_threshold(tmp_path):
    calibration = {**make_result()["calibration"], "threshold": None, "coverage": 0.0, "quality": None, "kept": 0,
                   "validation": {"n": 5, "coverage": 0.0, "quality": None, "lower_bound": None, "target": 0.99,
                                  "min_kept": 22}}
    result = make_result(kind="free_text", confusion=None, calibration=calibration, worst=[])
    paths = write_report(tmp_path, result)
    assert set(paths) == {"markdown", "html", "curve", "reliability"}
    assert not (tmp_path / "confusion.png").exists()
    assert "none certified on 5 validation examples (every request goes to the teacher)" in paths["html"].read_text()


def test_no_validation_examples_means_no_map(tmp_path):
    calibration = {**make_result()["calibration"], "threshold": None, "coverage": 0.0, "quality": None, "kept": 0,
                   "map": None, "curve": [], "ece": {"raw": 0.3125, "calibrated": None},
                   "reliability": {"raw": [[0.85, 1.0, 4]], "calibrated": None},
                   "validation": {"n": 0, "coverage": 0.0, "quality": None, "lower_bound": None, "target": None,
                                  "min_kept": None}}
    paths = write_report(tmp_path, make_result(n_validation=0, calibration=calibration))
    markdown = paths["markdown"].read_text()
    assert "- calibration map (fitted on validation): none (no validation examples)" in markdown
    assert "- test ECE, calibrated: -" in markdown
    assert paths["reliability"].read_bytes().startswith(PNG_MAGIC)


def test_rewrite_replaces_previous_report(tmp_path):
    write_report(tmp_path, make_result(dataset_version="old-version"))
    paths = write_report(tmp_path, make_result(dataset_version="new-version"))
    page = paths["html"].read_text()
    assert "new-version" in page and "old-version" not in page
