import time
from conftest import TINY_MODEL, wait_until
from test_real_backend import band_layer, use_tiny_model, PROMPTS

def test_progress(attached, eo_box):
    dock = attached.dock
    dock.layer_combo.setLayer(band_layer(eo_box))
    use_tiny_model(dock, tile=32)
    dock.prompt_edit.setPlainText(PROMPTS)
    seen = []
    t0 = time.monotonic()
    orig = dock.set_progress
    dock.set_progress = lambda v: (seen.append((round(time.monotonic()-t0,2), v)), orig(v))
    st = dock.set_status
    dock.set_status = lambda t: (seen.append((round(time.monotonic()-t0,2), t)), st(t))
    dock.run_button.click()
    assert wait_until(lambda: attached.current_task is None, 300)
    print("SEEN", seen)
