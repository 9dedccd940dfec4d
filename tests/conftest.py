"""Shared test fixtures: fixed seeds, tiny model configs, a tiny LR/HR batch."""

import builtins
import json
import multiprocessing.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from sr_lib.resize import imresize_torch

# One tiny config per registered model (test_models.py checks set(TINY) == set(MODELS)), so every
# model is exercised by the contract tests in well under a second.
TINY: dict[str, dict] = {
    "bicubic": {},
    "edsr": dict(n_feats=8, n_blocks=1),
    "rrdb": dict(nb=2, nf=8, gc=4),
    "srflow": dict(nb=2, nf=8, gc=4, rrdb_blocks="0,1", flow_steps=2, hidden_channels=8),
    "srflow_da": dict(nb=2, nf=8, gc=4, rrdb_blocks="0,1", flow_steps=2, hidden_channels=8),
    "ncsr": dict(nb=2, nf=8, gc=4, rrdb_blocks="0,1", flow_steps=2, hidden_channels=8),
    "vspsr": dict(n_basis=8, basis_channels=4, coef_channels=4, d_channels=4, lambda_per=0.0),
    "refvae": dict(
        width=16,
        cond_channels=4,
        latent_grid=2,
        z_dim=8,
        mask_blocks=1,
        ref_size=16,
        d_channels=4,
        pretrained=False,
    ),
    "varsr": dict(z_dim=8, n_feats=8, n_blocks=1, enc_feats=4, d_channels=4, pretrained=False),
}

# Tiny variants that switch on optional parts (the ℓ_E loss adds a σ branch and parameters).
TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "edsr_le": ("edsr", dict(TINY["edsr"], loss="le", le_sigma_feats=8)),
    "rrdb_le": ("rrdb", dict(TINY["rrdb"], loss="le", le_sigma_feats=8)),
}

# Contract-test cases: case id -> (registry name, tiny config).
CASES: dict[str, tuple[str, dict]] = {**{k: (k, v) for k, v in TINY.items()}, **TINY_VARIANTS}


def opens_of(path, *statements: str) -> tuple[int, subprocess.CompletedProcess]:
    """Runs `statements` in a Python of their own, from the repository, counting the opens of
    file `path` with the interpreter's audit hook (in a process of its own: a hook cannot be
    removed): (the count, the finished process, its output as text)."""
    code = "\n".join([
        "import sys",
        "opens = []",
        f"sys.addaudithook(lambda e, a: e == 'open' and str(a[0]) == {str(path)!r}"
        " and opens.append(a[1]))",
        *statements,
        "print('opens', len(opens), file=sys.stderr)",
    ])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    last = done.stderr.splitlines()[-1:]
    assert last and last[0].startswith("opens "), done.stderr[-2000:]
    return int(last[0].split()[1]), done


def opens_per_run(prefixes, script: str, argvs: dict) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs `script`.main(argv) for each argv of `argvs` in turn, in one Python of their own
    (the interpreter and torch start once), from the repository, counting each run's opens of
    the files whose path starts with one of `prefixes` with the interpreter's audit hook (as
    `opens_of`): ({key: [main's return, {path: opens}]}, the finished process)."""
    code = f"""import collections, json, sys
import {script}
opens = collections.Counter()

def hook(event, args):
    if event == "open" and str(args[0]).startswith({tuple(map(str, prefixes))!r}):
        opens[str(args[0])] += 1

sys.addaudithook(hook)
out = {{}}
for key, argv in {argvs!r}.items():
    opens.clear()
    out[key] = [{script}.main(argv), dict(opens)]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1]), done


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_in_a_terminal():
    """Tests send SIGINT to the scripts as Ctrl-C in a terminal does, to a foreground job, and
    SIGHUP as a closing terminal does. A test run started in the background of a shell script
    (`python -m pytest &`) inherits SIGINT ignored, one under `nohup` SIGHUP, and so would the
    scripts it starts, which then rightly keep ignoring them (`popen_in_background`): the
    default dispositions for this process and its children."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL}
    ignored = [s for s in defaults if signal.getsignal(s) is signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, defaults[s])
    try:
        yield
    finally:
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)


@pytest.fixture
def popen_in_background():
    """subprocess.Popen, the child started with SIGINT ignored, as a shell starts `cmd &`."""

    def start(*args, **kwargs):
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec
        try:
            return subprocess.Popen(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, before)

    return start


@pytest.fixture
def own_temp_dir():
    """The system's temporary folder for this test, its processes and theirs: a new folder in
    it, removed after the test (TMPDIR for the scripts it starts, tempfile's folder and
    multiprocessing's for the loader workers this process forks). A script's loader workers
    hand over batches through sockets in its multiprocessing folder ($TMPDIR/pymp-*), which a
    test can look at here. This process keeps its multiprocessing folder for its life (made at
    the first loader with workers, sr_lib.data.make_socket_folder): made in here, it would be
    gone for every later test's workers; so here this folder stands in for it, as for a new
    process. Not inside tmp_path: the workers' sockets live in it, and an AF_UNIX path holds
    107 bytes (sr_lib.data.check_socket_folder). Its own MonkeyPatch: a test may undo its own."""
    folder = Path(tempfile.mkdtemp(prefix="srt-"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", str(folder))
            mp.setattr(tempfile, "tempdir", str(folder))
            mp.setattr(multiprocessing.util, "get_temp_dir", lambda: str(folder))  # (forked)
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def worker_hang():
    """Lines of a `python -c` script whose training loader worker hangs from batch `step` (0 is
    step 1's) on, as a forked worker can on Python before 3.12 (CPython gh-112275), first writing
    its pid to `pid_file`; the loader waits `timeout` s for a batch (LOADER_TIMEOUT)."""

    def lines(step: int, pid_file: Path, timeout: float) -> str:
        return f"""
import os, time, sr_lib.data
sr_lib.data.LOADER_TIMEOUT = {timeout!r}
real_crops = sr_lib.data.PatchPairs.crops
def crops(self, step):  # in the forked worker
    if step >= {step}:
        with open({str(pid_file)!r}, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)
    return real_crops(self, step)
sr_lib.data.PatchPairs.crops = crops
"""

    return lines


def process_state() -> dict:
    """What a test may change only for its own duration: state of the test process that every
    later test on the same worker inherits (a test run alone, or first on its xdist worker, does
    not see what another test left)."""
    environ = {k: v for k, v in os.environ.items() if k not in NOT_THE_TESTS}
    return {
        "cwd": os.getcwd(),
        "sys.path": [p for p in sys.path if p != torch_template_dir()],
        "os.environ": environ,
        "default dtype": torch.get_default_dtype(),
        "default device": torch.get_default_device(),
        "threads": torch.get_num_threads(),
        "grad enabled": torch.is_grad_enabled(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.allow_tf32),
        "matmul": (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
        "signal handlers": {s: signal.getsignal(s) for s in PROCESS_SIGNALS},
        "warnings.formatwarning": warnings.formatwarning,
    }  # fmt: skip


def torch_template_dir() -> str | None:
    """The temporary folder torch.distributed.nn.jit.instantiator adds to sys.path when first
    imported (torch 2.6: by the first test to import torch._dynamo), for the process's life."""
    module = sys.modules.get("torch.distributed.nn.jit.instantiator")
    return getattr(module, "INSTANTIATED_TEMPLATE_DIR_PATH", None)


# Environment variables set by others: pytest (the test running) and torch's compiler (its cache
# folders, set once per process at the first use).
NOT_THE_TESTS = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
PROCESS_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGXFSZ)


@pytest.fixture(autouse=True)
def restores_process_state():
    """A test that changes the process's state (cwd, sys.path, environment variables, torch's
    global settings, signal handlers) must put it back (monkeypatch does): checked after each."""
    before = process_state()
    yield
    after = process_state()
    changed = {k: changes(before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the test left the process changed (before, after): {changed}"


def changes(before, after):
    """(before, after); of a dict, only the keys whose value differs (None: absent)."""
    if isinstance(before, dict):
        keys = sorted(set(before) | set(after), key=str)
        return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}
    return before, after


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state (model init, z draws)."""
    torch.manual_seed(0)


@pytest.fixture
def make_batch():
    """make_batch(scale, b=2, h=8, w=8) -> (lr, hr): seeded HR in [0, 1], LR = bicubic(HR, 1/s)."""

    def make(scale: int, b: int = 2, h: int = 8, w: int = 8):
        g = torch.Generator().manual_seed(1234)
        hr = torch.rand(b, 3, h * scale, w * scale, generator=g)
        lr = imresize_torch(hr, 1 / scale).clamp(0, 1)
        return lr, hr

    return make


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: intra-op threads only spin-wait, several times slower on a busy 2-core box.
    The scripts the tests run as subprocesses get one thread too (OMP_NUM_THREADS, which
    sr_train.py follows as a SLURM job's CPU count): two test workers, each starting a script
    with a thread per core, made a 2-core box run four threads, and the script tests about a
    quarter slower. A test of the thread count itself removes the variable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = before


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder `tmp_path/ro` in which creating or writing a file fails as it does for a normal
    user in a read-only folder (PermissionError from os.open() and open(); root, which runs the
    tests, ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_os_open, real_open = os.open, builtins.open

    def refused(path) -> bool:
        return ro in Path(os.fsdecode(path)).parents

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wxa") and refused(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    return ro


LOST_GROUP = (
    "pytest-xdist's --dist loadgroup did not keep this test's xdist_group on one worker (pytest "
    f"{pytest.__version__} drops the group: pytest-xdist issue 1386); "
    "pip install -r requirements-dev.txt"
)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own, which names the groups
def pytest_collection_modifyitems(config, items):
    """pytest-xdist's `--dist loadgroup` keeps a group's tests on one worker by a suffix it adds
    to their ids (`@group`); pytest 9.2 ignores that and the groups spread over the workers
    without a word: module fixtures then run once per worker, and the `torchrun` group's free
    ports can race. Each grouped test then fails at its set-up, saying why."""
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return
    for item in items:
        names = {str((m.args or [m.kwargs.get("name", "default")])[0])
                 for m in item.iter_markers("xdist_group")}  # fmt: skip
        if names and not item.nodeid.endswith("@" + "_".join(sorted(names))):
            item.fixturenames.insert(0, "lost_xdist_group")


@pytest.fixture
def lost_xdist_group():
    pytest.fail(LOST_GROUP, pytrace=False)
