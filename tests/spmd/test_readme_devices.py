"""The README's multi-device example runs as written on 8 devices and prints its placement."""

import contextlib
import io
import math
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_several_devices_example_runs():
    section = README.read_text().split("## Several devices", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    text = out.getvalue()
    assert "placement: mesh data=8 (8 devices)" in text
    assert "blocks over (data): grad_gram, gram_eigbasis, shampoo" in text, text
    loss = float(text.rsplit("loss ", 1)[1])
    assert math.isfinite(loss)
