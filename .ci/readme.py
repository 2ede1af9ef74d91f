"""README.md from nbs/index.ipynb (what `nbdev_readme` does, without quarto, which can't be installed offline).

Markdown cells are copied as they are; code cells become ```python blocks (cells marked `#| hide` are left out).
"""
import json
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root/"nbs"/"index.ipynb").read_text())
parts = ["<!-- generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file -->"]
for cell in nb["cells"]:
    src = "".join(cell["source"]).strip()
    if not src or src.startswith("#| hide"): continue
    parts.append(src if cell["cell_type"] == "markdown" else f"```python\n{src}\n```")
text = "\n\n".join(parts) + "\n"
readme = root/"README.md"
if not readme.exists() or readme.read_text() != text: readme.write_text(text)
