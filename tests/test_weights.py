"""sr_lib.weights: manifest parsing, lookup order, verified file:// downloads, safe loading."""

import collections
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch
import torchvision

from sr_lib import weights
from sr_lib.data import link_to_nothing
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.weights import Entry, load_manifest, load_state_dict, resolve, torchvision_model


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No user settings leak in, and the hub cache is a fresh temp folder."""
    monkeypatch.delenv("SRSPACE_WEIGHTS", raising=False)
    monkeypatch.delenv("SRSPACE_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def save_sd(path, value=1.0):
    """Write a tiny state_dict and return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.full((2, 3), value)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(tmp_path, text):
    path = tmp_path / "weights.txt"
    path.write_text(text)
    return path


def one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_parse_manifest(tmp_path):
    full = "AB" * 32
    path = write_manifest(
        tmp_path,
        "# header comment\n\n"
        f"full   {full}  https://example.org/models/full-0123abcd.pth\n"
        "prefix 0123abcd  https://example.org/models/prefix.pth   # trailing comment\n"
        "nourl  0123abcd  -\n"
        "nohash -         https://example.org/x/nohash.pt\n",
    )
    m = load_manifest(path)
    assert list(m) == ["full", "prefix", "nourl", "nohash"]
    assert m["full"].sha256 == full.lower()
    assert m["full"].filename == "full-0123abcd.pth"
    assert m["prefix"] == Entry("prefix", "0123abcd", "https://example.org/models/prefix.pth")
    assert m["nourl"].url is None and m["nourl"].filename == "nourl.pth"
    assert m["nohash"].sha256 is None and m["nohash"].filename == "nohash.pt"


@pytest.mark.parametrize(
    "bad, match",
    [
        ("a 0123abcd", "expected 'name sha256 url'"),
        ("a 0123abc https://x/a.pth", "sha256 must be"),
        ("a 0123abcz https://x/a.pth", "sha256 must be"),
        ("a 0123abcd a.pth", "url must be"),
        ("ok 0123abcd https://x/ok.pth", "duplicate name 'ok'"),
    ],
)
def test_malformed_line_names_line_number(tmp_path, bad, match):
    path = write_manifest(tmp_path, f"# comment\nok 0123abcd https://x/ok.pth\n{bad}\n")
    with pytest.raises(CheckpointError, match=match) as e:
        load_manifest(path)
    assert f"{path}:3:" in one_line(e)


def test_missing_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read weights manifest"):
        load_manifest(tmp_path / "nope.txt")


def test_real_manifest_has_torchvision_weights():
    m = load_manifest()
    for name in ("alexnet", "vgg19"):
        e = m[name]
        assert e.url.startswith("https://download.pytorch.org/models/")
        # torchvision names its files after the hash prefix, so the two columns must agree
        assert e.sha256 and e.sha256[:8] in e.filename
    assert m["alexnet"].filename == "alexnet-owt-7be5be79.pth"


def test_unknown_name_lists_known(tmp_path):
    m = {"a": Entry("a", None, None), "b": Entry("b", None, None)}
    with pytest.raises(CheckpointError, match=r"'zzz'.*known: a, b") as e:
        resolve("zzz", manifest=m)
    one_line(e)


def test_resolution_order(tmp_path, monkeypatch):
    sha = save_sd(tmp_path / "src.pth")
    m = {"net": Entry("net", sha[:8], "https://example.org/m/net-x.pth")}
    data = (tmp_path / "src.pth").read_bytes()
    explicit, env, hub = tmp_path / "given.pth", tmp_path / "env", tmp_path / "hub" / "checkpoints"
    for p in (explicit, env / "net-x.pth", hub / "net-x.pth"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(env))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")

    assert resolve("net", explicit, manifest=m) == explicit
    assert resolve("net", env, manifest=m) == env / "net-x.pth"  # a folder works as the path too
    assert resolve("net", manifest=m) == env / "net-x.pth"
    (env / "net-x.pth").unlink()
    assert resolve("net", manifest=m) == hub / "net-x.pth"
    monkeypatch.delenv("SRSPACE_WEIGHTS")
    assert resolve("net", manifest=m) == hub / "net-x.pth"


def test_manifest_path_argument(tmp_path):
    sha = save_sd(tmp_path / "hub" / "checkpoints" / "net.pth")
    path = write_manifest(tmp_path, f"net {sha} https://example.org/net.pth\n")
    assert resolve("net", manifest=path, offline=True).name == "net.pth"


def test_explicit_path_missing_or_mismatching(tmp_path):
    sha = save_sd(tmp_path / "good.pth")
    save_sd(tmp_path / "bad.pth", value=2.0)
    m = {"net": Entry("net", sha, "https://example.org/net.pth")}
    with pytest.raises(CheckpointError, match="does not exist") as e:
        resolve("net", tmp_path / "nope.pth", manifest=m)
    msg = one_line(e)
    assert str(tmp_path / "nope.pth") in msg and "https://example.org/net.pth" in msg and sha in msg
    with pytest.raises(CheckpointError, match=f"expected {sha}") as e:
        resolve("net", tmp_path / "bad.pth", manifest=m)
    assert "bad.pth" in one_line(e)


def test_mismatch_in_folder_is_an_error(tmp_path, monkeypatch):
    save_sd(tmp_path / "env" / "net.pth", value=2.0)
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "env"))
    m = {"net": Entry("net", "0123abcd", "https://example.org/net.pth")}
    with pytest.raises(CheckpointError, match=r"SRSPACE_WEIGHTS.*expected 0123abcd") as e:
        resolve("net", manifest=m)
    one_line(e)


@pytest.mark.parametrize("offline", [True, False])
def test_srspace_weights_not_a_folder(tmp_path, monkeypatch, offline):
    """$SRSPACE_WEIGHTS set to the weights file itself: the advice was to copy the file to
    FILE/alexnet-owt-7be5be79.pth (and, online, 'cannot write to FILE (File exists)'); a folder
    that does not exist is said to be missing."""
    sha = save_sd(tmp_path / "net-x.pth")
    m = {"net": Entry("net", sha, (tmp_path / "remote" / "net-x.pth").as_uri())}
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "net-x.pth"))
    with pytest.raises(CheckpointError) as e:
        resolve("net", manifest=m, offline=offline)
    msg = one_line(e)
    assert msg.startswith(f"$SRSPACE_WEIGHTS is {tmp_path / 'net-x.pth'}, a file, not a folder")
    assert f"folder that holds net-x.pth and the other weights files (e.g. {tmp_path})" in msg
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "typo"))
    with pytest.raises(CheckpointError) as e:
        resolve("net", manifest=m, offline=True)
    assert f"(the folder $SRSPACE_WEIGHTS={tmp_path / 'typo'} does not exist)" in one_line(e)


def test_the_folder_to_copy_weights_to_is_quoted_for_a_shell(tmp_path, monkeypatch):
    """The path the line tells to copy the weights file to (and the folder it suggests for
    $SRSPACE_WEIGHTS), pasted into a `cp`: one with a space was written bare, so the command
    copied to another path; now quoted as every path srspace suggests (design.md, "Errors")."""
    m = {"net": Entry("net", "0123abcd", "https://example.org/net.pth")}
    folder = tmp_path / "my weights"
    folder.mkdir()
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(folder))
    with pytest.raises(CheckpointError) as e:
        resolve("net", manifest=m, offline=True)
    assert f"copy it to '{folder}/net.pth', or set SRSPACE_WEIGHTS" in one_line(e), one_line(e)
    (folder / "net.pth").write_bytes(b"x")
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(folder / "net.pth"))
    with pytest.raises(CheckpointError) as e:
        resolve("net", manifest=m, offline=True)
    assert f"the other weights files (e.g. '{folder}')" in one_line(e), one_line(e)


def test_dash_entries_are_checked_for_existence_only(tmp_path, monkeypatch):
    m = {"flow": Entry("flow", None, None)}
    with pytest.raises(CheckpointError, match="no download URL") as e:
        resolve("flow", manifest=m, offline=False)
    assert str(tmp_path / "hub" / "checkpoints" / "flow.pth") in one_line(e)
    save_sd(tmp_path / "env" / "flow.pth")
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "env"))
    assert resolve("flow", manifest=m) == tmp_path / "env" / "flow.pth"


@pytest.mark.parametrize("use_env", [True, False])
def test_download_file_url(tmp_path, monkeypatch, use_env):
    sha = save_sd(tmp_path / "remote" / "net-abc.pth", value=3.0)
    m = {"net": Entry("net", sha[:8], (tmp_path / "remote" / "net-abc.pth").as_uri())}
    folder = tmp_path / "env" if use_env else tmp_path / "hub" / "checkpoints"
    if use_env:
        monkeypatch.setenv("SRSPACE_WEIGHTS", str(folder))
    got = resolve("net", manifest=m)
    assert got == folder / "net-abc.pth"
    assert os.listdir(folder) == ["net-abc.pth"]  # no temp file left over
    assert torch.equal(load_state_dict(got)["w"], torch.full((2, 3), 3.0))


def test_download_mismatch_leaves_nothing(tmp_path, monkeypatch):
    save_sd(tmp_path / "remote" / "net.pth")
    m = {"net": Entry("net", "0123abcd", (tmp_path / "remote" / "net.pth").as_uri())}
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "env"))
    with pytest.raises(CheckpointError, match="expected 0123abcd") as e:
        resolve("net", manifest=m)
    assert "nothing was saved" in one_line(e)
    assert os.listdir(tmp_path / "env") == []


def test_download_missing_source(tmp_path):
    url = (tmp_path / "remote" / "gone.pth").as_uri()
    with pytest.raises(CheckpointError, match="could not download") as e:
        resolve("net", manifest={"net": Entry("net", "0123abcd", url)})
    msg = one_line(e)
    assert url in msg and str(tmp_path / "hub" / "checkpoints" / "gone.pth") in msg
    assert "sha256 0123abcd" in msg
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []


@pytest.fixture
def server(tmp_path):
    """A local HTTP server of tmp_path/remote whose replies stop after a third of the file:
    /cut/NAME with its Content-Length, /chunked/NAME in chunked encoding, /NAME whole."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            how, _, name = self.path.strip("/").rpartition("/")
            data = (tmp_path / "remote" / name).read_bytes()
            self.send_response(200)
            if how == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(data) + data[: len(data) // 3])
            else:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 3] if how == "cut" else data)
            self.close_connection = True

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("how", ["cut", "chunked"])
@pytest.mark.parametrize("hashed", [True, False])
def test_download_cut_midway_leaves_nothing(tmp_path, server, how, hashed):
    """The server closes the connection midway: the cut file was kept as the weights where the
    manifest has no hash (and blamed as another file where it has one); a chunked reply cut short
    was a traceback, then 'IncompleteRead(...)' without 'run again'. Now one line says so, and
    nothing is left in the folder."""
    sha = save_sd(tmp_path / "remote" / "net.pth")
    size = (tmp_path / "remote" / "net.pth").stat().st_size
    m = {"net": Entry("net", sha if hashed else None, f"{server}/{how}/net.pth")}
    with pytest.raises(CheckpointError) as e:
        resolve("net", manifest=m)
    of = f" of {size}" if how == "cut" else ""  # a chunked reply announces no size
    assert one_line(e).startswith(
        f"download of {server}/{how}/net.pth stopped after {size // 3}{of} bytes (the connection "
        "closed); nothing was saved; run again, or download"
    )
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []
    m = {"net": Entry("net", sha if hashed else None, f"{server}/net.pth")}  # whole: it works
    assert resolve("net", manifest=m) == tmp_path / "hub" / "checkpoints" / "net.pth"


def test_a_download_under_several_ranks_is_said_by_each_rank_naming_it(
    tmp_path, server, monkeypatch, capsys
):
    """srun's 2 ranks, each on a node of its own ($SRSPACE_WEIGHTS its node's folder): each lacks
    the file and downloads it, and each printed the same rank-less line, whose node was unsaid
    (a 64-rank job: 64 alike). A node's own download: its line names its rank. Each rank here is
    this process under the variables srun gives that task: the rank is read from them at the
    download (the two nodes share nothing; two interpreters cost ~4 CPU-s)."""
    sha = save_sd(tmp_path / "remote" / "net.pth")
    manifest = {"net": Entry("net", sha, f"{server}/net.pth")}
    nodes = str(tmp_path / "node")
    for rank in (0, 1):
        srun_task = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(rank),
                     "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank),
                     "SRSPACE_WEIGHTS": f"{nodes}{rank}"}  # fmt: skip
        for name, value in srun_task.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert resolve("net", manifest=manifest) == tmp_path / f"node{rank}" / "net.pth"
        err = capsys.readouterr().err
        assert (
            err == f"srspace: rank {rank}: downloading {server}/net.pth to {nodes}{rank}/net.pth\n"
        )
        assert weights.sha256_file(f"{nodes}{rank}/net.pth") == sha


def test_the_download_line_is_one_printable_line(tmp_path, server, monkeypatch, capsys):
    """$SRSPACE_WEIGHTS as set (a newline, an ESC in it) was written raw into the line."""
    sha = save_sd(tmp_path / "remote" / "net.pth")
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "w\neights\x1b[2J"))
    resolve("net", manifest={"net": Entry("net", sha, f"{server}/net.pth")})
    err = capsys.readouterr().err
    assert (
        err == f"srspace: downloading {server}/net.pth to {tmp_path}/w\\neights\\x1b[2J/net.pth\n"
    )


def test_download_onto_a_full_disk(tmp_path):
    """A disk that fills during the download (here a 512-byte file size limit: EFBIG as ENOSPC)
    was 'could not download URL', with the advice to download it on a machine with internet."""
    save_sd(tmp_path / "remote" / "net.pth")
    url = (tmp_path / "remote" / "net.pth").as_uri()
    code = (
        "import resource, signal; from sr_lib.weights import Entry, resolve\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))\n"
        f"resolve('net', manifest={{'net': Entry('net', None, {url!r})}})"
    )
    env = {**os.environ, "SRSPACE_WEIGHTS": str(tmp_path / "w")}
    repo = os.path.dirname(os.path.dirname(__file__))
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True
    )
    target = tmp_path / "w" / "net.pth"
    assert f"cannot write {target} (File too large); nothing was saved: free space in" in p.stderr
    assert "CheckpointError" in p.stderr and os.listdir(tmp_path / "w") == []


@pytest.mark.parametrize("how", ["argument", "env"])
def test_offline_refuses_download(tmp_path, monkeypatch, how):
    sha = save_sd(tmp_path / "remote" / "net.pth")
    url = (tmp_path / "remote" / "net.pth").as_uri()
    if how == "env":
        monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline") as e:
        resolve(
            "net",
            manifest={"net": Entry("net", sha, url)},
            offline=True if how == "argument" else None,
        )
    msg = one_line(e)
    assert url in msg and f"sha256 {sha}" in msg and "SRSPACE_WEIGHTS" in msg
    assert f"copy it to {tmp_path / 'hub' / 'checkpoints' / 'net.pth'}" in msg
    assert not (tmp_path / "hub" / "checkpoints" / "net.pth").exists()


def test_hash_is_cached_per_file_state(tmp_path, monkeypatch):
    path = tmp_path / "net.pth"
    sha = save_sd(path)
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    m = {"net": Entry("net", sha, "-")}
    resolve("net", path, manifest=m)
    resolve("net", path, manifest=m)
    assert len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    resolve("net", path, manifest=m)
    assert len(calls) == 2


def test_load_state_dict_round_trip_and_prefixes(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b.bias": torch.zeros(3)}
    for prefix, saved in [
        ("", sd),
        ("module.", {"module." + k: v for k, v in sd.items()}),
        ("_orig_mod.", {"_orig_mod." + k: v for k, v in sd.items()}),
        ("both", {"module._orig_mod." + k: v for k, v in sd.items()}),
    ]:
        torch.save(saved, tmp_path / "x.pth")
        got = load_state_dict(tmp_path / "x.pth")
        assert got.keys() == sd.keys(), prefix
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    # only stripped when every key has it
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "mixed.pth")
    assert set(load_state_dict(tmp_path / "mixed.pth")) == {"module.a", "b"}


class Payload:
    """Stands in for arbitrary pickled code inside a downloaded file."""


@pytest.mark.parametrize(
    "kind, match",
    [
        ("pickle", r"refused: contains pickled Python objects.*Payload"),
        ("truncated", "not a valid torch file or is truncated"),
        (
            "garbage",
            r"not a torch file \(it begins b'this is an HTML error pa'; a weights "
            r"file was expected\): give the weights file, or fetch it again",
        ),
        ("empty", r"an empty file \(a weights file was expected\); copy it again"),
        ("not_a_dict", "is not a state_dict"),
        ("missing", "missing.pth: no such file"),
    ],
)
def test_load_state_dict_refuses(tmp_path, kind, match):
    path = tmp_path / f"{kind}.pth"
    if kind == "pickle":
        torch.save({"w": torch.ones(2), "extra": Payload()}, path)
    elif kind == "truncated":
        torch.save({"w": torch.ones(1000)}, tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is an HTML error page, not weights")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_a_dict":
        torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_state_dict(path)
    assert str(path) in one_line(e)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    path = tmp_path_factory.mktemp("alex") / "alexnet-random.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_torchvision_model_loads_strictly(alexnet_file, tmp_path):
    path, sd = alexnet_file
    m = {"alexnet": Entry("alexnet", None, "https://example.org/alexnet.pth")}
    model = torchvision_model("alexnet", path=path, manifest=m)
    assert isinstance(model, torchvision.models.AlexNet)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"does not fit torchvision alexnet.*missing") as e:
        torchvision_model("alexnet", path=tmp_path / "wrong.pth", manifest=m)
    assert "wrong.pth" in one_line(e)


def test_torchvision_model_leaves_the_callers_generator_as_it_was(alexnet_file):
    """A model builds its perceptual loss at its first step: the random initialisation that the
    loaded weights replace must not move the run's generator (a resumed run would draw other
    noise than the run it continues)."""
    m = {"alexnet": Entry("alexnet", None, "https://example.org/alexnet.pth")}
    before = torch.get_rng_state()
    torchvision_model("alexnet", path=alexnet_file[0], manifest=m)
    assert torch.equal(torch.get_rng_state(), before)


def test_torchvision_model_no_weights_and_unknown_name():
    model = torchvision_model("alexnet", pretrained=False, manifest={})
    assert isinstance(model, torchvision.models.AlexNet)
    with pytest.raises(UsageError, match="choose from alexnet, vgg19"):
        torchvision_model("resnet50")


@pytest.mark.parametrize("value", ["on", "TRUE", " 1", "Yes\n", "1", "true"])
def test_offline_spellings(tmp_path, monkeypatch, value):
    """The usual truthy spellings, in any case and with spaces, mean offline: 'on', 'TRUE' and
    ' 1' counted as online and downloaded."""
    save_sd(tmp_path / "remote" / "net.pth")
    m = {"net": Entry("net", None, (tmp_path / "remote" / "net.pth").as_uri())}
    monkeypatch.setenv("SRSPACE_OFFLINE", value)
    with pytest.raises(CheckpointError, match="downloads are off"):
        resolve("net", manifest=m)
    assert not (tmp_path / "hub" / "checkpoints" / "net.pth").exists()


@pytest.mark.parametrize("value", ["0", "False", "off", " no ", ""])
def test_online_spellings(tmp_path, monkeypatch, value):
    save_sd(tmp_path / "remote" / "net.pth")
    m = {"net": Entry("net", None, (tmp_path / "remote" / "net.pth").as_uri())}
    monkeypatch.setenv("SRSPACE_OFFLINE", value)
    assert resolve("net", manifest=m) == tmp_path / "hub" / "checkpoints" / "net.pth"


@pytest.mark.parametrize("value", ["ture", "2", "offline"])
def test_offline_neither_true_nor_false_is_an_error(tmp_path, monkeypatch, value):
    """A value that is neither (a typo) counted as online: now one line naming the variable."""
    save_sd(tmp_path / "remote" / "net.pth")
    m = {"net": Entry("net", None, (tmp_path / "remote" / "net.pth").as_uri())}
    monkeypatch.setenv("SRSPACE_OFFLINE", value)
    with pytest.raises(UsageError, match=f"SRSPACE_OFFLINE='{value}': use 1, true") as e:
        resolve("net", manifest=m)
    one_line(e)
    assert not (tmp_path / "hub" / "checkpoints" / "net.pth").exists()


@pytest.mark.parametrize("where", ["env", "hub", "path"])
def test_broken_link_says_so(tmp_path, monkeypatch, where):
    """A link to a weights file that was moved since was 'not found' at a path the user sees in
    the folder: now it is called a broken link, with the place it points to."""
    sha = save_sd(tmp_path / "moved" / "net.pth")
    folder = {"env": tmp_path / "w", "hub": tmp_path / "hub" / "checkpoints", "path": tmp_path}
    link = folder[where] / "net.pth"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to("../gone/net.pth" if where == "env" else tmp_path / "gone" / "net.pth")
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "w"))
    m = {"net": Entry("net", sha, None)}
    with pytest.raises(CheckpointError) as e:
        resolve("net", path=link if where == "path" else None, manifest=m)
    assert one_line(e).startswith(
        f"{link}: {link_to_nothing(link)} (moved or deleted); point it at the net weights file "
        "again, or delete it and copy"
    )
    assert link_to_nothing(link).endswith(f" {tmp_path / 'gone' / 'net.pth'}, which does not exist")
    link.unlink()  # linked to where the file is now: found
    link.symlink_to(tmp_path / "moved" / "net.pth")
    assert resolve("net", path=link if where == "path" else None, manifest=m) == link


@pytest.mark.parametrize("where", ["env", "path"])
def test_broken_link_whose_target_holds_a_semicolon_or_is_a_loop(tmp_path, monkeypatch, where):
    """The broken link's line cut describe_path's words at their first ';', which the quoted
    target may hold (a link to 'old;1/net.pth' was "a symbolic link to 'old", its quote open),
    and called a loop of links moved or deleted, to be pointed at the file "again": no file was
    moved. Now the whole target is said, and a loop is a loop, in $SRSPACE_WEIGHTS or named."""
    m = {"net": Entry("net", None, None)}
    folder = {"env": tmp_path / "w", "path": tmp_path}[where]
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "w"))
    link = folder / "net.pth"
    for target, said in [
        ("old;1/net.pth", f"a symbolic link to '{folder}/old;1/net.pth', which does not exist "
                          "(moved or deleted); point it at the net weights file again"),
        ("net.pth", "a loop of symbolic links (it points to net.pth); point it at the net "
                    "weights file"),
    ]:  # fmt: skip
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(CheckpointError) as e:
            resolve("net", path=link if where == "path" else None, manifest=m)
        assert one_line(e).startswith(f"{link}: {said}, or delete it and copy")


@pytest.mark.parametrize("empty", [collections.Counter(), {}])
def test_wrapped_state_dict_hint_skips_empty_dicts(tmp_path, empty):
    """An empty dict beside the tensors (a Counter of a training tool) was taken for the
    weights: 'its weights are under ['o']'. Only a dict that holds tensors is named."""
    path = tmp_path / "w.pth"
    torch.save({"x": torch.ones(2), "o": empty}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    assert one_line(e).endswith("; pass a file of torch.save(model.state_dict())")
    torch.save({"params": {"w": torch.ones(2)}, "o": empty}, path)  # a real wrapper is named
    with pytest.raises(CheckpointError, match=r"its weights are under \['params'\]"):
        load_state_dict(path)
