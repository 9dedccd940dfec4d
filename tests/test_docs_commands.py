"""Every command the README, docs/, demo.sh and the SLURM examples show parses: its flags exist,
its values are in range, its model takes its scale and model flags. A renamed or removed flag
fails here, not for a user who copied the command. Nothing is run or read: parsing only."""

import re
import shlex
from pathlib import Path

import pytest

import sr_eval
import sr_sample
import sr_train
from sr_lib.config import check_ranges, parse
from sr_lib.models import MODELS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"\b(?:python3?|torchrun|srun)\b.*?\b(sr_(?:train|sample|eval)\.py)\b(.*)")


def shell_lines(path: Path) -> list[str]:
    """The shell lines of a file, continuations joined: a .md file's fenced shell blocks (no
    language, bash, sh, shell), the whole of a shell script."""
    text = path.read_text()
    if path.suffix == ".md":
        shell, block = [], None  # block: the lines of the open fence, None outside one
        for line in text.splitlines():
            fence = re.match(r"\s*```(\w*)", line)
            if fence and block is None:
                block, lang = [], fence.group(1)
            elif fence:
                shell += block if lang in ("", "bash", "sh", "shell") else []
                block = None
            elif block is not None:
                block.append(line)
        text = "\n".join(shell)
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def expand(words: str, known: dict[str, str]) -> str:
    """Shell variables as their `known` values, else a plain word, as <placeholders> are."""
    words = re.sub(r"<[^>]*>", "PLACEHOLDER", words)
    words = words.replace('"$@"', "")  # a job script's own arguments: none given
    words = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", words)  # ${V:+WORDS}: V set, as by default
    return re.sub(r"\$\{?(\w+)\}?", lambda v: known.get(v.group(1), "VAR"), words)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) for every sr_*.py command (`expand`)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "demo.sh",
             *sorted((REPO / "examples" / "slurm").glob("*.sbatch"))]  # fmt: skip
    found = []
    for path in files:
        # a script's own defaults (STEPS=${STEPS:-1000}, RUN=runs/x; TEMPERATURES=${...:-0 1},
        # split into its words) stand for its variables
        known = dict(re.findall(r"^(\w+)=(?:\$\{\w+:-)?([^}\n]*?)\}?$", path.read_text(), re.M))
        for line in shell_lines(path):
            m = SCRIPT.search(line)
            if not m or line.lstrip().startswith("#"):
                continue
            argv = shlex.split(expand(m.group(2), known), comments=True)
            if "..." in argv:  # an abbreviated command ("sr_train.py ..."), not one to copy
                continue
            found.append((f"{path.relative_to(REPO)}: {line.strip()[:80]}", m.group(1), argv))
    return found


COMMANDS = documented_commands()


def test_shell_lines_are_the_shell_blocks_only(tmp_path):
    """A python block's closing fence was once taken for an opening one: the prose after it
    was read as shell, and the next bash block's commands were never checked."""
    page = tmp_path / "page.md"
    page.write_text("Intro.\n```python\nx = 1\n```\nProse.\n```bash\npython sr_train.py \\\n"
                    "  --model edsr\n```\n```\nls\n```\n")  # fmt: skip
    assert shell_lines(page) == ["python sr_train.py  --model edsr", "ls"]


def test_the_docs_show_commands_of_all_three_scripts():
    scripts = [script for _, script, _ in COMMANDS]
    assert len(COMMANDS) >= 50, len(COMMANDS)
    assert {scripts.count(s) >= 5 for s in ("sr_train.py", "sr_sample.py", "sr_eval.py")} == {True}


@pytest.mark.parametrize("where, script, argv", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_a_documented_command_parses(where, script, argv, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # --shard auto: the array job's task
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    if "-h" in argv or "--help" in argv:
        module = {"sr_train.py": sr_train, "sr_sample.py": sr_sample, "sr_eval.py": sr_eval}
        with pytest.raises(SystemExit) as e:
            module[script].main(argv)
        assert e.value.code == 0, capsys.readouterr().err
        return
    if script == "sr_train.py":
        args, rest, _ = sr_train.parse_all(argv)
        if not args.model:  # ("", its default) a resume: model and flags from the checkpoint
            assert args.resume and not rest, where
            return
        model = MODELS[args.model]
        assert args.scale in model.scales, where
        check_ranges(parse(model.Config, rest, f"sr_train.py --model {args.model}"))
        sr_train.parse_recipe(args, model.recipe(args.scale))
    elif script == "sr_sample.py":
        sr_sample.parse_args(argv)
    else:
        args = parse(sr_eval.EvalArgs, argv, "sr_eval.py")
        assert args.scale in (2, 3, 4, 8) and args.n >= 1, where


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "slurm").glob("*.sbatch")),
                         ids=lambda p: p.name)  # fmt: skip
def test_a_job_script_says_to_make_its_log_folder(path):
    """SLURM does not make the folder of `#SBATCH --output=logs/...`: without it the job fails at
    once and writes no log at all. A script that logs into a folder says to make it."""
    text = path.read_text()
    folders = re.findall(r"^#SBATCH --(?:output|error)=(.+)/[^/]*$", text, re.M)
    for folder in folders:
        assert f"mkdir -p {folder} && sbatch {path.relative_to(REPO)}" in text, folder


def test_a_flow_trained_on_the_papers_recipe_starts_from_a_pretrained_encoder():
    """SRFlow's recipe trains the flow on a pre-trained RRDB encoder, frozen for the first half
    of the run (--freeze-encoder 0.5). examples/slurm/train.sbatch trained SRFlow without
    --rrdb-init: a random encoder, frozen for 100k steps. Each documented command that trains a
    flow (not a resume or -h) gives the encoder, or does not freeze it."""
    flows = {"srflow", "srflow_da", "ncsr"}
    trained = []
    for where, script, argv in COMMANDS:
        if script != "sr_train.py" or "-h" in argv or "--help" in argv:
            continue
        args, rest, _ = sr_train.parse_all(argv)
        if args.model in flows:
            cfg = parse(MODELS[args.model].Config, rest, f"sr_train.py --model {args.model}")
            trained.append(where)
            assert cfg.rrdb_init or cfg.freeze_encoder == 0 or args.init_from, where
    assert any("train.sbatch" in w for w in trained) and len(trained) >= 5, trained


@pytest.mark.parametrize("script", ["train", "sample", "eval"])
def test_a_scripts_page_shows_the_readmes_commands(script, tmp_path):
    """docs/train.md, sample.md and eval.md repeat their script's README commands, so that a
    page reached from a search stands alone; train.md's copy lacked `--resume auto --out DIR`,
    the README's way to continue a run. The two copies are one list of commands."""
    readme = (REPO / "README.md").read_text().split(f"### `sr_{script}.py`", 1)[1]
    page = (REPO / "docs" / f"{script}.md").read_text().split("\n## Usage\n", 1)[1]
    copies = []
    for name, text in (("readme", readme), ("page", page)):
        (tmp_path / f"{name}.md").write_text(re.split(r"\n#{2,3} ", text, maxsplit=1)[0])
        copies.append([line.strip() for line in shell_lines(tmp_path / f"{name}.md")])
    assert copies[0] == copies[1]
    assert sum(f"sr_{script}.py" in line for line in copies[0]) >= 3, copies[0]
