"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a wrapped RIS-style model: 2 CPU processes, gloo.

The CRIS-style model (``tests/ris_models/cris_style``) is wrapped first, then its image stages,
text transformer, neck, decoder and projector become FSDP units and the wrapper the root unit
(it holds the mask tokens and what the units leave: CLIP's stem, attention-pool weights used
functionally, ``text_projection``). The image stages and the text transformer are ``reuse``
modules, so the masked branches skip them with their FSDP hooks in place. Two steps with
different data per rank must give every rank the same full parameters, equal (to float32
rounding) to one process that runs both ranks' batches with the same seeds and averages the
losses, as FSDP averages the gradients.

What FSDP2 needs here (docs/wrapping.md, "Multi-GPU engines, checkpointing, compile"):
``fully_shard`` refuses scalar parameters, so CLIP's ``logit_scale`` (unused in RIS training)
goes to ``ignored_params``; a unit's parameters are gathered only around its ``forward``, so a
unit must be a module the model *calls*: sharding ``backbone`` (whose stem CRIS-style code calls
submodule by submodule) fails with "mixed torch.Tensor and DTensor".
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import run_ranks

import masksd

pytest.importorskip("open_clip")
try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - older torch
    fully_shard = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.skipif(fully_shard is None,
                       reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
]

WORLD_SIZE = 2
STEPS = 2
UNITS = ("backbone.visual.layer1", "backbone.visual.layer2", "backbone.visual.layer3",
         "backbone.visual.layer4", "backbone.transformer", "neck", "decoder", "proj")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build() -> masksd.MaskedSelfDistill:
    from ris_models import cris_style
    from test_hooks_ris_models import cris_spec

    torch.manual_seed(0)
    model = cris_style.CRIS()
    model.backbone.logit_scale.requires_grad_(False)  # CLIP's temperature: no gradient in RIS
    return masksd.wrap(model, cris_spec()).train()


def _step(wrapper: torch.nn.Module, step: int, rank: int) -> masksd.DistillOutput:
    """One training forward on rank ``rank``'s batch of ``step`` (dropout and masks seeded)."""
    from ris_models import cris_style

    batch = cris_style.make_batch(seed=10 * step + rank)
    torch.manual_seed(100 * step + rank)
    return wrapper(batch.img, batch.word, batch.mask,
                   generator=torch.Generator().manual_seed(200 * step + rank))


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    wrapper = _build()
    for path in UNITS:  # wrap first, then shard: masksd's hooks stay on the modules
        fully_shard(wrapper.model.get_submodule(path), mesh=mesh)
    fully_shard(wrapper, mesh=mesh, ignored_params={wrapper.model.backbone.logit_scale})
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        out = _step(wrapper, step, rank)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    sharded = sum(hasattr(p, "full_tensor") for p in wrapper.parameters())
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for n, p in wrapper.named_parameters()}
    torch.save({"full": full, "losses": losses, "sharded": sharded},
               os.path.join(result_dir, f"rank{rank}.pt"))


def _reference() -> dict[str, torch.Tensor]:
    """One process, both ranks' batches per step, the mean of their losses.

    On one CPU thread, as the ranks: with lr 0.5 two SGD steps amplify the rounding of a
    different reduction order (torch's default thread pool) to ~1e-3 in BatchNorm parameters,
    which is not what this test is about.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wrapper = _build()
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.5)
        for step in range(STEPS):
            optimizer.zero_grad()
            for rank in range(WORLD_SIZE):
                (_step(wrapper, step, rank).loss / WORLD_SIZE).backward()
            optimizer.step()
        return {n: p.detach() for n, p in wrapper.named_parameters()}
    finally:
        torch.set_num_threads(threads)


def test_fsdp2_training_matches_one_process(tmp_path):
    run_ranks(_worker, (_free_port(), str(tmp_path)), world_size=WORLD_SIZE, marker_dir=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert ranks[0]["sharded"] > 50  # the model really was sharded
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different data per rank
    for name, value in ranks[0]["full"].items():
        assert torch.equal(value, ranks[1]["full"][name]), name
    start = {n: p.detach() for n, p in _build().named_parameters()}
    reference = _reference()
    assert set(reference) == set(ranks[0]["full"])
    assert any(not torch.equal(reference[n], start[n])
               for n in ("objectives.lmvsd.mask_token", "objectives.vmlsd.mask_token"))
    for name, value in reference.items():
        torch.testing.assert_close(ranks[0]["full"][name], value, rtol=1e-5, atol=1e-5, msg=name)
