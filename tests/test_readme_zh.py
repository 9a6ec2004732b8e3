"""README.zh-CN.md stays in step with README.md: the same commands and the same environment
variables.

Commands: every line of the bash code blocks in README.md's "Quick start" section (with its
subsections, e.g. the mirror settings) and its "Run the tests" section, against every line of the
bash code blocks of README.zh-CN.md; trailing `# comments` (translated) are ignored.
Variables: the names in the first column of every table of environment variables (rows that
start with | `ALL_CAPS_NAME` |) in each README.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
README_ZH = (ROOT / "README.zh-CN.md").read_text()


def _sections(text, *titles):
    """The text of the level-2 sections whose headings start with one of `titles`."""
    parts = re.split(r"^## ", text, flags=re.M)
    return "".join(p for p in parts if p.startswith(titles))


def _commands(text):
    lines = set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                lines.add(" ".join(command.split()))
    return lines


def _variables(text):
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, re.M))


def test_same_commands():
    english = _commands(_sections(README, "Quick start", "Run the tests"))
    assert {"bash scripts/setup_rpi.sh", ".venv/bin/python vim/infer_rpi.py"} <= english
    assert _commands(README_ZH) == english


def test_same_environment_variables():
    english = _variables(README)
    assert {"HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "PIP_INDEX_URL",
            "TORCH_INDEX_URL", "VIM_RPI_CACHE", "SELECTIVE_SCAN_CPU_BACKEND"} <= english
    assert _variables(README_ZH) == english


def test_the_readmes_link_each_other():
    assert "(README.zh-CN.md)" in README.split("\n## ")[0]
    assert "(README.md)" in README_ZH.split("\n## ")[0]


def test_the_ci_test_command_is_in_both():
    marker = re.search(r"<!-- ci:test-command -->\n```bash\n(.*?)\n```", README, re.S)
    assert marker and marker.group(1) in _commands(README_ZH)
