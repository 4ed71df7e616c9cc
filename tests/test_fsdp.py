"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on models running on modekernels ops: two CPU
processes over gloo, each decoder layer and the root sharded, each rank on its own half of the
batch, train as one process does on the whole batch.

Cases: a tiny Mixtral with ``experts_implementation="modekernels"``, and a tiny Llama with
neutral residues (frozen backbone and trainable residues in the same FSDP units) trained on the
language-model loss plus ``2 * neutral_residue_loss``. Both ranks hold the same number of tokens
and of original-domain sequences, so the mean of the ranks' losses (what FSDP2's averaging
reduce-scatter optimises) is the whole batch's loss. After two SGD steps the gathered parameters
and their updates equal the single-process model's.
"""

from __future__ import annotations

import gloo_world
import pytest
import torch
from hf_models import build
from test_hf_experts import tiny_model

import modekernels
import modekernels.hf

WORLD = 2
STEPS = 2
BATCH, SEQ = 4, 6  # the whole batch; each rank takes BATCH // WORLD sequences
LR = 1.0
ALPHA = 2.0  # weight of the neutral-residue loss
WORLD_TIMEOUT_S = 120  # the whole world, spawn included; a hang fails instead of blocking CI
COLLECTIVE_TIMEOUT_S = 90


def _mixtral():
    model = tiny_model("mixtral").cpu().train()
    model.set_experts_implementation("modekernels")
    return model, lambda model, ids, mask: model(ids, labels=ids).loss


def _llama_neutral_residues():
    model = build("llama").train()
    modekernels.hf.add_neutral_residues(model, d_adapter=8)

    def loss(model, ids, mask):
        lm = model(ids, labels=ids).loss
        return lm + ALPHA * modekernels.hf.neutral_residue_loss(model, mask)

    return model, loss


CASES = {"mixtral": _mixtral, "llama_neutral_residues": _llama_neutral_residues}


def _data(step: int):
    """The whole batch of a step: token ids (BATCH, SEQ) and the original-domain mask (BATCH,),
    every other sequence, so each rank's half holds as many original sequences."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(2, 64, (BATCH, SEQ), generator=g)
    mask = torch.arange(BATCH) % 2 == 0
    return ids, mask


def _train(model, loss_fn, part=slice(None)):
    """STEPS SGD steps on each step's batch rows ``part``; returns the losses."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        ids, mask = _data(step)
        optimizer.zero_grad()
        with modekernels.use_backend("reference"):
            loss = loss_fn(model, ids[part], mask[part])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _worker(rank: int, case: str, out_dir: str) -> None:
    """One rank: shard, train on its rows of each batch, save the gathered parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    gloo_world.join(rank, WORLD, out_dir, COLLECTIVE_TIMEOUT_S)
    mesh = init_device_mesh("cpu", (WORLD,))
    model, loss_fn = CASES[case]()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rows = BATCH // WORLD
    losses = _train(model, loss_fn, slice(rank * rows, (rank + 1) * rows))
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    gloo_world.leave({"losses": losses, "params": params}, rank, out_dir)


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_matches_single_process(case, tmp_path):
    ranks = gloo_world.run_world(_worker, (case, str(tmp_path)), WORLD, tmp_path, WORLD_TIMEOUT_S)

    model, loss_fn = CASES[case]()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model, loss_fn)

    torch.testing.assert_close(sum(r["losses"] for r in ranks) / WORLD, losses)
    for other in ranks[1:]:  # every rank gathers the same parameters
        for name, value in ranks[0]["params"].items():
            torch.testing.assert_close(other["params"][name], value, rtol=0, atol=0)
    got = ranks[0]["params"]
    assert got.keys() == initial.keys()
    for name, param in model.named_parameters():
        want_update = param.detach() - initial[name]
        assert (want_update != 0).any() == param.requires_grad, name  # every trainable one moved
        torch.testing.assert_close(got[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name] - initial[name], want_update, rtol=1e-4, atol=1e-6,
                                   msg=name)
