"""README.zh-CN.md stays in step with README.md, section for section.

Both READMEs are cut into sections at their `##` and `###` headings (code fences excepted); the
text before the first `##` is section 0. The section sequences must have the same heading levels,
and each pair of sections (English, Chinese) must hold:

- the same number of code blocks and of tables, and the same number of rows in each table;
- the same code, with comments stripped: each bash line (`\\` continuations joined, whitespace
  collapsed) and each other block as a whole (python comments removed with `tokenize`); comments
  may be translated, code may not;
- the same multiset of command-line options anywhere in the section, prose included: long
  `--flags` and short `-x` options (a `-` not preceded by an ASCII letter, digit, `_` or `-`);
- the same multiset of environment variables: ALL_CAPS tokens with an underscore anywhere in the
  section (every variable the READMEs name has one; test_extraction_finds_what_it_should lists
  the known ones);
- the same exit codes: the number after "exit", "exits", "exit status" or "exit code" (then
  perhaps "is") in English, after "退出码" (then perhaps "为" or "是") in Chinese;
- the same multiset of numbers: every run of digits with its decimal points (`1.9`, `0.68.1`)
  that is not part of an identifier, i.e. with no ASCII letter or `_` right before it and none
  right after it but a plural `s` ("500s"). So the 72 of `Cortex-A72` and the 1 of
  `causal_conv1d` are not numbers; `128`, `12 MP`, `约 2 秒`, `4000×3000` and `2.34×` give 128,
  12, 2, 4000 and 3000, 2.34. Thousands separators are removed (`8,400` = `8400`). Units are not
  compared (秒 and s are both right): a Chinese sentence writes each figure in digits where the
  English one does, and in words ("two commands", "两条命令") where the English uses words;
- the same set of inline code spans (`...`), and in each table row the same code spans and
  numbers;
- in the headings, the same code spans (`vim_rpi.Classifier` stays as it is).

Besides: the `<!-- ci:test-command -->` block is the same command in both, the
`<!-- readme-example -->` Python example is the same code modulo comments, and the two READMEs
link to each other before their first section. Every failure names the section (by number and
both headings) and the items missing in zh or extra in zh.
"""

import collections
import functools
import io
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_ZH = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^(#{2,3}) (.*)$", re.M)
_CODE_SPAN = re.compile(r"`([^`]+)`")
_FLAG = re.compile(r"(?<![A-Za-z0-9_-])(--[A-Za-z][A-Za-z0-9_-]*|-[A-Za-z])(?![A-Za-z0-9_])")
_VARIABLE = re.compile(r"(?<![A-Za-z0-9_])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+(?![A-Za-z0-9_])")
_NUMBER = re.compile(r"(?<![A-Za-z_0-9.])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)*)"
                     r"(?=s?(?:[^A-Za-z_0-9]|$))")
_EXIT_CODE = re.compile(r"\bexit(?:s| status| code)?(?: is)?\s+(\d+)|退出码\s*(?:为|是)?\s*(\d+)")


class Section:
    """One `##`/`###` section (or the text before the first one): its prose, code and tables."""

    def __init__(self, index, level, title, text):
        self.index, self.level, self.title, self.text = index, level, title, text
        self.blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]
        self.prose = _FENCE.sub("", text)
        self.tables = _tables(self.prose)

    def __str__(self):
        heading = f"{'#' * self.level} {self.title}" if self.level > 1 else self.title
        return f"section {self.index} {heading}"


def _tables(prose):
    """Each table as a list of rows, a row as its cells; the `| --- |` line is not a row."""
    tables, rows = [], []
    for line in prose.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", line):
                rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


@functools.lru_cache(maxsize=None)
def sections(text):
    """The sections of a README, in order; fenced code is not searched for headings."""
    fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    starts = [m for m in _HEADING.finditer(text) if not any(a <= m.start() < b for a, b in fenced)]
    bounds = [(0, 1, "(top)", 0)] + [(m.start(), len(m.group(1)), m.group(2).strip(), m.end())
                                      for m in starts]
    result = []
    for i, (start, level, title, body) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        result.append(Section(i, level, title, text[body:end]))
    return tuple(result)


def _strip_shell_comment(line):
    """`line` without its `# comment` (a `#` at the start or after a blank, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _strip_python_comments(code):
    """`code` without its comments and the lines they leave blank."""
    lines = code.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def code_items(section):
    """The section's code without comments: a bash block gives its commands, one per logical line;
    any other block gives itself, as `lang: code`."""
    items = []
    for lang, code in section.blocks:
        if lang in ("bash", "sh", "console"):
            for line in re.sub(r"\\\n", " ", code).splitlines():
                command = " ".join(_strip_shell_comment(line).split())
                if command:
                    items.append(command)
        elif lang == "python":
            items.append("python: " + _strip_python_comments(code))
        else:
            items.append(f"{lang}: " + "\n".join(line.rstrip() for line in code.splitlines()))
    return items


def flags(section):
    return _FLAG.findall(section.text)


def variables(section):
    return _VARIABLE.findall(section.text)


def exit_codes(section):
    return [a or b for a, b in _EXIT_CODE.findall(section.text)]


def numbers(text):
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def code_spans(text):
    """Inline code, whitespace collapsed (a span may be wrapped over two lines)."""
    return [" ".join(span.split()) for span in _CODE_SPAN.findall(_FENCE.sub("", text))]


def _difference(what, english, chinese, where, as_sets=False):
    """A message naming what `chinese` lacks and what it has in excess of `english`, or None."""
    if as_sets:
        english, chinese = collections.Counter(set(english)), collections.Counter(set(chinese))
    else:
        english, chinese = collections.Counter(english), collections.Counter(chinese)
    missing, extra = sorted((english - chinese).elements()), sorted((chinese - english).elements())
    if not missing and not extra:
        return None
    return f"{where}: {what} differ: missing in zh {missing}; extra in zh {extra}"


def compare_structure(english_text, chinese_text):
    """Problems with the heading sequence, or with the blocks, tables and rows of each section."""
    english, chinese = sections(english_text), sections(chinese_text)
    levels_en = [s.level for s in english]
    levels_zh = [s.level for s in chinese]
    if levels_en != levels_zh:
        outline_en = [f"{'#' * s.level} {s.title}" for s in english]
        outline_zh = [f"{'#' * s.level} {s.title}" for s in chinese]
        return [f"the heading levels differ: README.md has {len(english)} sections {outline_en}; "
                f"README.zh-CN.md has {len(chinese)} {outline_zh}"]
    problems = []
    for en, zh in zip(english, chinese):
        where = f"{en} / {zh.title}"
        for what, count in (("code blocks", lambda s: [lang or "-" for lang, _ in s.blocks]),
                            ("table row counts", lambda s: [len(t) for t in s.tables])):
            if count(en) != count(zh):
                problems.append(f"{where}: {what} differ: README.md {count(en)}, zh {count(zh)}")
        spans_en, spans_zh = code_spans(en.title), code_spans(zh.title)
        if spans_en != spans_zh:
            problems.append(f"{where}: heading code differs: README.md {spans_en}, zh {spans_zh}")
    return problems


# Each check: what it compares, and how it reads one section.
CHECKS = {
    "code (comments stripped)": code_items,
    "options (--flags, -x)": flags,
    "environment variables": variables,
    "exit codes": exit_codes,
    "numbers": lambda s: numbers(s.text),
}
# Two more, read differently: the set of inline code spans, and each table row's code and numbers.
ALL_CHECKS = tuple(CHECKS) + ("inline code", "table rows")


def compare_sections(english_text, chinese_text, checks=ALL_CHECKS):
    """Problems, one message per section and kind of item, between two READMEs of equal structure."""
    english, chinese = sections(english_text), sections(chinese_text)
    assert [s.level for s in english] == [s.level for s in chinese], \
        "the section structure differs; see test_same_section_structure"
    problems = []
    for en, zh in zip(english, chinese):
        where = f"{en} / {zh.title}"
        for what in (check for check in checks if check in CHECKS):
            problems.append(_difference(what, CHECKS[what](en), CHECKS[what](zh), where))
        if "inline code" in checks:
            problems.append(_difference("inline code spans", code_spans(en.text), code_spans(zh.text),
                                        where, as_sets=True))
        if "table rows" in checks:
            for t, (table_en, table_zh) in enumerate(zip(en.tables, zh.tables), 1):
                for r, (row_en, row_zh) in enumerate(zip(table_en, table_zh)):
                    cells_en, cells_zh = " | ".join(row_en), " | ".join(row_zh)
                    cell = f"{where}, table {t} row {r} ({row_en[0]})"
                    problems.append(_difference("code", code_spans(cells_en), code_spans(cells_zh), cell))
                    problems.append(_difference("numbers", numbers(cells_en), numbers(cells_zh), cell))
    return [p for p in problems if p]


def _report(problems):
    return "README.zh-CN.md is out of step with README.md:\n" + "\n".join(problems)


def test_same_section_structure():
    assert len(sections(README)) > 10
    problems = compare_structure(README, README_ZH)
    assert not problems, _report(problems)


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_same_items_per_section(check):
    problems = compare_sections(README, README_ZH, checks=(check,))
    assert not problems, _report(problems)


def test_extraction_finds_what_it_should():
    """The extractors see the README's known commands, options, variables, exit codes, numbers."""
    everything = {name: {item for s in sections(README) for item in read(s)} for name, read in CHECKS.items()}
    assert {"bash scripts/setup_rpi.sh", ".venv/bin/python vim/infer_rpi.py",
            "sudo systemctl daemon-reload && sudo systemctl enable --now vim-serve",
            ".venv/bin/python vim/main.py --eval --resume hf-hub:hustvl/Vim-tiny-midclstok/"
            "vim_t_midclstok_76p1acc.pth --model vim_tiny --data-path /path/to/imagenet --batch-size 16",
            } <= everything["code (comments stripped)"]
    assert {"--max-image-mb", "--minimal", "-c", "-q", "-t", "--system-site-packages",
            "--nproc_per_node"} <= everything["options (--flags, -x)"]
    assert {"HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "PIP_INDEX_URL",
            "TORCH_INDEX_URL", "VIM_RPI_CACHE", "SELECTIVE_SCAN_CPU_BACKEND", "VIM_SERVE_TOKEN",
            "NUMBA_CACHE_DIR"} <= everything["environment variables"]
    assert {"2", "3", "4", "5"} <= everything["exit codes"]
    assert {"128", "1.9", "339", "76.1", "8400", "2.9.1", "4000", "3000"} <= everything["numbers"]
    assert "72" not in everything["numbers"]


def test_numbers_and_exit_codes_read_the_same_in_both_languages():
    english = numbers("about 2 s, 8,400 ops, 4000×3000, 2.34× DeiT, 10 500s, 5xx, Cortex-A72, v0.68.1, 12 MP")
    chinese = numbers("约 2 秒，8400 个算子，4000×3000，DeiT 的 2.34×，10 个 500，5xx，Cortex-A72，v0.68.1，12 MP")
    assert english == chinese == ["2", "8400", "4000", "3000", "2.34", "10", "500", "12"]
    english = sections("## s\n\nexit 2, exits 0, exit status 4, the exit status is 5, exit codes (0 ok)\n")[1]
    chinese = sections("## s\n\n退出码 2，退出码为 0，退出码 4，退出码是 5，退出码（0 成功）\n")[1]
    assert exit_codes(english) == exit_codes(chinese) == ["2", "0", "4", "5"]


def test_the_readmes_link_each_other():
    assert "(README.zh-CN.md)" in sections(README)[0].text
    assert "(README.md)" in sections(README_ZH)[0].text


def _marked_block(text, marker, lang):
    match = re.search(rf"<!-- {marker} -->\n```{lang}\n(.*?)^```", text, re.S | re.M)
    return match and match.group(1)


def test_the_ci_test_command_is_in_both():
    english = _marked_block(README, "ci:test-command", "bash")
    assert english, "README.md lost its <!-- ci:test-command --> block"
    assert _marked_block(README_ZH, "ci:test-command", "bash") == english


def test_the_python_example_is_the_same_code():
    english = _marked_block(README, "readme-example", "python")
    chinese = _marked_block(README_ZH, "readme-example", "python")
    assert english and chinese, "a README lost its <!-- readme-example --> block"
    assert _strip_python_comments(chinese) == _strip_python_comments(english)


def _inject(text, index, addition):
    """`text` with `addition` appended to the end of section `index` (before the next heading)."""
    following = sections(text)[index + 1].title
    end = next(m.start() for m in _HEADING.finditer(text) if m.group(2).strip() == following)
    return text[:end].rstrip("\n") + "\n\n" + addition + "\n\n" + text[end:]


MUTATIONS = {
    "section": ("### A new subsection\n\nSome text.", "compare_structure", "the heading levels differ"),
    "command": ("```bash\n.venv/bin/python vim/infer_rpi.py --video 9\n```",
                "code (comments stripped)", ".venv/bin/python vim/infer_rpi.py --video 9"),
    "flag": ("Also `--new-flag` exists.", "options (--flags, -x)", "--new-flag"),
    "short option": ("Pass -z to it.", "options (--flags, -x)", "-z"),
    "variable": ("Set `VIM_NEW_VARIABLE`.", "environment variables", "VIM_NEW_VARIABLE"),
    "number": ("It takes 4.75 s.", "numbers", "4.75"),
    "thousands": ("About 12,345 ops.", "numbers", "12345"),
    "exit code": ("It exits 9 then.", "exit codes", "9"),
    "table": ("| a | b |\n| --- | --- |\n| `x` | 1 |", "compare_structure", "table row counts differ"),
}


@pytest.mark.parametrize("side", ["README.md", "README.zh-CN.md"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_change_to_one_readme_only_is_reported(mutation, side):
    """An addition to one README only fails the comparison, naming the section and the item.
    README.md stands in for both sides (the comparison reads no language but for exit codes), so
    this test does not depend on the two READMEs being in step today."""
    addition, check, item = MUTATIONS[mutation]
    index = 7  # "Camera and streams", in the middle of the README
    english, chinese = README, README
    if side == "README.md":
        english = _inject(english, index, addition)
    else:
        chinese = _inject(chinese, index, addition)
    if check == "compare_structure":
        problems = compare_structure(english, chinese)
    else:
        problems = compare_sections(english, chinese, checks=(check,))
    assert len(problems) == 1 and item in problems[0], problems
    if check != "compare_structure":
        title = sections(README)[index].title
        assert problems[0].startswith(f"section {index} ## {title} / ")
        direction = "missing in zh" if side == "README.md" else "extra in zh"
        assert re.search(rf"{direction} \[[^\]]*{re.escape(repr(item))}", problems[0]), problems[0]


def test_a_changed_number_in_a_table_names_the_row():
    english = README.replace("| `--queue` [16] requests", "| `--queue` [17] requests")
    assert english != README
    problems = compare_sections(english, README, checks=("table rows",))
    assert len(problems) == 1 and "table 1 row 8 (the model's queue)" in problems[0], problems
    assert "missing in zh ['17']; extra in zh ['16']" in problems[0]


def test_translated_comments_are_not_differences():
    """Comments in code may be translated (and wrapped differently); the code around them not."""
    chinese = README_ZH.replace("# 请求日志", "# 查看请求日志，按 Ctrl-C 退出")
    chinese = chinese.replace("# 从上次停下的地方继续训练", "# 从上次停下的地方\n# 继续训练")
    assert chinese != README_ZH and not compare_sections(README_ZH, chinese)


@pytest.mark.parametrize("line, command", [
    ("a 'x # y' b  # note", "a 'x # y' b"),
    ('echo "#1"#2 # three', 'echo "#1"#2'),
    ("# only a comment", ""),
    ("curl -F image=@a.jpg   'localhost:8000/?topk=3'", "curl -F image=@a.jpg 'localhost:8000/?topk=3'"),
    ("x \\\n  | y  # joined", "x | y"),
])
def test_shell_comments_are_stripped_outside_quotes(line, command):
    assert code_items(sections(f"## s\n\n```bash\n{line}\n```\n")[1]) == ([command] if command else [])


def test_a_changed_heading_code_is_reported():
    problems = compare_structure(README, README.replace(": `vim_rpi.Classifier`", ": `Classifier`"))
    assert len(problems) == 1 and "heading code differs" in problems[0] and "section 5 " in problems[0]
