"""training.GraphedTrainStep: a training step replayed from a CUDA graph computes what the eager step computes.

The CPU tests pin the batch plumbing and the input checks; the GPU tests train the same models eagerly and through
graphs (with a change of batch shape in the middle, as a length curriculum makes) and compare every parameter."""

import copy
import dataclasses
import warnings

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.data.synthetic import SyntheticBatch, induction_heads
from mambakit.reproduce.common import masked_loss
from mambakit.training import TrainConfig, build_optimizer, lr_at
from mambakit.training.cuda_graph import GraphedTrainStep, _with_tensors, batch_tensors


def test_batch_tensors_round_trip_every_batch_kind():
    a, b = torch.arange(3), torch.arange(4)
    synthetic = SyntheticBatch(a, b)
    assert batch_tensors(synthetic) == (a, b)
    rebuilt = _with_tensors(synthetic, (b, a))
    assert isinstance(rebuilt, SyntheticBatch) and rebuilt.inputs is b and rebuilt.targets is a
    assert batch_tensors((a, b)) == (a, b) and _with_tensors((a, b), (b, a)) == (b, a)
    assert batch_tensors(a) == (a,) and _with_tensors(a, (b,)) is b


def test_refuses_cpu_parameters_and_a_zero_warmup():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainStep(model, opt, lambda m, b: m(b).sum())
    if torch.cuda.is_available():
        model = model.cuda()
        with pytest.raises(ValueError, match="warmup"):
            GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), lambda m, b: m(b).sum(), warmup=0)


def _loss(model, batch):
    return masked_loss(model(batch.inputs, logits_to_keep=1), batch.targets[:, -1:], 17)


def _batches(lengths, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [induction_heads(rows, t, generator=g).to("cuda") for t in lengths]


def _train(model, batches, graphed: bool, autocast):
    opt = build_optimizer(model, TrainConfig(lr=2e-3, warmup_steps=0, max_steps=len(batches), beta2=0.98))
    step = GraphedTrainStep(model, opt, _loss, grad_clip=1.0, autocast_dtype=autocast)
    losses = [(step.step(b) if graphed else step.eager_step(b)) for b in batches]
    return torch.stack(losses).cpu(), step


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "attention"])
@pytest.mark.parametrize("autocast", [torch.bfloat16, None], ids=["bf16-autocast", "fp32"])
def test_gpu_graphed_steps_train_like_eager_ones(layer, autocast):
    """12 steps at T 64, then 10 at T 128 (a second capture): losses and every parameter as the eager run's, to
    rounding (the Triton backwards sum with atomics, so not bit for bit)."""
    extra = ({"attn_layer_idx": [0, 1], "attn_cfg": {"num_heads": 2, "rotary_emb_dim": 16}} if layer == "attention"
             else {"ssm_cfg": {"layer": layer, "d_state": 16, **({"headdim": 16, "chunk_size": 32}
                                                                 if layer == "Mamba2" else {})}})
    torch.manual_seed(0)
    base = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=17, **extra)).cuda()
    batches = _batches([64] * 12 + [128] * 10)
    eager_model, graph_model = copy.deepcopy(base), copy.deepcopy(base)
    eager_losses, _ = _train(eager_model, batches, graphed=False, autocast=autocast)
    graph_losses, step = _train(graph_model, batches, graphed=True, autocast=autocast)
    assert not step.disabled and step.captures == 2 and step.replays == 22 - 2 * step.warmup
    tol = 3e-2 if autocast is not None else 2e-3
    torch.testing.assert_close(graph_losses, eager_losses, rtol=tol, atol=tol)
    assert eager_losses[-1] < eager_losses[0]  # it learned something: the comparison is not of two idle runs
    for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_reproduce_run_graphs_every_step_of_its_schedule(tmp_path):
    """Run.fit on CUDA: the graph's own eager warm-up calls, then replays through the rate's warm-up and cosine (the
    rate is a tensor the graph reads); done.json says how many. The rate each step used is the schedule's."""
    from mambakit.reproduce.common import ModelSpec, Run, TrainSettings

    spec = ModelSpec("m", "M", MambaConfig(d_model=16, n_layer=2, vocab_size=17,
                                           ssm_cfg={"layer": "Mamba1", "d_state": 4}),
                     TrainSettings(steps=20, batch_size=4, warmup_steps=5, log_every=5, min_lr_ratio=0.1))
    run = Run("t", tmp_path, torch.device("cuda"), quick=True, resume=False, time_budget_s=None, command="x",
              progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run.train(spec, lambda step, g: induction_heads(4, 32, generator=g), logits_to_keep=1) is not None
    assert not [w for w in caught if "AccumulateGrad" in str(w.message)]
    import json

    done = json.loads((tmp_path / "_state" / "m" / "done.json").read_text())
    assert done["cuda_graph"] == {"captures": 1, "replays": 20 - 3, "failed": False}
    # the checkpoint reads as an eager run's: a number for the rate (the last step's), capturable off
    saved = torch.load(tmp_path / "_state" / "m" / "train.pt", weights_only=False)["optimizer"]["param_groups"][0]
    assert saved["lr"] == pytest.approx(lr_at(19, spec.train.train_config())) and saved["capturable"] is False
    assert all(torch.isfinite(torch.tensor(v)) for _, v in done["losses"])
    # and the switch: every step eager
    run2 = Run("t", tmp_path / "eager", torch.device("cuda"), quick=True, resume=False, time_budget_s=None,
               command="x", progress=False, cuda_graph=False)
    run2.train(dataclasses.replace(spec), lambda step, g: induction_heads(4, 32, generator=g), logits_to_keep=1)
    assert json.loads((tmp_path / "eager" / "_state" / "m" / "done.json").read_text())["cuda_graph"] is None


@pytest.mark.gpu
def test_gpu_a_scheduled_rate_reaches_the_replayed_step():
    """GraphedTrainStep(scheduled_lr=True): the replays read the rate set_lr last wrote (0: AdamW and its weight
    decay leave every weight as it was; then a positive rate moves them); without it set_lr is refused."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=17, ssm_cfg={"layer": "Mamba2", "d_state": 8,
                                                                              "headdim": 8, "chunk_size": 16})).cuda()
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10))
    step = GraphedTrainStep(model, opt, _loss, scheduled_lr=True)
    batch = _batches([32])[0]
    for _ in range(step.warmup + 2):  # eager warm-up calls, the capture, then replays
        step.set_lr(1e-2)
        step.step(batch)
    assert step.captures == 1 and step.replays >= 1
    before = [p.detach().clone() for p in model.parameters()]
    step.set_lr(0.0)
    step.step(batch)
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    step.set_lr(1e-2)
    step.step(batch)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert step.replays >= 3
    plain = GraphedTrainStep(model, build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10)), _loss)
    with pytest.raises(RuntimeError, match="scheduled_lr=True"):
        plain.set_lr(0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gpu_graphed_state_passing_trains_like_the_eager_one(tmp_path, layer):
    """Run.fit with state passing: the graph starts each replay from the carried states and writes the final ones
    back, as the eager loop does; the trained weights and the saved states agree with an all-eager run's."""
    from mambakit.reproduce.common import ModelSpec, Run, TrainSettings

    ssm = {"layer": layer, "d_state": 8, **({"headdim": 8, "chunk_size": 16} if layer == "Mamba2" else {})}
    spec = ModelSpec("m", "M", MambaConfig(d_model=16, n_layer=2, vocab_size=17, ssm_cfg=ssm),
                     TrainSettings(steps=16, batch_size=4, warmup_steps=4, log_every=4, state_passing=True))
    trained = {}
    for graph in (False, True):
        run = Run("t", tmp_path / str(graph), torch.device("cuda"), quick=True, resume=False, time_budget_s=None,
                  command="x", progress=False, cuda_graph=graph)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trained[graph] = run.train(spec, lambda step, g: induction_heads(4, 32, generator=g), logits_to_keep=1)
        assert not [w for w in caught if "AccumulateGrad" in str(w.message)]
    import json

    done = json.loads((tmp_path / "True" / "_state" / "m" / "done.json").read_text())
    assert done["cuda_graph"] == {"captures": 1, "replays": 16 - 3, "failed": False}
    for (name, p), q in zip(trained[True].named_parameters(), trained[False].parameters()):
        torch.testing.assert_close(p, q, rtol=3e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")
    saved = [torch.load(tmp_path / str(g) / "_state" / "m" / "train.pt", weights_only=False)["states"]
             for g in (True, False)]
    for a, b in zip(saved[0].layers, saved[1].layers):
        assert a.ssm_state.abs().max() > 0  # states were carried, not zeros
        torch.testing.assert_close(a.ssm_state, b.ssm_state, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- `mambakit train --cuda-graph` (training.Run)


def _corpus_cfg(tmp_path, layer: str, **changes):
    from tests.test_training import _tiny

    return _tiny(tmp_path, layer, **changes)


def test_captured_step_refuses_a_cpu_device_and_a_zero_warmup():
    from mambakit.training.cuda_graph import CapturedStep

    with pytest.raises(ValueError, match="CUDA device"):
        CapturedStep(lambda x: (x,), "cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="warmup"):
            CapturedStep(lambda x: (x,), "cuda", warmup=0)


def test_train_cuda_graph_needs_one_process_on_a_cuda_device_and_is_off_elsewhere(tmp_path):
    from mambakit.training import Run

    with pytest.raises(ValueError, match="cuda_graph: .*CUDA device; this run has cpu"):
        Run(_corpus_cfg(tmp_path, "mamba2", cuda_graph=True, device="cpu"))
    with pytest.raises(ValueError, match="cuda_graph must be true, false or null"):
        _corpus_cfg(tmp_path, "mamba2", cuda_graph="yes")
    run = Run(_corpus_cfg(tmp_path, "mamba2", device="cpu"))  # left to the run (None): off on a CPU
    try:
        assert run.cfg.cuda_graph is None and run.graph is None
        run.step()
    finally:
        run.close()


def test_a_graphed_runs_optimizer_state_loads_like_an_eager_runs():
    """The checkpoint of a graphed run holds the rate as a number and capturable off (what an eager run saves), so
    it resumes on any device; the live optimizer keeps its tensor rate."""
    from mambakit.training.cuda_graph import portable_optimizer_state

    model = torch.nn.Linear(3, 2)
    lr = torch.tensor(0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    opt.param_groups[0].update(lr=lr, capturable=True)
    opt.register_state_dict_post_hook(portable_optimizer_state)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == 0.25 and type(state["param_groups"][0]["lr"]) is float
    assert state["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["lr"] is lr and opt.param_groups[0]["capturable"] is True
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.25


class _BodyEagerly:
    """Stands in for Run.graph's CapturedStep on a CPU: calls the step body the graph would capture, every time."""

    disabled, replays = False, 0

    def __init__(self, body):
        self.body = body

    def __call__(self, *inputs):
        return self.body(*inputs)


def _fused_cpu_run(cfg):
    """A CPU Run; its optimizer is fused AdamW, as on CUDA (build_optimizer fuses over plain tensors anywhere)."""
    from mambakit.training import Run

    run = Run(cfg)
    assert run.optimizer.defaults["fused"] and run.device_checks
    return run


def test_the_graphed_step_body_trains_like_the_eager_step_and_leaves_a_nonfinite_step_unapplied(tmp_path):
    """What Run's CUDA graph captures, run eagerly on a CPU (CI has no GPU): the rate from a tensor refilled each
    step, 2 micro-steps, and the non-finite check as fused AdamW's found_inf. The losses are the eager loop's (the
    body reads the rate from a float32 tensor, the eager loop as a float: rounding apart); a NaN step changes no parameter, moment or step
    count, is counted as skipped, and the next good step applies."""
    from mambakit.training import lr_at

    cfg = _corpus_cfg(tmp_path, "mamba2", device="cpu", grad_accum=2, batch_size=2, max_steps=8, warmup_steps=3,
                      on_nonfinite="skip")
    eager = _fused_cpu_run(cfg.replace(out_dir=str(tmp_path / "eager")))
    body = _fused_cpu_run(cfg.replace(out_dir=str(tmp_path / "body")))
    try:
        body._prepare_optimizer_for_graph()
        body.graph = _BodyEagerly(body._graph_body)
        for _ in range(6):
            eager.step()
            body.step()
        eager._flush()
        body._flush()
        torch.testing.assert_close(torch.tensor(body.history["losses"]), torch.tensor(eager.history["losses"]),
                                   rtol=1e-4, atol=1e-5)
        assert body.optimizer.param_groups[0]["lr"] is body._lr
        assert body._lr.item() == pytest.approx(lr_at(5, cfg), rel=1e-6)  # the 6th step's rate (step index 5)
        for p, q in zip(body.raw_model.parameters(), eager.raw_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        params = [p for g in body.optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in body.optimizer.state[p].items()} for p in params]
        weight = body.raw_model.backbone.embedding.weight
        good = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("nan"))
        body.step()
        assert body.skipped == 0 and len(body._pending) == 1  # read on the host at the next record, not here
        body._flush()
        assert body.skipped == 1 and body.skipped_in_a_row == 1
        for p, old, saved in zip(params, before, state):
            if p is not weight:
                assert torch.equal(p, old)
            assert all(torch.equal(body.optimizer.state[p][k], v) for k, v in saved.items())
        with torch.no_grad():
            weight.copy_(good)
        body.step()
        body._flush()
        assert body.skipped_in_a_row == 0
        assert all(torch.equal(body.optimizer.state[p]["step"], s["step"] + 1) for p, s in zip(params, state))
    finally:
        eager.close()
        body.close()


def _graphed_and_eager(tmp_path, layer, **changes):
    from mambakit.training import train

    runs = {}
    for graph in (False, True):
        cfg = _corpus_cfg(tmp_path, layer, device="cuda", cuda_graph=graph, out_dir=str(tmp_path / f"run-{graph}"),
                          **changes)
        runs[graph] = train(cfg)
    return runs


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_gpu_train_cuda_graph_trains_like_the_eager_loop(tmp_path, layer):
    """`mambakit train --cuda-graph`: 3 eager steps, then replays; the learning rate changes every step (warm-up,
    cosine) and 2 micro-steps accumulate, all inside the graph. Losses and the saved weights agree with the eager
    run's to rounding (the Triton backwards sum with atomics)."""
    from safetensors.torch import load_file

    from mambakit.training import load_train_state

    runs = _graphed_and_eager(tmp_path, layer, max_steps=16, warmup_steps=6, grad_accum=2, batch_size=2)
    eager, graphed = runs[False], runs[True]
    assert len(graphed.losses) == 16
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=2e-2, atol=2e-2)
    assert eager.losses[-1] < eager.losses[0] - 0.5  # it learned: the comparison is not of two idle runs
    a, b = (load_file(str(tmp_path / f"run-{g}" / "model.safetensors")) for g in (True, False))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=3e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")
    # the checkpoint is an eager run's: a number for the rate, capturable off
    groups = load_train_state(tmp_path / "run-True")["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in groups)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_gpu_cuda_graph_leaves_a_nonfinite_step_unapplied(tmp_path, mode):
    """A replayed step whose loss turns NaN: fused AdamW's found_inf leaves every parameter, moment and step count
    as they were, and the loop skips (counting it) or stops with TrainingDiverged, as the eager loop does."""
    from mambakit.training import Run, TrainingDiverged

    run = Run(_corpus_cfg(tmp_path, "mamba2", device="cuda", cuda_graph=True, on_nonfinite=mode, max_steps=20))
    try:
        for _ in range(5):
            run.step()
        assert run.graph.captures == 1 and run.graph.replays == 2
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        moments = [run.optimizer.state[p]["exp_avg"].clone() for p in params]
        steps = [run.optimizer.state[p]["step"].clone() for p in params]
        weight = run.raw_model.backbone.embedding.weight
        good = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("nan"))  # in place: the graph reads this storage
        run.step()
        if mode == "stop":
            # the flag stays on the device until the host reads it; the step after is left unapplied too
            with torch.no_grad():
                weight.copy_(good)
            run.step()
            with pytest.raises(TrainingDiverged, match="at step 6 "):
                run._flush()
        else:
            run._flush()
            assert run.skipped == 1 and run.skipped_in_a_row == 1
        for p, old, m, s in zip(params, before, moments, steps):
            if p is not weight:
                assert torch.equal(p, old)
            assert torch.equal(run.optimizer.state[p]["exp_avg"], m) and torch.equal(run.optimizer.state[p]["step"], s)
        if mode == "skip":
            with torch.no_grad():
                weight.copy_(good)
            run.step()  # applied again: the step counts move on
            run._flush()  # the host learns which steps were applied at a record
            assert run.skipped == 1 and run.skipped_in_a_row == 0
            assert all(torch.equal(run.optimizer.state[p]["step"], s + 1) for p, s in zip(params, steps))
    finally:
        run.close()


@pytest.mark.gpu
def test_gpu_a_foreach_cpu_checkpoint_resumes_on_cuda_through_the_graph(tmp_path):
    """A CPU run's checkpoint of foreach AdamW (the CPU's optimizer until session 32) resumed on CUDA: the optimizer
    becomes this machine's fused one, its step counts move to the GPU, and the graph captures and replays it."""
    from mambakit.training import Run
    from tests.helpers import save_foreach_checkpoint

    cfg = _corpus_cfg(tmp_path, "mamba2", device="cpu", max_steps=12)
    save_foreach_checkpoint(cfg, steps=3)
    resumed = Run(cfg.replace(device="cuda"), resume=True)
    try:
        assert resumed.graph is not None and resumed.device_checks
        assert all(s["step"].device.type == "cuda" for s in resumed.optimizer.state.values())
        for _ in range(6):
            resumed.step()
        resumed._flush()
        assert resumed.graph.replays == 3 and resumed.skipped == 0
        assert all(s["step"].item() == 9 for s in resumed.optimizer.state.values())
    finally:
        resumed.close()
