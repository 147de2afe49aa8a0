"""Prompt lists and template files: parsing and every way they can be wrong."""

import pytest

from tileprompt_backend.engine.prompts import load_templates, parse_prompts


def test_parse_classes_and_synonyms():
    classes = parse_prompts("solar farm; greenhouse | glasshouse ;\n flooded field;;")
    assert [c.name for c in classes] == ["solar farm", "greenhouse", "flooded field"]
    assert classes[1].phrases == ("greenhouse", "glasshouse")
    assert [c.column for c in classes] == ["s_solar_farm", "s_greenhouse", "s_flooded_field"]


def test_columns_are_unique_after_slugging():
    classes = parse_prompts(["forest!", "forest?"])
    assert [c.column for c in classes] == ["s_forest", "s_forest_2"]


@pytest.mark.parametrize("text, message", [
    ("", "no class prompts"),
    (" ; ;\n", "no class prompts"),
    ("forest; Forest", "given twice"),
    ("forest; ???", "no letters"),
    ("x" * 300, "too long"),
    (";".join(f"c{i}" for i in range(300)), "too many classes"),
])
def test_bad_prompts(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompts(text)


def test_bundled_templates_have_one_placeholder():
    templates = load_templates()
    assert len(templates) >= 5
    assert all(t.count("{}") == 1 for t in templates)


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\n\na photo of {c}.\n{} from above\n")
    assert load_templates(f) == ["a photo of {}.", "{} from above"]


@pytest.mark.parametrize("content, message", [
    ("no placeholder\n", "line 1 .* has no single '{}'"),
    ("{} and {}\n", "line 1 .* has no single '{}'"),
    ("# only comments\n", "no templates"),
])
def test_bad_template_files(tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_templates(f)


def test_missing_template_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_templates(tmp_path / "nope.txt")
