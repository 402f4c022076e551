"""The CLI's pure parsers and its error mapping (no TVM needed)."""

import click
import pytest
from click.testing import CliRunner
from splitc.tools.cli import cli, parse_input_shapes, parse_pins


def test_parse_input_shapes_tvmc_syntax():
    assert parse_input_shapes("x:[8,3,224,224],mask:[8, 128]") == {
        "x": (8, 3, 224, 224), "mask": (8, 128)}
    assert parse_input_shapes(None) == {}


@pytest.mark.parametrize("bad,msg", [
    ("x[8,3]", "cannot parse input shapes 'x\\[8,3\\]'"),
    ("x:[8,a]", "non-integer dim in \\[8,a\\]"),
    ("x:[8],,y:[2]", "cannot parse input shapes .* at ',y:\\[2\\]'"),
])
def test_parse_input_shapes_rejects(bad, msg):
    with pytest.raises(click.BadParameter, match=msg):
        parse_input_shapes(bad)


def test_parse_pins():
    assert parse_pins(("conv*=device", "lv9=server")) == {"conv*": "device", "lv9": "server"}
    with pytest.raises(click.BadParameter, match="expected OP=device or OP=server"):
        parse_pins(("lv9=gpu",))


def test_plan_missing_file_is_one_line_error(tmp_path):
    r = CliRunner().invoke(cli, ["plan", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: Frontend: model file '{tmp_path / 'nope.onnx'}' does not exist; "
                      "check the path"]
