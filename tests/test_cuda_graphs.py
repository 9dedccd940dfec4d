"""sr_train.py --cuda-graphs without a GPU. The CUDA recording itself needs one (measured by
tests/bench/bench_gpu.py); what is tested here is everything around it, by letting the flag run
on the CPU with `capture` replaced by a recorder that replays the recorded Python function. A
real recording runs nothing while it records and replays the kernels later; the stand-in does
the same, so a step whose inputs, learning rates or outputs were not routed through the
recorded tensors trains differently from the eager run, and these tests see it."""

import pytest
import torch
from conftest import TINY
from test_train_guard import EDSR_TINY, flaky_models, images, records, run, tiny  # noqa: F401

import sr_train
from sr_lib.checkpoint import load_checkpoint
from sr_lib.models import MODELS, build_model

SRFLOW = ["--model", "srflow", *tiny("srflow"), "--flow-steps", "1"]


@pytest.fixture
def recorder(monkeypatch):
    """--cuda-graphs allowed on the CPU; each recording is counted and replays its function."""
    made = []

    def capture(body, device):
        made.append(body)
        return body

    real_record = sr_train.StepGraph.record

    def record(self, run, lr, hr, optimizers):
        """As a real recording, the replays read the learning-rate tensors that were there when
        it was made: a loop that replaced them (instead of filling them) fails here."""
        real_record(self, run, lr, hr, optimizers)
        rates = [g["lr"] for o in optimizers.values() for g in o.param_groups]
        assert all(torch.is_tensor(r) for r in rates)
        replay = self.replay

        def checked():
            now = [g["lr"] for o in optimizers.values() for g in o.param_groups]
            assert all(a is b for a, b in zip(now, rates, strict=True))
            replay()

        self.replay = checked

    monkeypatch.setattr(sr_train, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sr_train, "capture", capture)
    monkeypatch.setattr(sr_train.StepGraph, "record", record)
    monkeypatch.setattr(sr_train.StepGraph, "WARMUP", 1)
    return made


def close(a: dict, b: dict):
    """Two state_dicts equal up to the learning rate's float32 rounding (a recorded step reads
    its rate from a float32 tensor: 1e-3 becomes 1.0000000475e-3)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def test_recorded_steps_train_as_eager_steps(tmp_path, images, recorder):  # noqa: F811
    """SRFlow, 12 steps: encoder frozen for 0-5 (a recording at step 1, replayed 2-5), unfrozen
    from step 6 (a new recording at 7, replayed 8-11), the rate halved at steps 6, 9 and 11
    (the last two inside replays). Every logged loss and the final weights match the eager run."""
    flags = [*SRFLOW, "--steps", "12", "--save-every", "12"]  # milestones 0.5, 0.75, 0.9, 0.95
    assert run(tmp_path / "eager", images, *flags, scale=4) == 0
    assert run(tmp_path / "graph", images, *flags, "--cuda-graphs", scale=4) == 0
    assert len(recorder) == 2
    eager, graph = (records(tmp_path / d) for d in ("eager", "graph"))
    assert [r["step"] for r in graph if "loss" in r] == list(range(1, 13))
    for e, g in zip(eager, graph):
        assert g["learning_rate"] == e["learning_rate"]  # logged as the schedule's decimal
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-4), e["step"]
    assert len({r["learning_rate"] for r in graph if "loss" in r}) == 4  # the rate did change
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("eager", "graph"))
    close(a["state_dict"], b["state_dict"])
    for group in b["optimizers"]["g"]["param_groups"]:  # plain floats: resumable without it
        assert type(group["lr"]) is float and group["capturable"] is False


def test_a_rollback_records_again_and_ends_as_the_eager_run(tmp_path, images, flaky_models,  # noqa: F811
                                                           recorder):  # fmt: skip
    """Steps 5 and 6 NaN once: the run goes back to last.pt (step 4), whose optimizer states are
    new tensors, so the step is recorded again; the run ends as the same run without the flag."""
    flags = [*EDSR_TINY, "--learning-rate", "1e-3", "--milestones", "--save-every", "4",
             "--steps", "10", "--max-bad-steps", "2", "--on-nan", "rollback",
             "--nan-steps", "5,6", "--nan-once"]  # fmt: skip
    assert run(tmp_path / "eager", images, *flags) == 0
    assert run(tmp_path / "graph", images, *flags, "--cuda-graphs") == 0
    assert len(recorder) == 2  # step 1, and again after the rollback
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("eager", "graph"))
    assert b["rollbacks"] == 1 and b["skipped"] == a["skipped"] == 0
    close(a["state_dict"], b["state_dict"])


def test_resumed_without_the_flag(tmp_path, images, recorder):  # noqa: F811
    """A checkpoint of a recorded run holds plain rates: resumed without --cuda-graphs it
    continues exactly as the uninterrupted run."""
    flags = [*EDSR_TINY, "--model", "edsr", "--save-every", "3", "--milestones"]  # rate: fixed
    assert run(tmp_path / "split", images, *flags, "--steps", "3", "--cuda-graphs") == 0
    assert run(tmp_path / "split", images, *flags, "--steps", "6", "--resume", "auto") == 0
    assert run(tmp_path / "whole", images, *flags, "--steps", "6") == 0
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("whole", "split"))
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())


def test_the_host_state_of_a_step_is_checked_every_step():
    """What makes the loop record again: the model's switches (VarSR's adversarial phase), a
    parameter's requires_grad (SRFlow's encoder, the ℓE σ-only phase) and the batch shape."""
    varsr = build_model("varsr", {"scale": 4, **TINY["varsr"]})
    varsr.on_step(0, 10)
    before = varsr.graph_key()
    varsr.on_step(9, 10)
    assert varsr.graph_key() != before
    flow = build_model("srflow", {"scale": 4, **TINY["srflow"]})
    g = sr_train.StepGraph(flow, torch.device("cpu"))
    seen = []
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)

    def fake_run(lr, hr):
        seen.append(g.warmup)
        return {"loss": torch.zeros(())}, torch.ones(())

    flow.on_step(0, 10)  # the encoder frozen (the first half)
    g(fake_run, lr, hr, {})
    key = g.key
    flow.on_step(9, 10)  # unfreezes the encoder
    g(fake_run, lr, hr, {})
    assert g.key != key and seen == [g.WARMUP - 1] * 2  # the warm-up started over
    g(fake_run, lr[:1], hr[:1], {})
    assert g.key[-1] == hr[:1].shape


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "--cuda-graphs needs a CUDA device (got cpu)"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    ],
)
def test_refused_on_a_cpu(tmp_path, images, capsys, extra, says):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, "--model", "edsr", *tiny("edsr"), "--steps", "1",
            "--cuda-graphs", *extra)  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("model", ["refvae", "bicubic"])
def test_refused_for_a_step_that_changes_on_the_host(tmp_path, images, capsys, recorder, model):  # noqa: F811
    """RefVAE picks its training references by step number on the host: a replay would repeat
    the first pick. Bicubic has no step to record."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, "--model", model, *tiny(model), "--steps", "1", "--cuda-graphs")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"--cuda-graphs: {model}'s training step changes on the host" in err


def test_which_models_can_be_recorded():
    """Every registered model says whether its step can be replayed: all but RefVAE (references
    picked by step number on the host) and bicubic (nothing to train)."""
    for name in MODELS:
        key = build_model(name, {"scale": 4, **TINY[name]}).graph_key()
        assert (key is None) == (name in ("refvae", "bicubic")), name
        assert key is None or isinstance(key, tuple)


def test_a_replay_bumps_what_it_writes_and_keeps_the_cached_tables_alive(monkeypatch):
    """A real replay writes parameters without autograd seeing it: the loop bumps the version
    counters of the trained parameters (a flow's cached 1×1 inverses in validation are keyed on
    them), not those of frozen ones. And it reads cached device tables by address: the
    recording holds them, so an eviction (here: 70 other sizes) cannot free them."""
    import gc
    import weakref

    from sr_lib import resize

    monkeypatch.setattr(sr_train, "capture", lambda body, device: body)
    monkeypatch.setattr(sr_train.StepGraph, "WARMUP", 0)
    flow = build_model("srflow", {"scale": 4, **TINY["srflow"]})
    flow.on_step(0, 10)  # the encoder frozen
    lr, hr = torch.rand(1, 3, 5, 7), torch.rand(1, 3, 20, 28)
    resize.imresize_torch(lr, 4)  # tables of this size, as a model's resize would make them
    held = [weakref.ref(t) for t in resize.cached_tensors()]
    g = sr_train.StepGraph(flow, torch.device("cpu"))
    g.out, g.ok = {"loss": torch.zeros(())}, torch.ones(())
    g(lambda lr, hr: ({"loss": torch.zeros(())}, torch.ones(())), lr, hr, {})  # records, replays
    trained = [p for p in flow.parameters() if p.requires_grad]
    frozen = [p for p in flow.parameters() if not p.requires_grad]
    before = [p._version for p in flow.parameters()]
    g(lambda lr, hr: ({"loss": torch.zeros(())}, torch.ones(())), lr, hr, {})  # a replay
    after = dict(zip(map(id, flow.parameters()), (p._version - v for p, v in
                                                   zip(flow.parameters(), before))))  # fmt: skip
    assert trained and frozen and all(after[id(p)] == 1 for p in trained)
    assert all(after[id(p)] == 0 for p in frozen)
    for n in range(70):
        resize.imresize_torch(torch.rand(1, 3, 9 + n, 9), 4)
    gc.collect()
    assert held and all(r() is not None for r in held)  # evicted from the cache, kept by g
    g.reset()
    gc.collect()
    assert any(r() is None for r in held)  # without the recording they would have been freed


def refuse_plainly(body, device):
    raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def refuse_as_torch_does(body, device):
    """torch.cuda.graph: what failed while recording, then its exit's own error from it."""
    try:
        refuse_plainly(body, device)
    except RuntimeError:
        raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904


@pytest.mark.parametrize("refuse", [refuse_plainly, refuse_as_torch_does])
def test_an_unrecordable_step_runs_eagerly_with_one_warning(tmp_path, images, recorder,  # noqa: F811
                                                            monkeypatch, capsys,
                                                            refuse):  # fmt: skip

    monkeypatch.setattr(sr_train, "capture", refuse)
    flags = [*EDSR_TINY, "--model", "edsr", "--steps", "5", "--milestones"]
    assert run(tmp_path / "graph", images, *flags, "--cuda-graphs") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "--cuda-graphs" in line]
    assert err == ["sr_train.py: warning: --cuda-graphs: EDSR's training step could not be "
                   "recorded as a CUDA graph (operation not permitted when stream is capturing; "
                   "more detail); it goes on without recording"]  # fmt: skip
    assert run(tmp_path / "eager", images, *flags) == 0
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("eager", "graph"))
    close(a["state_dict"], b["state_dict"])
