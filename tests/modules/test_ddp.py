"""DDP (CPU, gloo, two processes): every rank ends with the weights of one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_fit
from streaming_helpers import LR, max_difference, whole_image_sgd

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    repo = HERE.parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(HERE / "ddp_fit.py"), str(out)], env=env, cwd=out,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("style", list(ddp_fit.STYLES))
def test_ddp_ranks_hold_identical_weights_equal_to_single_process_global_batch(ddp_weights: Path, style: str) -> None:
    model = ddp_fit.build_model(style)
    data = ddp_fit.dataset()
    plan = model.stream_network.plan(data[0][0].shape[-2:])
    assert len(plan.row_spans) > 1 and len(plan.col_spans) > 1
    global_batch = ddp_fit.LOCAL_BATCH * ddp_fit.WORLD_SIZE
    # DDP averages the ranks' gradients of their mean losses: the mean loss over the global batch.
    batches = [data[step * global_batch:(step + 1) * global_batch] for step in range(ddp_fit.STEPS)]
    trunk, head = whole_image_sgd(model.stream_network.stream_module, model.head, batches, LR)
    model.stream_network.stream_module.load_state_dict(trunk.state_dict())
    model.head.load_state_dict(head.state_dict())
    reference = model.state_dict()

    ranks = [torch.load(ddp_weights / f"{style}_rank{rank}.pt") for rank in range(ddp_fit.WORLD_SIZE)]
    for key in reference:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert max((ranks[0][k] - reference[k]).abs().max().item() for k in reference) <= 1e-10
    # the steps moved the weights well beyond the tolerance
    assert max_difference(ddp_fit.build_model(style), model) > 1e-2
