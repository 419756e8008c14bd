"""Every documented workflow works (issue 32 part 1): each command of the README's shell blocks and
of ``--help``'s examples runs, in order, on the tiny model with ``--smoke``. What a newcomer's
machine has and a test's has not is substituted: the tiny model for the default or a hub model,
the tiny text for a hub corpus, a local zero-shot task for the hub's; every other flag is kept."""
import re
import shlex
from pathlib import Path

import pytest

import llm_main_v4 as M

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = re.compile(r"^(?:\.venv/bin/)?python3? llm_main_v4\.py\b|^make run\b")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every pipeline command in the README's ```bash blocks and in
    ``--help``'s examples, in the order a reader meets them."""
    out, block = [], None
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        cmd = line.split("  #")[0].strip()
        if block == "bash" and PROGRAM.match(cmd):
            out.append((f"README.md:{n}", cmd))
    for line in M.EXAMPLES.splitlines():
        if PROGRAM.match(line.strip()):
            out.append(("--help", line.strip()))
    return out


def _argv(cmd: str, tiny: Path, data_dir: Path) -> list[str]:
    """The command's flags, with what this machine lacks substituted and --smoke added."""
    if cmd.startswith("make run"):
        m = re.search(r'ARGS="([^"]*)"', cmd)
        words = shlex.split(m.group(1)) if m else []
    else:
        words = shlex.split(cmd)[2:]
    words = [str(data_dir) if w == "DIR" else w for w in words]
    local = {"--model": str(tiny / "model"), "--dataset": str(tiny / "text.txt"),
             "--train-dataset": str(tiny / "text.txt")}
    for i, w in enumerate(words[:-1]):
        if w in local:
            words[i + 1] = local[w]
    if any(w in ("--compare", "--report-only") for w in words):
        return words
    extra = ["--model", local["--model"]] * ("--model" not in words) + ["--smoke", "--allow-overlap", "--log-level",
                                                                      "WARNING"]
    if "--data-dir" not in words:
        extra += [f for k in ("--dataset", "--train-dataset") if k not in words for f in (k, local[k])]
    if "--tasks" not in words:
        extra += ["--tasks", "trivia_mc", "--tasks-include", str(ROOT / "bench" / "tasks")]
    return words + extra


def test_the_readme_and_help_document_commands():
    cmds = documented_commands()
    assert len([c for w, c in cmds if w == "--help"]) >= 5
    assert any(c.startswith("make run") for _, c in cmds)


def test_every_documented_command_runs(tiny_run_dir, tmp_path, monkeypatch):
    data_dir = tmp_path / "corpora"
    (data_dir / "wikitext-2-raw").mkdir(parents=True)
    for split in ("test", "train"):
        (data_dir / "wikitext-2-raw" / f"wiki.{split}.raw").write_text((tiny_run_dir / "text.txt").read_text())
    monkeypatch.chdir(tmp_path)  # relative output folders (data, runs/...) land here
    failed = []
    for where, cmd in documented_commands():
        argv = _argv(cmd, tiny_run_dir, data_dir)
        if M.main(argv) != 0:
            failed.append(f"{where}: {cmd}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("text,want", [("python llm_main_v4.py --steps eval", ["--steps", "eval"]),
                                       ('make run ARGS="--seed 3"', ["--seed", "3"])])
def test_commands_keep_their_flags(text, want, tmp_path):
    assert _argv(text, tmp_path, tmp_path)[:len(want)] == want
