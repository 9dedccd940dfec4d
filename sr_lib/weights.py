"""Pretrained weights: the weights.txt manifest, offline-friendly lookup, and safe loading.

Compute nodes often have no internet, so a file is found, in order, at an explicit path, in
$SRSPACE_WEIGHTS, or in the torch hub cache (where torchvision keeps the same files), and is only
downloaded as a last resort (never with SRSPACE_OFFLINE=1). Every file is checked against the
manifest's sha256 before use, and loading refuses pickles that could run code.
"""

import contextlib
import errno
import hashlib
import http.client
import os
import pickle
import pickletools
import re
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sr_lib import distributed
from sr_lib.data import describe_path, shell_quote
from sr_lib.errors import CheckpointError, UsageError, joined_lines, say_err

MANIFEST = Path(__file__).resolve().parent.parent / "weights.txt"
CHUNK = 1 << 20  # hash and download in 1 MiB pieces so big files never sit in memory
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / torch.compile wrappers add these


@dataclass(frozen=True)
class Entry:
    """One manifest line; sha256 and url are None where the manifest says `-`."""

    name: str
    sha256: str | None
    url: str | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else f"{self.name}.pth"


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, Entry]:
    """Parse `name sha256 url` lines; `#` starts a comment."""
    path = Path(path) if path is not None else MANIFEST
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read weights manifest {path}: {e.strerror}") from None
    entries: dict[str, Entry] = {}
    for i, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{i}"
        if len(fields) != 3:
            raise CheckpointError(f"{where}: expected 'name sha256 url', got {line.strip()!r}")
        name, sha, url = fields
        sha = sha.lower()
        if sha != "-" and not re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{64}", sha):
            raise CheckpointError(
                f"{where}: sha256 must be 64 hex digits, an 8-hex prefix or '-', got {sha!r}"
            )
        if url != "-" and "://" not in url:
            raise CheckpointError(f"{where}: url must be a full URL or '-', got {url!r}")
        if name in entries:
            raise CheckpointError(f"{where}: duplicate name {name!r}")
        entries[name] = Entry(name, None if sha == "-" else sha, None if url == "-" else url)
    return entries


def _entry(name: str, manifest) -> Entry:
    entries = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    if name not in entries:
        where = "the given manifest" if isinstance(manifest, dict) else (manifest or MANIFEST)
        known = ", ".join(sorted(entries)) or "none"
        raise CheckpointError(
            f"no weights named {name!r} in {where} (known: {known}); add a 'name sha256 url' line"
        )
    return entries[name]


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in pieces."""
    with open(path, "rb") as f:
        return _sha256(f)


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    # VGG19 is 548 MB: hash each file once per process unless it changes on disk.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def _matches(digest: str, expected: str | None) -> bool:
    return expected is None or digest.startswith(expected)


def _check(path: Path, entry: Entry, how: str) -> Path:
    digest = _file_sha256(path)
    if not _matches(digest, entry.sha256):
        raise CheckpointError(
            f"{path} ({how}) has sha256 {digest[:16]}..., expected {entry.sha256} for "
            f"{entry.name!r}; the file is corrupt or a different one: delete it and "
            f"{_how_to_stage(entry, path)}"
        )
    return path


def _how_to_stage(entry: Entry, path: Path) -> str:
    """Where to put the weights file, and how: the path to paste into a `cp`, quoted for a
    shell (`shell_quote`: a $SRSPACE_WEIGHTS of a folder with a space)."""
    sha = f"sha256 {entry.sha256}" if entry.sha256 else "sha256 not checked"
    path = shell_quote(path)
    if entry.url is None:
        where = f"copy the {entry.name} weights file (no public URL; {sha}) to {path}"
    else:
        where = f"download {entry.url} ({sha}) on a machine with internet and copy it to {path}"
    return where + ", or set SRSPACE_WEIGHTS to the folder holding it"


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _refuse_broken_link(path: Path, entry: Entry) -> None:
    """A link to a weights file that was moved or deleted read as "not found", where the user
    sees the file's name in the folder: say what it is and where it points (a loop of links:
    that it is one)."""
    if path.is_symlink() and not path.exists():
        # describe_path's words without its advice (this line's own follows): its last "; ",
        # not its first, which a target (quoted) may hold
        said = describe_path(path, "file").rsplit("; ", 1)[0]
        # a loop of links points at no file that could have been moved: no "again"
        loop = Path(os.path.realpath(path)).is_symlink()  # (realpath stops in a loop)
        raise CheckpointError(
            f"{path}: {said}{'' if loop else ' (moved or deleted)'}; point it at the "
            f"{entry.name} weights file{'' if loop else ' again'}, or delete it and "
            f"{_how_to_stage(entry, path)}"
        )


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    value = os.environ.get("SRSPACE_OFFLINE", "")
    if value.strip().lower() not in _TRUE + _FALSE:  # a typo must not mean "go online"
        raise UsageError(
            f"SRSPACE_OFFLINE={value!r}: use 1, true, yes or on (no downloads) or 0, false, no, "
            "off or unset (download what is missing)"
        )
    return value.strip().lower() in _TRUE


def resolve(
    name: str,
    path: str | os.PathLike | None = None,
    offline: bool | None = None,
    manifest: str | os.PathLike | dict[str, Entry] | None = None,
) -> Path:
    """Return a verified local file for manifest entry `name`, downloading it if allowed.

    Order: `path` (a file, or a folder holding the file), $SRSPACE_WEIGHTS, the torch hub cache,
    then a download into $SRSPACE_WEIGHTS (or the hub cache). `offline=None` reads SRSPACE_OFFLINE.
    """
    entry = _entry(name, manifest)
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / entry.filename
        _refuse_broken_link(p, entry)
        if not p.is_file():
            raise CheckpointError(
                f"weights file {p} for {name!r} does not exist; fix the path or "
                f"{_how_to_stage(entry, p)}"
            )
        return _check(p, entry, "given path")

    env = os.environ.get("SRSPACE_WEIGHTS")
    folders = {"$SRSPACE_WEIGHTS": Path(env).expanduser()} if env else {}
    if env and folders["$SRSPACE_WEIGHTS"].is_file():  # its files' folder is what it names
        raise CheckpointError(
            f"$SRSPACE_WEIGHTS is {env}, a file, not a folder: set it to the folder that holds "
            f"{entry.filename} and the other weights files (e.g. {shell_quote(Path(env).parent)})"
        )
    folders["torch hub cache"] = _hub_dir()
    for how, folder in folders.items():
        _refuse_broken_link(folder / entry.filename, entry)
        if (folder / entry.filename).is_file():
            return _check(folder / entry.filename, entry, how)

    target = next(iter(folders.values())) / entry.filename
    searched = " or ".join(str(f / entry.filename) for f in folders.values())
    if env and not folders["$SRSPACE_WEIGHTS"].is_dir():  # a typo, or a folder not mounted here
        searched += f" (the folder $SRSPACE_WEIGHTS={env} does not exist)"
    if entry.url is None:
        raise CheckpointError(
            f"weights {name!r} not found at {searched} and have no download URL; "
            f"{_how_to_stage(entry, target)}"
        )
    if _is_offline(offline):
        raise CheckpointError(
            f"weights {name!r} not found at {searched} and downloads are off (offline); "
            f"{_how_to_stage(entry, target)}"
        )
    return _download(entry, target)


def _download(entry: Entry, target: Path) -> Path:
    # Write to a temp file next to the target and rename it, so an interrupted or corrupt
    # download never leaves a file that a later run would pick up.
    stage = _how_to_stage(entry, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise CheckpointError(f"cannot write to {target.parent} ({e.strerror}); {stage}") from None
    tmp = Path(tmp)
    try:
        # Under torchrun/srun every rank lacking the file downloads it (each node its own
        # $SRSPACE_WEIGHTS or hub cache): a node's own doing, so the line names its rank
        ranks = distributed.env_ranks()
        who = f"rank {ranks[0]}: " if ranks and ranks[1] > 1 else ""
        say_err(f"srspace: {who}downloading {entry.url} to {target}")  # (one line: `one_line`)
        h, got = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(entry.url, timeout=60) as r:
            size = int(r.headers.get("Content-Length") or -1)
            cut = False
            try:
                while chunk := r.read(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                    got += len(chunk)
            except http.client.IncompleteRead as e:  # a chunked reply cut short says so
                cut = True
                while isinstance(e, http.client.IncompleteRead):  # the chunks read whole in
                    got, e = got + len(e.partial), e.__context__  # this call, then the cut one
        # A connection closed midway ends the read like the end of the file: only the announced
        # size tells (an unhashed entry would keep the cut file, a hashed one blame the file).
        if cut or 0 <= size != got:
            of = f" of {size}" if size >= 0 else ""
            raise CheckpointError(
                f"download of {entry.url} stopped after {got}{of} bytes (the connection "
                f"closed); nothing was saved; run again, or {stage}"
            )
        digest = h.hexdigest()
        if not _matches(digest, entry.sha256):
            raise CheckpointError(
                f"download of {entry.url} has sha256 {digest[:16]}..., expected {entry.sha256} "
                f"for {entry.name!r}; nothing was saved; {stage}"
            )
        os.replace(tmp, target)
        st = target.stat()  # so the next resolve() does not hash it again
        _digests[(str(target.resolve()), st.st_size, st.st_mtime_ns)] = digest
    except (OSError, ValueError, http.client.HTTPException) as e:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise CheckpointError(  # not the network's fault: another machine would not help
                f"cannot write {target} ({e.strerror}); nothing was saved: free space in "
                f"{target.parent}, or set SRSPACE_WEIGHTS to a folder with room"
            ) from None
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise CheckpointError(f"could not download {entry.url} ({reason}); {stage}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_strict(
    module: torch.nn.Module, sd: dict, what: str, hint: str = "", optional: tuple[str, ...] = ()
) -> None:
    """load_state_dict(strict=True), but a mismatch is one CheckpointError line (`what`: ...)
    counting the missing, unexpected and wrongly shaped keys (torch's own error is many lines).
    Keys starting with an `optional` prefix may be missing (the module keeps its own) or extra."""
    own = module.state_dict()
    found = {
        "missing keys": [k for k in own if k not in sd and not k.startswith(optional)],
        "unexpected keys": [k for k in sd if k not in own and not k.startswith(optional)],
        "shape mismatches": [k for k in own if k in sd and own[k].shape != sd[k].shape],
    }
    if any(found.values()):
        parts = ", ".join(f"{len(v)} {k} {v[:3]}" for k, v in found.items() if v)
        raise CheckpointError(f"{what}: {parts}" + (f"; {hint}" if hint else ""))
    module.load_state_dict({k: sd.get(k, v) for k, v in own.items()}, strict=True)


def torch_load(path: str | os.PathLike, what: str = "weights", file=None):
    """torch.load(weights_only=True) on CPU; every failure is a one-line CheckpointError.
    `file`: `path` opened by the caller (binary), to load from instead of opening it again."""
    path = Path(path)
    # a run's --out folder ("it does not exist" misleads), a link to nothing, a loop, a pipe
    # (torch.load seeks: a file only): their words in every script (an --lpips-weights has no
    # one name to suggest)
    example = "last.pt" if what == "checkpoint" else ""
    if file is None and (said := describe_path(path, "file", example=example)):
        raise CheckpointError(f"{path}: {said}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path if file is None else file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A zip (torch.save) or pickle stream whose content the weights-only unpickler refused.
        if "Weights only load failed" in str(e) and torch_like(first_bytes(path, file)):
            found = re.search(r"GLOBAL (\S+)", str(e))
            obj = f" ({found.group(1)})" if found else ""
            by = written_by(path, file)
            # srspace writes tensors and plain values only: a torch type in a file another torch
            # wrote is one of that torch's (a new dtype), not code
            other = by.get("torch", str(torch.__version__)) != str(torch.__version__)
            if found and found.group(1).startswith("torch.") and other:
                raise CheckpointError(
                    f"{path}: written by {_named(by)}: holds {found.group(1)}, which this torch "
                    f"({torch.__version__}) cannot read; load it with that torch or a newer one"
                ) from None
            raise CheckpointError(
                f"{path}: refused: contains pickled Python objects{obj} that could run code; "
                "only tensors and plain Python values are loaded"
            ) from None
        raise CheckpointError(f"{path}: not a torch {what} file (unpickling failed)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for broken files
        if "maximum supported version" in str(e):  # whole, but a newer torch's file format
            by = written_by(path, file)
            by = _named(by) if "torch" in by else "a newer torch"
            raise CheckpointError(
                f"{path}: written by {by}, in a file format this torch ({torch.__version__}) "
                "cannot read; load it with that torch or a newer one"
            ) from None
        head = first_bytes(path, file)
        if not head:  # (a copy cut short before its first byte)
            raise CheckpointError(f"{path}: an empty file (a {what} file was expected); copy "
                                  "it again") from None  # fmt: skip
        if not torch_like(head):  # neither torch.save's zip nor a pickle:
            # another file given (notes.txt as --resume), or a download's error page, where
            # "truncated ... copy it again" sent the user copying the wrong file again
            raise CheckpointError(
                f"{path}: not a torch file (it begins {head!r}; a {what} file was expected): "
                f"give the {what} file, or fetch it again where this was a download"
            ) from None
        raise CheckpointError(
            f"{path}: not a valid torch file or is truncated (a {what} file was expected; "
            f"{type(e).__name__}: {joined_lines(str(e))}); copy it again"
        ) from None


def first_bytes(path: str | os.PathLike, file=None) -> bytes:
    """The first 24 bytes of `path` (or of `file`, opened by the caller), for what a file is."""
    with open(path, "rb") if file is None else contextlib.nullcontext(file) as f:
        f.seek(0)
        return f.read(24)


def torch_like(head: bytes) -> bool:
    """Whether a file's first bytes are torch.save's zip or a pickle stream."""
    return head[:2] == b"PK" or head[:1] == b"\x80"


def written_by(path: str | os.PathLike, file=None) -> dict[str, str]:
    """{"version": srspace's, "torch": torch's}: the versions a checkpoint records (first, by
    sr_lib.checkpoint), read from its pickle without running it, for the message about a file
    this torch cannot load; those it records ({} for a file that is not srspace's)."""
    found, key = {}, None
    try:
        with zipfile.ZipFile(path if file is None else file) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        strings = 0
        for op, arg, _ in pickletools.genops(pkl):
            if op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
                continue  # (the pickler's bookkeeping between a key and its value)
            text = "UNICODE" in op.name
            if text and key is not None:
                found[key] = arg
            key = arg if text and arg in ("version", "torch") and arg not in found else None
            strings += text
            if len(found) == 2 or strings > 5:  # the payload's first keys only, not a nested one
                break
    except Exception:  # (not a zip, no pickle, an opcode of a newer pickle protocol)
        pass
    finally:
        if file is not None:
            file.seek(0)
    return found


def _named(by: dict[str, str]) -> str:
    names = {"version": "srspace", "torch": "torch"}
    return ", ".join(f"{names[k]} {v}" for k, v in by.items())


def is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain tensor state_dict on CPU, refusing anything that needs pickled code."""
    return as_state_dict(torch_load(path), path)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(load_state_dict(path), the file's sha256) from one open of it (`read_hashed`)."""
    sd, sha256 = read_hashed(path)
    return as_state_dict(sd, path), sha256


def read_hashed(path: str | os.PathLike, what: str = "weights") -> tuple[object, str]:
    """(torch_load(path, what), the file's sha256) from one open of it: hashed in pieces, then
    loaded from the same open file, whose pages the hashing left in the page cache. A weights
    file or checkpoint of hundreds of MB on a network file system is fetched once, not once to
    hash and again to load (and it is the file hashed that is loaded, even if it is replaced
    meanwhile)."""
    path = Path(path)
    if not path.is_file():
        return torch_load(path, what)  # (raises its one-line error: no such file, a folder)
    try:
        with open(path, "rb") as f:
            sha256 = _sha256(f)
            f.seek(0)
            return torch_load(path, what, file=f), sha256
    except OSError as e:  # (unreadable: torch_load's own failures are CheckpointErrors)
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None


def as_state_dict(sd, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`sd`, the loaded contents of file `path`, as a name -> tensor dict without the wrappers'
    key prefixes; anything else is a one-line CheckpointError saying what to pass instead."""
    if not is_tensor_dict(sd):
        got = f"dict with keys {list(sd)[:5]}" if isinstance(sd, dict) else type(sd).__name__
        # Other tools wrap the state_dict (BasicSR: 'params'/'params_ema'; Lightning:
        # 'state_dict'): which entry holds the weights is theirs to say, so name the way out.
        entries = sd.items() if isinstance(sd, dict) else []
        inner = [k for k, v in entries if is_tensor_dict(v) and v]  # (an empty one holds none)
        todo = (
            f"its weights are under {inner}: save one of them alone, "
            f"torch.save(torch.load(OLD, weights_only=True)[{inner[0]!r}], NEW), and pass NEW"
            if inner
            else "pass a file of torch.save(model.state_dict())"
        )
        raise CheckpointError(f"{path} is not a state_dict of name -> tensor (got {got}); {todo}")
    while sd and (pre := next((p for p in _PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(pre) :]: v for k, v in sd.items()}
    return sd


_TORCHVISION = ("alexnet", "vgg19")


def torchvision_model(
    name: str,
    path: str | os.PathLike | None = None,
    offline: bool | None = None,
    pretrained: bool = True,
    manifest: str | os.PathLike | dict[str, Entry] | None = None,
) -> torch.nn.Module:
    """Build torchvision `name` and, if `pretrained`, load its resolved weights strictly."""
    import torchvision  # imported here: most callers of this module never need it

    if name not in _TORCHVISION:
        raise UsageError(
            f"unknown torchvision model {name!r}; choose from {', '.join(_TORCHVISION)}"
        )
    # Its initialisation, replaced by the loaded weights, must not move the run's generator: a
    # model builds its perceptual loss on first use, and a resumed run would otherwise draw other
    # noise than the run it continues.
    with torch.random.fork_rng(devices=[]):
        model = getattr(torchvision.models, name)(weights=None)
    if not pretrained:
        return model
    file = resolve(name, path, offline, manifest)
    sd = load_state_dict(file)
    load_strict(
        model, sd, f"{file} does not fit torchvision {name}", f"pass the {name} weights file"
    )
    return model
