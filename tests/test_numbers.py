"""Numbers a clinician cannot misread (issue 23): no abbreviated flags, one grading precision, early refusals,
export records that match the files, readable predict.py lines."""

import importlib

import pytest
from conftest import FAST, ROOT, cli

SCRIPTS = {  # every parser of the project, by the module that builds it
    "qq": ROOT,
    "predict": ROOT,
    "export": ROOT,
    "speed": ROOT / "benchmarks",
    "ablations": ROOT / "benchmarks",
    "render_report": ROOT / "tools",
    "ucgrade.demo": ROOT,
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_parser_takes_an_abbreviated_flag(name, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS[name]))
    parser = importlib.import_module(name).get_args_parser()
    assert parser.allow_abbrev is False


def test_epoch_is_not_epochs(small_data, tmp_path):
    code, out, err = cli("qq.py", "--data", small_data, "--out", tmp_path / "out", *FAST, "--epoch", "3")
    assert code == 2 and out == ""
    assert err.startswith("error: unrecognized arguments: --epoch 3"), err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("predict.py", "image.jpg", "--eval", "--device", "cpu")
    assert code == 2 and "unrecognized arguments: --eval" in err
