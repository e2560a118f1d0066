"""The README's quick start runs as written and prints the plan the README shows."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_prints_the_documented_plan():
    text = README.read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    shown = text.split("Output of `print(plan)`:", 1)[1].split("```", 2)[1].strip("\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    assert shown in out.getvalue()
