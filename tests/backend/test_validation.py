"""validation.py: one check per parameter, and the CLI and the HTTP schemas accept and refuse the same values."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from tileprompt_backend import validation
from tileprompt_backend.cli import main
from tileprompt_backend.errors import InputError
from tileprompt_backend.schemas import ChangeRequest, ClassifyRequest, RasterInput, SearchRequest

# (parameter, value, accepted?) - held to the same verdict by the CLI, the schema and the function itself
CASES = [
    ("tile_px", 0, False), ("tile_px", -4, False), ("tile_px", 1, True), ("tile_px", 4096, True),
    ("tile_px", 4097, False), ("stride", 0, False), ("stride", 64, True), ("stride", 5000, False),
    ("threshold", 0, False), ("threshold", 1, False), ("threshold", 0.3, True), ("threshold", -0.1, False),
    ("k", 0, False), ("k", 1, True), ("k", 10_000, True), ("k", 10_001, False),
    ("prompts", "water; forest", True), ("prompts", " ; ", False), ("prompts", "wa\x00ter; forest", False),
    ("prompts", "water; water", False), ("text", "river\x1b[2J", False), ("text", "river", True),
    ("became", "flooded field | flood", True), ("became", " ", False), ("became", "water; forest", False),
    ("became", "x" * 201, False), ("change_k", 0, False), ("change_k", 7, True), ("change_k", 10_001, False),
    ("offset", "auto", True), ("offset", "none", True), ("offset", "1000", True), ("offset", "0", True),
    ("offset", "-1", False), ("offset", "10001", False), ("offset", "lots", False), ("offset", "nan", False),
]
CLI_FLAG = {"tile_px": "--tile", "stride": "--stride", "threshold": "--threshold", "k": "-k", "offset": "--offset"}
CHECK = {"tile_px": validation.tile_px, "stride": validation.stride, "threshold": validation.threshold,
         "k": validation.k, "prompts": validation.prompts, "text": validation.text, "became": validation.became,
         "change_k": validation.optional_k, "offset": validation.offset}
#: Parameters of the change search (schema ChangeRequest, CLI ``tileprompt change``).
CHANGE = {"became": "became", "change_k": "k"}


def _schema_accepts(name, value) -> bool:
    if name in CHANGE:
        try:
            ChangeRequest(before={"raster": "/a.tif"}, after={"raster": "/b.tif"}, out="/o.gpkg",
                          **{CHANGE[name]: value})
            return True
        except pydantic.ValidationError:
            return False
    base = {"raster": "/r.tif", "out": "/o.gpkg", "prompts": "water; forest"}
    model = SearchRequest if name in ("k", "text") else ClassifyRequest
    body = {"index": "/i", "out": "/o.gpkg", "text": "x"} if model is SearchRequest else base
    try:
        model(**{**body, name: value})
        return True
    except pydantic.ValidationError:
        return False


def _cli_accepts(name, value, tmp_path) -> bool:
    """The CLI's verdict on the value alone: the command then fails on its (missing) raster, exit 2 either way."""
    if name in CHANGE:
        args = ["change", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(tmp_path / "o.gpkg"),
                "--became" if name == "became" else "-k", str(value)]
    elif name in ("k", "text"):
        args = ["search", str(tmp_path / "no-index"), "--out", str(tmp_path / "o.gpkg")]
        args += ["--text", value] if name == "text" else ["--text", "x", "-k", str(value)]
    else:
        args = ["classify", str(tmp_path / "no-raster.tif"), "--out", str(tmp_path / "o.gpkg")]
        args += ["--prompts", value] if name == "prompts" else ["--prompts", "a; b", CLI_FLAG[name], str(value)]
    return main(args) == 2


@pytest.mark.parametrize("name,value,ok", CASES)
def test_cli_http_and_engine_agree(name, value, ok, tmp_path, capsys):
    def function_accepts():
        try:
            CHECK[name](value)
            return True
        except ValueError:
            return False

    assert function_accepts() is ok
    assert _schema_accepts(name, value) is ok
    main_ok = _cli_accepts(name, value, tmp_path)
    err = capsys.readouterr().err
    assert main_ok and len(err.strip().splitlines()) == 1 and err.startswith("tileprompt: error: ")
    if name not in ("prompts", "became"):  # parsed by the engine after the paths: the raster error comes first
        refused_for_value = "not found" not in err
        assert refused_for_value is (not ok), err


def test_context_needs_single_label(tmp_path, capsys):
    """Context-aware zero-shot with multi-label: one refusal, each interface's remedy (function, schema, CLI)."""
    assert validation.context(True) is True and validation.context(False, multi_label=True) is False
    with pytest.raises(InputError, match="cannot be combined with multi-label") as e:
        validation.context(True, multi_label=True)
    assert e.value.code == "context_multi_label" and "untick" in e.value.message("processing")
    with pytest.raises(pydantic.ValidationError, match="cannot be combined with multi-label"):
        ClassifyRequest(raster="/r.tif", out="/o.gpkg", prompts="a; b", multi_label=True, context=True)
    assert main(["classify", str(tmp_path / "no.tif"), "--prompts", "a; b", "--multi-label", "--context",
                 "--out", str(tmp_path / "o.gpkg")]) == 2
    assert capsys.readouterr().err.strip().endswith("drop --multi-label, or drop --context")


def test_band_map_skip_token_and_dates():
    assert validation.band_map("b4, B03,-,B8A") == ["B04", "B03", "-", "B8A"]
    stack = validation.band_map("B04,B03,B02,B08,B04,B03,B02,B08")
    assert validation.dates_in(stack) == 2
    assert validation.select_date(stack, 2) == ["-", "-", "-", "-", "B04", "B03", "B02", "B08"]
    assert validation.select_date(stack, 1) == ["B04", "B03", "B02", "B08", "-", "-", "-", "-"]
    assert validation.select_date(["B04", "B03"], None) == ["B04", "B03"]
    with pytest.raises(InputError, match="names B02, B03, B04, B08 2 times: a stack of 2 dates") as e:
        validation.select_date(stack, None)
    assert "--band-map B04,B03,B02,B08,B04,B03,B02,B08 --date 1" in e.value.message("cli")
    assert '"band_map": ["B04", "B03", "B02", "B08", "B04", "B03", "B02", "B08"], "date": 1' in e.value.message("http")
    assert "band table" in e.value.message("dock") and "--" not in e.value.message("dock")
    with pytest.raises(ValueError, match="date must be between 1 and 2, got 3"):
        validation.select_date(stack, 3)
    with pytest.raises(ValueError, match="a date needs a band map"):
        validation.select_date(None, 1)
    with pytest.raises(InputError, match="unknown band name 'B13'"):
        validation.band_map("B02,B13")
    with pytest.raises(InputError, match="skips every band"):
        validation.band_map("-,-")
    # the HTTP schema runs the same checks
    assert RasterInput(raster="/r.tif", band_map=stack, date=2).selected_band_map()[4:] == ["B04", "B03", "B02", "B08"]
    with pytest.raises(pydantic.ValidationError, match="stack of 2 dates"):
        RasterInput(raster="/r.tif", band_map=stack)


def test_cli_checks_arguments_and_paths_before_importing_torch(tmp_path):
    """Argument and path errors come back before the ML stack loads (that import is what took ~5 s)."""
    code = (
        "import sys\n"
        "from tileprompt_backend.cli import main\n"
        f"cases = [['classify', '/no/such.tif', '--prompts', 'a; b', '--out', {str(tmp_path / 'o.gpkg')!r}],\n"
        f"         ['classify', '/no/such.tif', '--prompts', 'a; b', '--out', 'o.gpkg', '--tile', '0'],\n"
        f"         ['search', '/no/index', '--text', 'x', '--out', 'o.gpkg'],\n"
        f"         ['index', '/no/such.tif', '--index', {str(tmp_path / 'idx')!r}],\n"
        f"         ['change', '/no/a.tif', '/no/b.tif', '--out', 'o.gpkg', '-k', '0'],\n"
        f"         ['classify', '/no/such.tif', '--prompts', 'a', '--out', 'o.gpkg', '--examples', '/no/ex.gpkg']]\n"
        "codes = [main(c) for c in cases]\n"
        "heavy = [m for m in ('torch', 'rasterio', 'fiona', 'open_clip') if m in sys.modules]\n"
        "print(codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[2, 2, 2, 2, 2, 2] []", (out.stdout, out.stderr)
