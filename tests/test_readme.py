"""The figures the README states are the library's, to the digit written: every row of its model table
(parameters to the unit, MACs to the decimals shown, at the input size named), its two commands, and the
command lists of README and docs/cli.md (every sub-command, only real options)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tntvision
from tntvision.cli import build_parser, subcommand_parsers
from tntvision.tools.info import count_macs, count_params

README = Path(__file__).resolve().parents[1] / "README.md"
CLI_DOC = README.parent / "docs" / "cli.md"
# | `name` | structure | 23,768,584 | 5.217 G |  or  ... | 0.586 G @ 192 |  or an empty MACs cell
ROW = re.compile(
    r"^\| `(?P<name>[a-z0-9_]+)` \|[^|]*\| (?P<params>[\d,]+) \| *(?P<macs>[\d.]+ G(?: @ \d+)?)? *\|$"
)


def model_rows() -> list[tuple[str, int, str | None]]:
    rows = []
    for line in README.read_text().splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append((m["name"], int(m["params"].replace(",", "")), m["macs"]))
    return rows


def test_the_table_names_every_registered_model_once():
    names = [name for name, _, _ in model_rows()]
    assert len(names) == len(set(names))
    assert set(names) == set(tntvision.list_models())  # a new variant needs its row


@pytest.mark.parametrize("name, params, macs", model_rows(), ids=[r[0] for r in model_rows()])
def test_a_row_of_the_model_table(name, params, macs):
    model = tntvision.create_model(name)
    assert count_params(model) == params
    if macs is None:
        return
    value, _, size = macs.partition(" G")
    size = int(size.replace("@", "").strip()) if size.strip() else model.cfg.img_size
    assert size == model.cfg.img_size  # the table states MACs at the variant's own input size
    decimals = len(value.split(".")[1]) if "." in value else 0
    assert round(count_macs(model, size) / 1e9, decimals) == float(value)


def test_the_readme_starts_with_the_two_commands():
    """The first two commands are the main job and the tests, and the Makefile has both targets."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands[:2] == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M)


def command_list(path: Path, heading: str) -> dict[str, set[str]]:
    """The first code block after ``heading`` in ``path``, as sub-command -> the options its lines name
    (a line starting with ``tnt NAME``, and the indented lines that continue it)."""
    text = path.read_text()
    block = re.search(r"```\n(.*?)```", text[text.index(heading) :], flags=re.S)[1]
    commands: dict[str, set[str]] = {}
    name = None
    for line in block.splitlines():
        if line.startswith("tnt "):
            name = line.split()[1]
        assert name is not None, line
        commands.setdefault(name, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    return commands


LISTS = {"README": (README, "## Command line"), "docs/cli.md": (CLI_DOC, "# The `tnt` command")}


@pytest.mark.parametrize("where", sorted(LISTS))
def test_the_command_lists_name_every_subcommand_and_real_options(where):
    parsers = subcommand_parsers(build_parser())
    listed = command_list(*LISTS[where])
    assert set(listed) == set(parsers)  # a new sub-command needs its line
    for name, options in listed.items():
        real = {o for action in parsers[name]._actions for o in action.option_strings}
        assert options <= real, (name, options - real)


def test_the_readme_lists_the_options_docs_cli_lists():
    assert command_list(*LISTS["README"]) == command_list(*LISTS["docs/cli.md"])
