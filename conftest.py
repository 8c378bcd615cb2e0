"""Docstring examples run for real: each runs in a fresh directory that already holds a
small recorded run at ``runs/exp1``, with a tiny model, optimizer and batch in scope.

The names every example may use: ``gt``, ``torch``, ``nn``, ``np``, ``model`` (a 3-layer
ReLU MLP on 8 inputs), ``optimizer`` (SGD over it), ``x`` (a batch of 16) and ``y``
(regression targets), ``loss_fn`` (MSE). ``runs/exp1`` is that model trained for 30 steps
under ``gt.watch``; examples that write a new trace use another directory.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn


def _tiny_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.fixture(scope="session")
def _recorded_run(tmp_path_factory):
    import gradtrace as gt

    root = tmp_path_factory.mktemp("doctest-run")
    model, optimizer = _tiny_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
    with gt.watch(model, optimizer, out=str(root / "runs" / "exp1")) as mon:
        for _ in range(30):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.record_loss(loss)
            optimizer.step()
    return root / "runs" / "exp1"


@pytest.fixture(autouse=True)
def _doctest_scope(request, doctest_namespace, tmp_path, monkeypatch):
    from _pytest.doctest import DoctestItem

    if not isinstance(request.node, DoctestItem):
        yield
        return
    import gradtrace as gt

    shutil.copytree(request.getfixturevalue("_recorded_run"), tmp_path / "runs" / "exp1")
    monkeypatch.chdir(tmp_path)
    model, optimizer = _tiny_model()
    gen = torch.Generator().manual_seed(2)
    doctest_namespace.update(
        gt=gt, torch=torch, nn=nn, np=np, model=model, optimizer=optimizer,
        x=torch.randn(16, 8, generator=gen), y=torch.randn(16, 1, generator=gen),
        loss_fn=nn.MSELoss())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
