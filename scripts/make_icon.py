"""Draw resources/icon.png: a 3x3 grid of land-cover tiles, one of them outlined as the prompt's match.

Run with Debian's python3 (Pillow comes with it): /usr/bin/python3 scripts/make_icon.py
The output is deterministic, so re-running it leaves git clean unless this script changed.
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
SCALE = 4  # draw large, then shrink: Pillow has no anti-aliased shapes
OUT = Path(__file__).resolve().parent.parent / "resources" / "icon.png"

# Land-cover colours, row by row: forest, crop, water / crop, forest, urban / water, water, forest.
TILES = [
    ["#2e7d32", "#f9a825", "#1e88e5"],
    ["#c0ca33", "#388e3c", "#9e9e9e"],
    ["#1e88e5", "#1565c0", "#43a047"],
]
MATCH = (1, 1)  # the highlighted tile (row, col)


def draw() -> Image.Image:
    s = SIZE * SCALE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, s - 1, s - 1], radius=12 * SCALE, fill="#263238")

    margin, gap = 8 * SCALE, 3 * SCALE
    cell = (s - 2 * margin - 2 * gap) // 3
    for r, row in enumerate(TILES):
        for c, colour in enumerate(row):
            x, y = margin + c * (cell + gap), margin + r * (cell + gap)
            d.rounded_rectangle([x, y, x + cell, y + cell], radius=2 * SCALE, fill=colour)

    r, c = MATCH
    x, y = margin + c * (cell + gap), margin + r * (cell + gap)
    pad = 2 * SCALE
    d.rounded_rectangle([x - pad, y - pad, x + cell + pad, y + cell + pad], radius=3 * SCALE,
                        outline="white", width=3 * SCALE)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw().save(OUT, optimize=True)
    print(f"wrote {OUT}")
