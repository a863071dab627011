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
from mambakit.training import TrainConfig, build_optimizer
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
def test_gpu_reproduce_run_uses_the_graph_after_warmup(tmp_path):
    """Run.fit on CUDA: eager through the warm-up, graph replays after it; done.json says how many."""
    from mambakit.reproduce.common import ModelSpec, Run, TrainSettings

    spec = ModelSpec("m", "M", MambaConfig(d_model=16, n_layer=2, vocab_size=17,
                                           ssm_cfg={"layer": "Mamba1", "d_state": 4}),
                     TrainSettings(steps=20, batch_size=4, warmup_steps=5, log_every=5))
    run = Run("t", tmp_path, torch.device("cuda"), quick=True, resume=False, time_budget_s=None, command="x",
              progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run.train(spec, lambda step, g: induction_heads(4, 32, generator=g), logits_to_keep=1) is not None
    # the eager steps' autograd graph is gone before the graph's warm-up on its side stream
    assert not [w for w in caught if "AccumulateGrad" in str(w.message)]
    import json

    done = json.loads((tmp_path / "_state" / "m" / "done.json").read_text())
    assert done["cuda_graph"] == {"captures": 1, "replays": 20 - 5 - 3, "failed": False}
    assert all(torch.isfinite(torch.tensor(v)) for _, v in done["losses"])
    # and the switch: every step eager
    run2 = Run("t", tmp_path / "eager", torch.device("cuda"), quick=True, resume=False, time_budget_s=None,
               command="x", progress=False, cuda_graph=False)
    run2.train(dataclasses.replace(spec), lambda step, g: induction_heads(4, 32, generator=g), logits_to_keep=1)
    assert json.loads((tmp_path / "eager" / "_state" / "m" / "done.json").read_text())["cuda_graph"] is None


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
    assert done["cuda_graph"] == {"captures": 1, "replays": 16 - 4 - 3, "failed": False}
    for (name, p), q in zip(trained[True].named_parameters(), trained[False].parameters()):
        torch.testing.assert_close(p, q, rtol=3e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")
    saved = [torch.load(tmp_path / str(g) / "_state" / "m" / "train.pt", weights_only=False)["states"]
             for g in (True, False)]
    for a, b in zip(saved[0].layers, saved[1].layers):
        assert a.ssm_state.abs().max() > 0  # states were carried, not zeros
        torch.testing.assert_close(a.ssm_state, b.ssm_state, rtol=5e-2, atol=5e-2)
