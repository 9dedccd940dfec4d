"""Facts the README and docs/ state that the code defines: the exit codes, the flags a resume
does not take from its checkpoint, a help text for every flag that agrees with the README, the
smallest HR patch of each critic, one measurement per row of docs/benchmarks.md. A change on
one side that the other does not follow fails here. Nothing is trained or sampled: the scripts
run `-h` only."""

import re
from pathlib import Path

import pytest

import sr_eval
import sr_sample
import sr_train
from sr_lib import errors
from sr_lib.models import MODELS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DESIGN = (REPO / "docs" / "design.md").read_text()
TRAIN = (REPO / "docs" / "train.md").read_text()  # sr_train.py's reference, moved from the README
# the manual: the README and every page of docs/, where a flag's usage may be shown
MANUAL = "\n".join([README] + [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))])


def error_classes(cls=errors.SRSpaceError) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in error_classes(sub)]


@pytest.mark.parametrize("page, heading", [("README.md", "## Exit codes"),
                                           ("docs/exit-codes.md", "## The codes")])  # fmt: skip
def test_every_exit_code_of_the_scripts_is_in_the_tables(page, heading):
    """The README's table in brief and docs/exit-codes.md's in full list every code."""
    table = (REPO / page).read_text().split(heading, 1)[1].split("\n\n", 2)[1]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    used = {c.exit_code for c in error_classes()} | constants | {0}
    assert used <= documented, sorted(used - documented)
    assert {0, 1, 2, 130} <= documented  # (the table was found)


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"`(--[a-z][a-z-]*)`", text))


def test_the_docs_list_the_flags_a_resume_does_not_take_from_its_checkpoint():
    local = {"--no-requeue" if f == "requeue" else "--" + f.replace("_", "-")
             for f in sr_train.LOCAL_FLAGS} - {"--model", "--resume"}  # fmt: skip
    design = DESIGN.split("those of one invocation:", 1)[1].split("which a resume could not", 1)[0]
    assert flags_in(design) == local
    train = TRAIN.split("it is not given from the checkpoint", 1)[1].split("are listed at", 1)
    assert flags_in(train[0]) == local - {"--out"}  # (the sentence is about --out's run)


OPTION = re.compile(r"^  (--[\w-]+)(?: (?:\{[^}]*\}|[A-Z][A-Z_0-9]*|\[[^\]]*\]))*(?:\s{2,}(.*))?$")


def help_entries(text: str) -> dict[str, str]:
    """flag: its help text, from an argparse help screen."""
    entries, current = {}, None
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and line.startswith(" " * 20):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


SCREENS = [("sr_train.py", ["--model", m, "-h"]) for m in MODELS] + [
    ("sr_sample.py", ["-h"]),
    ("sr_eval.py", ["-h"]),
]


@pytest.mark.parametrize("script, argv", SCREENS, ids=[" ".join(a) for _, a in SCREENS])
def test_every_flag_has_a_help_text_beyond_its_default(script, argv, capsys):
    main = {"sr_train.py": sr_train, "sr_sample.py": sr_sample, "sr_eval.py": sr_eval}[script].main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert len(entries) >= 15, entries  # (the screen was read)
    bare = [f for f, t in entries.items() if not re.sub(r"\(?default:? [^)]*\)?", "", t).strip()]
    assert not bare, bare


def test_a_benchmark_row_holds_one_measurement():
    """docs/benchmarks.md: one current row per benchmark, with its date; older measurements, or
    another machine's, are in git. A row of a table with a command column names one date."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    rows, header = [], []
    for line in text.splitlines():
        if not line.startswith("| "):
            header = []
        elif not header:
            header = line.split(" | ")
        elif not line.startswith("| ---") and "command" in header:
            rows.append(line)
    assert len(rows) >= 20, len(rows)  # (the tables were found)
    for row in rows:
        dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", row)
        assert len(dates) == 1, (dates, row[:100])


def test_sr_sample_amp_help_says_the_flows_refuse_fp16(capsys):
    """The help said the flows kept their state float32 "in both" precisions, where sr_sample.py
    refuses --amp fp16 for every model with fits_float16 False: the flows."""
    refusing = {name for name, m in MODELS.items() if not m.fits_float16}
    assert refusing == {"srflow", "srflow_da", "ncsr"}  # the flows, as the help calls them
    with pytest.raises(SystemExit):
        sr_sample.main(["-h"])
    amp = " ".join(help_entries(capsys.readouterr().out)["--amp"].split())
    assert "fp16: float16 (8x bf16's precision, far less range), refused by the flows" in amp, amp


SPECIAL = [("sr_train.py", "--data", "'demo'"), ("sr_sample.py", "--input", "'demo'"),
           ("sr_eval.py", "--hr", "'demo'"), ("sr_eval.py", "--out", "'-'"),
           ("sr_eval.py", "--csv", "'-'")]  # fmt: skip


@pytest.mark.parametrize("script, flag, value", SPECIAL, ids=[f"{s} {f}" for s, f, _ in SPECIAL])
def test_a_value_that_is_not_a_path_is_in_its_flags_help(script, flag, value, capsys):
    """A value the manual (README, docs/) gives a path flag (the demo images, stdout) is in the
    flag's help."""
    main = {"sr_train.py": sr_train, "sr_sample.py": sr_sample, "sr_eval.py": sr_eval}[script].main
    with pytest.raises(SystemExit):
        main(["-h"])
    assert value in help_entries(capsys.readouterr().out)[flag]
    assert f"{flag} {value.strip(chr(39))}" in MANUAL.replace("`", "")  # (the manual's usage)


def test_sr_train_amp_help_says_bf16_runs_emulated_elsewhere(capsys, monkeypatch):
    """The help named bf16's devices as if it were refused elsewhere; it runs there, emulated,
    with a warning (README), and fp16 is refused off CUDA."""
    import torch

    from sr_lib import config

    monkeypatch.setattr(config, "cpu_has_native", lambda amp: False)
    assert "emulates bf16" in config.amp_emulated("bf16", torch.device("cpu"))
    with pytest.raises(SystemExit):
        sr_train.main(["-h"])
    amp = " ".join(help_entries(capsys.readouterr().out)["--amp"].split())
    assert "elsewhere emulated and slower, with a warning" in amp and "fp16 (CUDA only" in amp


def test_the_train_reference_gives_each_networks_smallest_hr_patch():
    """The README (its sr_train.py text now docs/train.md) said "under 16 px" for every critic
    and the VGG loss; VarSR's critic needs 17 (its 4 stride-2 convolutions and Instance Norm),
    VSpSR's 10."""
    from sr_lib.models import refvae, varsr, vspsr
    from sr_lib.models.losses import VGGLoss
    from sr_lib.models.vgg import VGGFeatures

    loss = VGGLoss(VGGFeatures(("relu5_4",), pretrained=False))  # the models' perceptual tap
    sizes = {"VGG19": loss.min_size, "RefVAE": refvae.Discriminator.MIN_SIZE,
             "VarSR": varsr.Critic(ch=4).min_size,  # its default 8 layers
             "VSpSR": vspsr.Discriminator.min_size}  # fmt: skip
    said = (
        f"(under {sizes['VGG19']} px for the VGG19 loss at `relu5_4` and RefVAE's "
        f"discriminator, {sizes['VarSR']} for VarSR's critic, {sizes['VSpSR']} for VSpSR's)"
    )
    assert sizes["RefVAE"] == sizes["VGG19"]  # (the sentence gives them one number)
    assert said in " ".join(TRAIN.split())


def test_ci_runs_the_readmes_test_command_and_the_integration_tier():
    """The quick start's test command is the default suite; pyproject keeps the `slow` and
    `integration` markers out of it; CI runs it, then `-m integration`; the README's
    "Development" names both tiers' commands, and every marker pyproject declares."""
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.startswith("python -m pytest")]  # fmt: skip
    assert ci == ["python -m pytest", "python -m pytest -m integration"]
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^python -m pytest +#", quick, re.M)
    # two commands on a fresh machine: the demo (with its environment and install) and the tests
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("bash demo.sh"), commands
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "-m 'not slow and not integration'" in pyproject
    markers = re.findall(r'^    "(\w+): ', pyproject, re.M)
    assert sorted(markers) == ["integration", "slow"]
    development = README.split("## Development", 1)[1].split("\n## ", 1)[0]
    for marker in markers:
        assert f"python -m pytest -m {marker}" in development, marker


def suite_minutes(text: str) -> list[str]:
    """The default suite's time wherever a page states one: README's Installation ("the default
    suite's N tests take about M minutes"), its quick start's test command ("# the tests (CPU,
    ~M minutes)") and docs/design.md's Tests section ("the default suite: about M minutes")."""
    said = r"(?:default suite[^.()]*?about|# the tests \(CPU, ~) *([\d½.]+) minutes"
    return re.findall(said, " ".join(text.split()))


def test_every_page_gives_the_default_suite_the_readmes_time():
    """docs/design.md said the default suite takes about 7 minutes on 2 cores and the quick start
    ~4, where the README's Installation, which the lead measures, says about 3½."""
    measured = suite_minutes(README.split("## Installation", 1)[1].split("\n## ", 1)[0])
    assert len(measured) == 1, measured  # (the Installation line was found)
    for page, text in (("README.md", README), ("docs/design.md", DESIGN)):
        assert set(suite_minutes(text)) <= set(measured), (page, suite_minutes(text), measured)
    assert suite_minutes(README.split("## Quick start", 1)[1].split("\n## ", 1)[0])  # (it has one)


def test_the_readme_names_the_weights_whose_hash_is_checked():
    """The README said every pretrained weights file is checked against its sha256, where
    weights.txt gives a hash for two (torchvision's 8-hex prefixes) and `-`, unchecked, for the
    others (the released SRFlow, NCSR, ESRGAN, EDSR, RefVAE files)."""
    from sr_lib.weights import load_manifest

    manifest = load_manifest()
    checked = sorted(name for name, e in manifest.items() if e.sha256)
    assert checked  # (the manifest was read)
    text = " ".join(README.split("## Pretrained weights", 1)[1].split("\n## ", 1)[0].split())
    named = re.search(
        r"A file whose line gives a sha256 is checked against it \(checked: ([^;]*)", text
    )
    assert named, "the README does not say which files are checked"
    assert sorted(re.findall(r"`([\w-]+)`", named.group(1))) == checked, named.group(1)
    prefix = {len(manifest[name].sha256) for name in checked} == {8}
    assert ("8-hex prefix" in named.group(1)) == prefix, named.group(1)


def test_the_design_layout_names_every_module_of_sr_lib():
    """docs/design.md's layout left out models/blocks.py, flow_layers.py, losses.py, vgg.py and
    srflow_variants.py: a reader looking for a layer found no word of where it lives."""
    layout = DESIGN.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w<>]+\.py", layout))
    modules = {p.name for p in (REPO / "sr_lib").rglob("*.py") if p.name != "__init__.py"}
    models = {f"{name}.py" for name in MODELS}  # models/<name>.py stands for these
    missing = sorted(m for m in modules - named if m not in models)
    assert not missing, missing
    assert "<name>.py" in named and "__init__.py" in named  # (the block was found)
