"""Each stage script differs from the one before only where it says so (accelerate's by_feature
examples are checked against their base example the same way): every line of code a stage adds or
changes, and every place it deletes code, lies in a paragraph (lines between blank lines) that
holds a `New in stage N` comment. The module docstring, the imports and comments are free."""

import ast
import difflib
import io
import itertools
import re
import tokenize
from pathlib import Path

import pytest
from helpers import REPO

MARKER = re.compile(r" ?\(?New in stage \d+\)?:? ?")
STAGES = sorted((REPO / "scripts").glob("[01][0-9]_train_*.py"))


def code_lines(source: str) -> list[tuple[int, str]]:
    """(0-based line, the line without its comment) for each line that holds code, outside the
    module docstring and the top-level imports."""
    tree = ast.parse(source)
    free: set[int] = set()
    for position, node in enumerate(tree.body):
        is_docstring = position == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if is_docstring or isinstance(node, ast.Import | ast.ImportFrom):
            free.update(range(node.lineno - 1, node.end_lineno))
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            lines[row - 1] = lines[row - 1][:column]
    # A later stage retires an earlier stage's marker from a docstring: not a change of code.
    lines = [MARKER.sub("", line).rstrip() for line in lines]
    return [(index, line) for index, line in enumerate(lines) if line.strip() and index not in free]


def unmarked_changes(previous: str, stage: str, number: int) -> list[str]:
    """The lines of `stage` (1-based, with their text) that change `previous` outside a marked paragraph."""
    raw = stage.splitlines()
    paragraph, current = [], 0
    for line in raw:
        current += not line.strip()
        paragraph.append(current)
    marker = re.compile(rf"New in stage 0?{number}\b")  # in a comment or a docstring
    marked = {paragraph[index] for index, line in enumerate(raw) if marker.search(line)}
    old, new = code_lines(previous), code_lines(stage)
    matcher = difflib.SequenceMatcher(None, [text for _, text in old], [text for _, text in new], autojunk=False)
    found = []
    for tag, old_start, _, new_start, new_end in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "delete":  # the code around the deletion point must be marked
            around = [new[k][0] for k in (new_start - 1, new_start) if 0 <= k < len(new)]
            if not any(paragraph[index] in marked for index in around):
                found.append(f"{around[0] + 1}: deleted here: {old[old_start][1].strip()}")
            continue
        found += [
            f"{index + 1}: {text.strip()}" for index, text in new[new_start:new_end] if paragraph[index] not in marked
        ]
    return found


def test_every_stage_is_checked():
    assert [path.name[:2] for path in STAGES] == ["08", "09", "10", "11", "12", "13"]


@pytest.mark.parametrize("previous, stage", itertools.pairwise(STAGES), ids=[path.stem[:2] for path in STAGES[1:]])
def test_each_stage_changes_its_predecessor_only_in_marked_blocks(previous: Path, stage: Path):
    number = int(stage.name[:2])
    unmarked = unmarked_changes(previous.read_text(), stage.read_text(), number)
    assert not unmarked, (
        f"{stage.name} changes {previous.name} outside a `New in stage {number}` paragraph:\n" + "\n".join(unmarked)
    )


def test_an_unmarked_change_is_found():
    """The check itself: a changed line outside any marked paragraph is reported, one inside is not."""
    previous = "x = 1\n\ny = 2\n"
    assert unmarked_changes(previous, "x = 1\n\ny = 3\n", 10) == ["3: y = 3"]
    assert unmarked_changes(previous, "x = 1\n\n# New in stage 10: y changes\ny = 3\n", 10) == []
    assert unmarked_changes(previous, "x = 1\n\ny = 3  # New in stage 11\n", 10) == ["3: y = 3"]
    assert unmarked_changes(previous, "x = 1\n", 10) == ["1: deleted here: y = 2"]
