from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgcluster import engine, train
from imgcluster.errors import Interrupted, UsageError
from imgcluster.methods.base import FitContext

import toy_method


def test_device_images_batches_cover_a_keyed_permutation() -> None:
    images = np.arange(50 * 2 * 2, dtype=np.uint8).reshape(50, 1, 2, 2)
    data = engine.DeviceImages(images, torch.device("cpu"))
    batches = data.epoch(8, k=123)
    assert [len(b) for b in batches] == [8] * 6  # the partial last batch is dropped
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 48
    assert torch.equal(seen, torch.cat(data.epoch(8, k=123)))
    assert not torch.equal(seen, torch.cat(data.epoch(8, k=124)))
    assert torch.equal(data.take(torch.tensor([3, 0])), torch.from_numpy(images[[3, 0]]))
    assert torch.equal(torch.cat(data.in_order(7)), torch.arange(50))


def test_a_gpu_device_comes_back_with_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.device("cuda") != torch.device("cuda:0"), the device tensors report: a bare
    # "cuda" once made the engine treat images on the GPU as host-side (H200, 0a694cf)
    from imgcluster.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UsageError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for kind in ("sgd", "adam", "adamw"):
        opt = engine.make_optimizer(
            kind,
            engine.param_groups(net, 5e-4),
            0.1,
            torch.device("cpu"),
            **({"momentum": 0.9} if kind == "sgd" else {}),
        )
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 3)).pow(2).mean().backward()
            opt.step()
        flat, meta = engine._optimizer_to_flat("o", opt)
        ckpt = engine.Checkpointer(tmp_path)
        ckpt.save(flat, {"o": meta})
        tensors, loaded = ckpt.load()  # type: ignore[misc]
        fresh = engine.make_optimizer(
            kind,
            engine.param_groups(net, 5e-4),
            0.5,
            torch.device("cpu"),
            **({"momentum": 0.9} if kind == "sgd" else {}),
        )
        engine._optimizer_from_flat("o", fresh, tensors, loaded["o"])
        a, b = opt.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for pid in a["state"]:
            for key, value in a["state"][pid].items():
                assert torch.equal(value, b["state"][pid][key]), (kind, key)


def test_log_lines_count_elapsed_from_the_start_of_the_fit() -> None:
    lines: list[dict[str, object]] = []
    began = time.perf_counter() - 50.0  # a fit whose set-up took 50 s before the trainer
    ctx = FitContext(log=lines.append, started=began)
    engine.Trainer(ctx, {}).log({"phase": "setup"})
    assert lines[0]["phase"] == "setup"
    assert 50.0 <= float(lines[0]["elapsed"]) <= time.perf_counter() - began


@pytest.mark.parametrize("optimizers", [True, False])
def test_warm_up_imports_what_the_first_optimizer_needs(optimizers: bool) -> None:
    # in a fresh interpreter: this one has long since imported everything
    code = (
        "import sys, torch; from imgcluster import engine; "
        f"engine.warm_up(torch.device('cpu'), {optimizers}).join(); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(optimizers)


def test_param_groups_leave_biases_and_norms_undecayed() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay, plain = engine.param_groups(net, 1e-4)
    assert [p.ndim for p in decay["params"]] == [2] and plain["weight_decay"] == 0.0
    assert len(plain["params"]) == 3


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_fused_sgd_steps_when_the_heads_take_turns() -> None:
    """MMDC's rotation and clustering steps share one SGD but train different heads: the fused
    SGD (the GPU's) must take a step where only some parameters already have momentum, and
    give the plain SGD's numbers."""
    torch.manual_seed(0)
    heads = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    twins = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    for twin, head in zip(twins, heads, strict=True):
        twin.load_state_dict(head.state_dict())
    cpu = torch.device("cpu")

    def sgd(nets: list[torch.nn.Linear], **fused: bool) -> torch.optim.Optimizer:
        params = [p for net in nets for p in net.parameters()]
        return engine.make_optimizer("sgd", params, 0.1, cpu, momentum=0.9, **fused)

    fused, plain = sgd(heads, fused=True), sgd(twins)
    x = torch.randn(8, 3)
    for turns in ([0], [0, 1], [1], [0, 1]):
        for nets, opt in ((heads, fused), (twins, plain)):
            engine.optimizer_step(opt, sum(nets[i](x).square().sum() for i in turns))
    for twin, head in zip(twins, heads, strict=True):
        assert torch.allclose(twin.weight, head.weight, atol=1e-6)
        assert torch.allclose(twin.bias, head.bias, atol=1e-6)
    # resumed from a checkpoint in which one head never stepped (a fused SGD made before
    # this fix, which gave buffers to stepped parameters only): still steps both
    early_params = [p for net in twins for p in net.parameters()]
    early = torch.optim.SGD(early_params, lr=0.1, momentum=0.9, fused=True)
    engine.optimizer_step(early, twins[0](x).sum())
    resumed = sgd(heads, fused=True)
    resumed.load_state_dict(early.state_dict())
    engine.optimizer_step(resumed, heads[0](x).sum() + heads[1](x).sum())


def test_deep_method_logs_every_epoch(toy: Path, tmp_path: Path) -> None:
    result = train([toy], 3, method="toy-ae", out=tmp_path / "run")
    log = [
        json.loads(line) for line in (result.run_dir / "train.log.jsonl").read_text().splitlines()
    ]
    epochs = [r for r in log if "epoch" in r]
    assert [(r["phase"], r["epoch"]) for r in epochs] == [
        ("pretrain", 1),
        ("pretrain", 2),
        ("cluster", 1),
        ("cluster", 2),
    ]
    assert all(r["images"] == 32 and r["images_per_s"] > 0 and r["loss"] > 0 for r in epochs)
    elapsed = [r["elapsed"] for r in epochs]  # when each line was written: after its epoch
    assert elapsed == sorted(elapsed)
    assert all(r["elapsed"] >= r["seconds"] for r in epochs)
    assert {"recon", "pull", "lr"} <= set(epochs[-1])
    assert not (result.run_dir / "checkpoint.safetensors").exists()  # removed when done
    assert set(result.timings) == {"find", "decode", "fit", "label", "write"}


# a fresh optimizer per phase, one Adam for both, one fused SGD for both (which has state,
# zero momentum buffers, before its first step)
@pytest.mark.parametrize(
    "params", [{}, {"carry": True}, {"carry": True, "optimizer": "sgd"}], ids=str
)
# mid pretrain, end of pretrain, between the phases, mid cluster
@pytest.mark.parametrize("stop_at", [3, 6, "between", 9])
def test_an_interrupted_run_resumes_to_the_same_result(
    toy: Path, tmp_path: Path, stop_at: int | str, params: dict[str, object]
) -> None:
    straight = train([toy], 3, method="toy-ae", out=tmp_path / "straight", seed=5, params=params)
    toy_method._steps[0] = 0
    toy_method.INTERRUPT_AT.add(stop_at)
    try:
        with pytest.raises(Interrupted, match="--resume"):
            train([toy], 3, method="toy-ae", out=tmp_path / "run", seed=5, params=params)
    finally:
        toy_method.INTERRUPT_AT.clear()
    run = tmp_path / "run"
    assert (run / "checkpoint.safetensors").exists() and not (run / "labels.csv").exists()
    resumed = train(resume=run)
    assert resumed.run_dir == run
    assert (run / "labels.csv").read_text() == (straight.run_dir / "labels.csv").read_text()
    a, b = _params(run), _params(straight.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    phases = [
        json.loads(line).get("phase") for line in (run / "train.log.jsonl").read_text().splitlines()
    ]
    assert phases.count("done") == 1


def test_precision_sets_the_arithmetic_of_autocast_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def dtype() -> torch.dtype:
        with engine.autocast(cpu):
            return layer(x).dtype

    assert dtype() == torch.float32  # auto: fp32 on the CPU
    with engine.precision("bf16"):
        assert dtype() == torch.bfloat16
        with engine.precision("fp32"):
            assert dtype() == torch.float32
        assert dtype() == torch.bfloat16
    assert dtype() == torch.float32  # reset on leaving the block
    with pytest.raises(ValueError, match="precision"), engine.precision("fp16"):
        pass


def test_resume_keeps_the_recorded_precision(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    fit = toy_method.ToyAE.fit

    def spy(self: toy_method.ToyAE, images: np.ndarray, ctx: object) -> object:
        seen.append(engine._PRECISION.get())
        return fit(self, images, ctx)  # type: ignore[arg-type]

    monkeypatch.setattr(toy_method.ToyAE, "fit", spy)
    run = tmp_path / "run"
    toy_method._steps[0] = 0
    toy_method.INTERRUPT_AT.add(3)
    try:
        with pytest.raises(Interrupted):
            train([toy], 3, method="toy-ae", out=run, precision="bf16")
    finally:
        toy_method.INTERRUPT_AT.clear()
    config = (run / "config.toml").read_text()
    assert 'precision = "bf16"' in config
    (run / "config.toml").write_text(config.replace('"bf16"', '"fp16"'))
    with pytest.raises(UsageError, match="--precision must be one of"):
        train(resume=run)  # a recorded value is checked too, before any work
    assert (run / "checkpoint.safetensors").exists()
    (run / "config.toml").write_text(config)  # fixed, the same process can resume it
    train(resume=run, precision="fp32")  # the recorded setting wins, as the method's do
    assert seen == ["bf16", "bf16"]
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16"):
        train([toy], 3, method="toy-ae", out=tmp_path / "bad", precision="fp16")
    assert not (tmp_path / "bad").exists()


def test_a_resume_refused_after_decoding_leaves_the_run_as_it_was(
    toy: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    toy_method._steps[0] = 0
    toy_method.INTERRUPT_AT.add(3)
    try:
        with pytest.raises(Interrupted):
            train([toy], 3, method="toy-ae", out=run, seed=1)
    finally:
        toy_method.INTERRUPT_AT.clear()
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    moved = next(toy.rglob("*.png"))
    aside = tmp_path / moved.name
    moved.rename(aside)
    with pytest.raises(UsageError, match="images changed"):
        train(resume=run)
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    aside.rename(moved)
    assert train(resume=run).run_dir == run  # in the same process: the folder is not left locked
    assert (run / "labels.csv").is_file() and not (run / ".lock").exists()


def test_resume_needs_a_checkpoint(toy: Path, tmp_path: Path) -> None:
    done = train([toy], 3, method="toy-ae", out=tmp_path / "run").run_dir
    for _ in range(2):  # the refused resume does not keep the folder locked
        with pytest.raises(UsageError, match="no checkpoint"):
            train(resume=done)
    assert not (done / ".lock").exists()
    with pytest.raises(UsageError, match="not a run folder"):
        train(resume=tmp_path)


def _graph_test_step(net: torch.nn.Module, opt: torch.optim.Optimizer, data: engine.DeviceImages):
    def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = data.take(idx).float().flatten(1) / 255
        loss = (net(x) - x).pow(2).mean()
        engine.optimizer_step(opt, loss)
        return {"loss": loss}

    return step


def _graph_test_run(device: torch.device, graphs: bool) -> tuple[list[float], torch.nn.Module, str]:
    """Nine steps of a small autoencoder (batches of 8, one short batch of 5 between)."""
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 4, 4), dtype=np.uint8)
    data = engine.DeviceImages(images, device)
    net = torch.nn.Sequential(torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 16))
    net = net.to(device)
    opt = engine.make_optimizer("adam", net.parameters(), 1e-2, device, capturable=graphs)
    run = engine.GraphedStep(_graph_test_step(net, opt, data), graphs, warmup=2)
    batches = [torch.arange(i * 8, i * 8 + 8, device=device) for i in range(8)]
    batches.insert(5, torch.arange(59, 64, device=device))
    losses = [float(run(idx)["loss"].detach()) for idx in batches]
    return losses, net, run.status()


def test_graphed_step_off_the_gpu_is_the_step_itself() -> None:
    losses, _, status = _graph_test_run(torch.device("cpu"), graphs=False)
    assert status == "eager" and losses[-1] < losses[0]
    # capturable is a GPU option: asked for on the CPU it is left out, and Adam still works
    opt = engine.make_optimizer(
        "adam", [torch.zeros(2, requires_grad=True)], 0.1, torch.device("cpu"), capturable=True
    )
    assert not opt.param_groups[0]["capturable"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_replays_the_same_arithmetic_as_the_step() -> None:
    device = torch.device("cuda")
    eager, eager_net, _ = _graph_test_run(device, graphs=False)
    replayed, replayed_net, status = _graph_test_run(device, graphs=True)
    assert status == "replayed"
    assert np.allclose(eager, replayed, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_net.parameters(), replayed_net.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_subnormals_are_flushed_in_every_cpu_thread() -> None:
    """Importing the engine makes the CPU treat subnormal floats as zero in the importing
    thread and in torch's intra-op threads, which start later and inherit it: a product over
    4M subnormals, which torch splits over its threads, gives zeros only. (A context around
    the fit alone flushed the calling thread's share once the thread pool existed.)"""
    code = (
        "import torch, imgcluster.engine; torch.set_num_threads(2); "
        "t = torch.full((1 << 22,), 1e-39); print(((t * 1.0) == 0).float().mean().item())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if not torch.set_flush_denormal(True):  # True: as the engine left it for the other tests
        pytest.skip("this CPU cannot flush subnormals")
    assert float(run.stdout) == 1.0
