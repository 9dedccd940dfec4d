"""sr_eval.py --pairwise: the LPIPS between the samples of each image, end to end on tiny sets.

LPIPS uses the seeded random-weight state_dict of test_eval_cli (--lpips-weights): the numbers only
show that the CLI and the lpips package's own calls agree; they are not real LPIPS values.
"""

import csv
import json

import lpips
import numpy as np
import pytest
import test_eval_cli
import torch
from test_eval_cli import fails, make_set, run, stop_at_image

import sr_eval
from sr_lib.data import read_image

lpips_file = test_eval_cli.lpips_file  # the fixture: a random-weight LPIPS state_dict
MATRIX = "LPIPS_pairwise_matrix"


def lpips_pairs(hr_dir, sr_dir, n, weights):
    """Per HR image the N x N matrix of the lpips package's default call between its samples'
    official (mod-8) crops, pair by pair: lpips.LPIPS(net="alex", version="0.1")(x_i, x_j)."""
    net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    net.load_state_dict(torch.load(weights, weights_only=True))
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # noqa: E731
    out = []
    for k, hr in enumerate(sorted(hr_dir.iterdir())):
        h, w = (d // 8 * 8 for d in read_image(hr).shape[:2])
        x = [t(read_image(sr_dir / f"{k:06d}_sample{i:05d}.png")[:h, :w]) for i in range(n)]
        m = np.zeros((n, n))
        with torch.no_grad():
            for i in range(n):
                for j in range(i + 1, n):
                    m[i, j] = m[j, i] = float(net(x[i], x[j]))
        out.append(m)
    return out


def test_pairwise_columns_and_matrices_in_csv_and_json(tmp_path, capsys, lpips_file):
    """--pairwise adds LPIPS_pairwise last to the table, the CSV, the per-image rows and the
    means, and the matrix to --out's rows: the lpips package's pairwise calls (CPU, batch 1: to
    the bit), symmetric, zero diagonal, the column their mean over the pairs. A row of N = 1 has
    both null (empty in the CSV), said in one warning line; every other number is that of a run
    without --pairwise."""
    hr_dir, _, sr_dir = make_set(tmp_path)  # 2 images, N = 3
    argv = ["--hr", hr_dir, "--sr", sr_dir, f"one={sr_dir}:1", "--scale", 4, "--n", 3,
            "--lpips-weights", lpips_file, "--device", "cpu"]  # fmt: skip
    out, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    code, cap = run(capsys, *argv, "--pairwise", "--out", out, "--csv", csv_path)
    assert code == 0 and "LPIPS_pairwise" in cap.out
    assert (
        cap.err.count("warning") == 1
        and (
            "sr_eval.py: warning: --pairwise: one: one sample per image (N = 1), no pairs; "
            "LPIPS_pairwise is left empty there\n"
        )
        in cap.err
    )
    res = json.loads(out.read_text())
    assert (
        res["settings"]["columns"][-1] == "LPIPS_pairwise" and res["settings"]["args"]["pairwise"]
    )
    a, one = res["methods"]["method_a"], res["methods"]["one"]
    for row, want in zip(a["per_image"], lpips_pairs(hr_dir, sr_dir, 3, lpips_file)):
        got = np.array(row[MATRIX])
        assert got.shape == (3, 3) and (got == got.T).all() and not got.diagonal().any()
        assert (got == want).all()  # float32 values, exactly
        assert row["LPIPS_pairwise"] == pytest.approx(want[np.triu_indices(3, 1)].mean(), rel=1e-12)
    means = [r["LPIPS_pairwise"] for r in a["per_image"]]
    assert a["mean"]["LPIPS_pairwise"] == pytest.approx(np.mean(means), rel=1e-12)
    assert one["mean"]["LPIPS_pairwise"] is None
    assert all(r["LPIPS_pairwise"] is None and r[MATRIX] is None for r in one["per_image"])
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "LPIPS_pairwise" and MATRIX not in rows[0]
    assert [float(r["LPIPS_pairwise"]) for r in rows[:2]] == means
    assert [r["LPIPS_pairwise"] for r in rows[2:]] == ["", ""]

    plain = tmp_path / "plain.json"
    assert run(capsys, *argv, "--out", plain)[0] == 0
    without = json.loads(plain.read_text())["methods"]
    for name, m in res["methods"].items():
        dropped = [{k: v for k, v in r.items() if "pairwise" not in k} for r in m["per_image"]]
        assert dropped == without[name]["per_image"]


def test_pairwise_with_ntire_json_and_quiet(tmp_path, capsys, lpips_file):
    """--ntire --pairwise: the four official columns, then LPIPS_pairwise; --json's mean has it,
    and --quiet leaves stdout that line alone."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--ntire", "--pairwise",
            "--lpips-weights", lpips_file, "--out", tmp_path / "r.json", "--json",
            "--quiet"]  # fmt: skip
    code, cap = run(capsys, *argv)
    line = json.loads(cap.out)
    assert code == 0 and cap.out.count("\n") == 1 and cap.err == ""
    res = json.loads((tmp_path / "r.json").read_text())
    columns = ["LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score", "LPIPS_pairwise"]
    assert res["settings"]["columns"] == columns == list(line["mean"]["method_a"])
    assert line["mean"]["method_a"]["LPIPS_pairwise"] == res["mean"]["LPIPS_pairwise"] > 0
    assert set(res["per_image"][0]) == {"image", *columns, MATRIX}


def test_pairwise_without_lpips_is_a_usage_error(tmp_path, capsys):
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    code, err = fails(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                      "--no-lpips", "--pairwise")  # fmt: skip
    assert (code, err) == (2, "sr_eval.py: error: --pairwise is LPIPS between the samples: drop "
                           "--no-lpips or --pairwise\n")  # fmt: skip


def more_passes(n: int, block: int) -> int:
    """The trunk passes that the pairs of n samples in blocks of `block` add: each block's but
    the first (kept from the LPIPS passes) and the last of one sample (no pair left), and the
    samples after each block (paired with it)."""
    total = first = 0
    while n - first > 1:
        size = min(block, n - first)
        total += (size if first else 0) + n - first - size
        first += size
    return total


def test_pairwise_features_that_do_not_fit_are_computed_in_blocks(
    tmp_path, capsys, monkeypatch, lpips_file
):
    """The taps kept for the pairs (metrics.pairwise_bytes) against the free memory
    (`free_memory`): where those of all N samples do not fit, the run was refused (exit 4); now
    the pairs are computed in blocks of as many samples as fit (the others' taps computed
    again), and --out is the bytes of a run where all fit: the lpips package's numbers at batch
    1, those of the unblocked path at --lpips-batch 2. Only where one LPIPS batch's taps do not
    fit is it refused: one line, exit 4, before LPIPS is loaded, any image scored or any output
    written, naming a smaller --lpips-batch where one fits."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=5)  # 48x64 and 53x70: the same 48x64 crop
    one, all5 = (sr_eval.metrics.pairwise_bytes((53, 70), 5, 4, k) for k in (1, None))
    assert all5 == 4 * (5 * sr_eval.metrics.alex_tap_values(48, 64) + 64 * 11 * 15)
    real_taps, passes = sr_eval.metrics.LpipsMetric.taps, []

    def taps(self, sr, copy=True):  # the trunk passes that the blocks add
        passes.append(len(sr))
        return real_taps(self, sr, copy)

    monkeypatch.setattr(sr_eval.metrics.LpipsMetric, "taps", taps)
    out = tmp_path / "res" / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, f"b={sr_dir}:2", "--scale", 4, "--n", 5,
            "--pairwise", "--lpips-weights", lpips_file, "--out", out]  # fmt: skip
    whole = {}
    for batch in ("1", "2"):
        # what the scoring itself takes beside the features (the 53x70 image's: the largest)
        reserve = sr_eval.scoring_reserve((53, 70), torch.device("cpu"), int(batch), [5, 2])
        monkeypatch.setattr(sr_eval, "free_memory", lambda device, f=reserve + all5: f)
        assert run(capsys, *argv, "--lpips-batch", batch)[0] == 0 and passes == []
        whole[batch] = out.read_bytes()
        # all five's features would fit only by taking a byte of the scoring's own: in blocks
        monkeypatch.setattr(sr_eval, "free_memory", lambda device, f=reserve + all5 - 1: f)
        assert run(capsys, *argv, "--lpips-batch", batch)[0] == 0
        assert out.read_bytes() == whole[batch] and passes, batch
        passes.clear()
        for fit in (1, 3) if batch == "1" else (3,):  # samples whose taps fit (at batch 2: 2)
            free = reserve + sr_eval.metrics.pairwise_bytes((53, 70), 5, 4, fit)
            monkeypatch.setattr(sr_eval, "free_memory", lambda device, free=free: free)
            assert run(capsys, *argv, "--lpips-batch", batch)[0] == 0
            assert out.read_bytes() == whole[batch] and passes, (batch, fit)
            block = fit // int(batch) * int(batch)
            assert sum(passes) == 2 * (more_passes(5, block) + more_passes(2, block))
            passes.clear()
    res = json.loads(whole["1"])["methods"]["method_a"]
    for row, want in zip(res["per_image"], lpips_pairs(hr_dir, sr_dir, 5, lpips_file)):
        assert (np.array(row[MATRIX]) == want).all()  # float32 values, exactly
    calls = stop_at_image(monkeypatch, "none")
    out.unlink()
    two = sr_eval.metrics.pairwise_bytes((53, 70), 5, 4, 2)
    for batch, free, need, said in (
        ("1", one - 1, one, "one sample"),
        ("2", one, two, "2 samples (one --lpips-batch)"),
    ):
        reserve = sr_eval.scoring_reserve((53, 70), torch.device("cpu"), int(batch), [5, 2])
        monkeypatch.setattr(sr_eval, "free_memory", lambda device, f=reserve + free: f)
        code, err = fails(capsys, *argv, "--lpips-batch", batch)
        hint = "use --lpips-batch 1 (this run's: 2) or " if batch == "2" else ""
        assert code == 4 and err == (
            f"sr_eval.py: error: --pairwise: the LPIPS features of {said} of 0802 (70x53), the "
            f"fewest it keeps at once for the pairs, take {sr_eval.gb(need)}, more than the "
            f"{sr_eval.gb(free)} free in this machine's memory beside the scoring's own "
            f"{sr_eval.gb(reserve)}; {hint}drop --pairwise\n"
        )  # (both images have a 64x48 crop: the last of the largest is named)
    assert calls == [] and list(out.parent.iterdir()) == []


def test_pairwise_in_blocks_frees_each_block_and_gives_the_same_matrix(lpips_file):
    """LpipsMetric.pairwise in blocks of one sample: the matrix of all the taps kept, to the bit,
    and the caller's list of the first block's taps emptied once its pairs are done (it held
    them through the next block's: the peak memory of two blocks, not one)."""
    lm = sr_eval.metrics.LpipsMetric.load(lpips_file)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (1, 40, 48, 3), dtype=np.uint8) for _ in range(4)]
    every, first = [], []
    lm.maps(np.concatenate(crops), crops[0][0], keep=every)  # (batch 1: sample by sample)
    lm.maps(crops[0], crops[0][0], keep=first)
    whole = lm.pairwise(every)
    assert torch.equal(lm.pairwise(first, [[c] for c in crops]), whole) and first == []
    assert whole.shape == (4, 4) and (whole > 0).sum() == 12


def test_free_memory_of_this_machine():
    free = sr_eval.free_memory(torch.device("cpu"))
    assert free is None or 0 < free < 2**50
    assert sr_eval.free_memory(torch.device("meta")) is None


def test_the_out_of_memory_line_names_pairwise_where_its_features_are(tmp_path):
    """A host's out-of-memory line of a CPU run with --pairwise says what the features take and
    that dropping --pairwise saves it; a CUDA run's holds them in the device's memory."""
    import imageio.v3 as iio

    gt = tmp_path / "0801.png"
    iio.imwrite(gt, np.zeros((1352, 2040, 3), np.uint8))
    need = sr_eval.image_needs("0801", gt, [10], True, "rgb", False, pairwise_scale=4)
    assert need.pairwise == sr_eval.metrics.pairwise_bytes((1352, 2040), 10, 4)
    assert round(need.pairwise / 1e9, 2) == 1.19  # 10 samples' taps (1.14 GB) and the scratch
    cpu = sr_eval.out_of_memory_line(MemoryError(), torch.device("cpu"), 1, True, 1, need)
    assert cpu == (
        "out of memory scoring 0801 (2040x1352: its files decoded take ~91 MB, LPIPS ~510 MB, "
        "--pairwise's features ~1.2 GB); use --no-lpips (~510 MB less) or no --pairwise "
        "(~1.2 GB less)"
    )
    cuda_oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cuda = sr_eval.out_of_memory_line(cuda_oom, torch.device("cuda"), 4, True, 1, need)
    assert cuda.endswith("--device cpu, --no-lpips or no --pairwise (~1.2 GB less)")


def test_a_stopped_pairwise_run_continues_and_adding_or_dropping_it_starts_over(
    tmp_path, capsys, monkeypatch, lpips_file
):
    """Stopped at the 3rd of 3 images, the rerun of the same --pairwise command scores only that
    one and writes the bytes of a run never stopped (the matrices kept in OUT.partial with their
    rows). A rerun that drops --pairwise, or adds it, starts over with one warning line, as any
    other flag that changes the columns (--color y, --lr): the other command's scores moved
    aside (OUT.<its key>.partial), for a rerun of it."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--lpips-weights",
            lpips_file, "--out", out, "--pairwise"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    partial = tmp_path / "r.json.partial"
    for first, again in ((argv, argv), (argv, argv[:-1]), (argv[:-1], argv)):
        calls = stop_at_image(monkeypatch, "0002")
        assert fails(capsys, *first)[0] == 75
        kept = sr_eval.read_partial(partial)[1]
        assert len(kept) == 2
        assert (MATRIX in kept[0]["rows"]["method_a"]) == ("--pairwise" in first)
        monkeypatch.undo()
        calls = stop_at_image(monkeypatch, "none")
        code, cap = run(capsys, *again)
        assert code == 0 and not partial.exists()
        if first == again:
            assert calls == ["0002"] and cap.err == "" and out.read_bytes() == whole
        else:
            (aside,) = tmp_path.glob("r.json.*.partial")
            assert calls == ["0000", "0001", "0002"] and cap.err == (
                f"sr_eval.py: warning: {partial}: the scores kept by {sr_eval.OTHER_COMMAND} "
                f"moved to {aside}, where a rerun of that command continues from them\n"
            )
            aside.unlink()  # (else the next rerun of that command continues from it)
        monkeypatch.undo()
    assert out.read_bytes() == whole  # (the last rerun: with --pairwise)


def test_kept_rows_with_a_matrix_that_is_not_one_are_scored_again(tmp_path):
    """OUT.partial read back: a row's matrix must be N lists of N numbers for its method's N,
    null for N = 1."""
    row = {"image": "a", "LPIPS_pairwise": 0.5, MATRIX: [[0, 0.5], [0.5, 0]]}
    fields = set(row)
    assert sr_eval.scores_row(row, "a", fields, 2)
    assert sr_eval.scores_row({**row, MATRIX: None, "LPIPS_pairwise": None}, "a", fields, 1)
    assert not sr_eval.scores_row({**row, MATRIX: None, "LPIPS_pairwise": None}, "a", fields, 2)
    for n in (1, 3):  # of other samples
        assert not sr_eval.scores_row(row, "a", fields, n)
    for bad in ([[0, 0.5]], [[0, "x"], [0.5, 0]], "[[0]]", [[0, True], [0.5, 0]], [0, 1]):
        assert not sr_eval.scores_row({**row, MATRIX: bad}, "a", fields, 2)


def test_a_kept_matrix_of_another_n_is_scored_again(tmp_path, capsys, monkeypatch, lpips_file):
    """A kept row's matrix was checked square, not of its method's N: a row whose matrix is of
    other samples (2 x 2 where N = 3) was taken into --out as it was, beside rows of 3 x 3. Now
    it is not taken: one warning line, every image scored again, and --out the bytes of a run
    never stopped."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=3, sizes=((48, 64),) * 3, names=names)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 3, "--ntire", "--lpips-weights",
            lpips_file, "--out", out, "--pairwise"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    out.unlink()
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75
    partial = tmp_path / "r.json.partial"
    first, *rest = partial.read_text().splitlines(keepends=True)
    head = json.loads(first)
    row = head["images"][0]["rows"]["method_a"]
    row[MATRIX] = [r[:2] for r in row[MATRIX][:2]]  # as of 2 samples
    partial.write_text(json.dumps(head) + "\n" + "".join(rest))
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "none")
    code, cap = run(capsys, *argv)
    assert code == 0 and calls == list(names) and out.read_bytes() == whole
    assert cap.err == (
        f"sr_eval.py: warning: {partial}: not a file of this command's scores so far (edited, "
        "or not sr_eval.py's); scoring every image, replacing it\n"
    )
