"""``MaskRIS``: corruption rules, the loss, both modes on both backends, two RIS-style models."""

from __future__ import annotations

import math

import hook_models
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from objective_models import hooks_batch, towers_batch, towers_wrapper, train_step
from spawn_ranks import replicas, run_ranks
from tiny_models import assert_all_grads

import masksd
from masksd import HookSpec, Maskable, ModalitySpec, Tap
from masksd.losses import consistency_loss
from masksd.objectives import MaskRIS, MaskRISConfig
from masksd.objectives.maskris import corrupt_ids, mask_image, random_subset

TOWER_SPECIALS = (tiny_models.PAD, tiny_models.SOT, tiny_models.EOT)


def towers_maskris(mode: str = "input", **config) -> MaskRIS:
    config = {"patch_size": 4, "mask_id": 3, "special_ids": TOWER_SPECIALS, **config}
    torch.manual_seed(5)
    return MaskRIS(MaskRISConfig(mode=mode, **config), image_dim=16, text_dim=16)


def myris_wrapper(objective: MaskRIS, seed: int = 0, **options) -> masksd.MaskedSelfDistill:
    """The README's ``MyRIS`` (``hook_models.TinyRIS``) with the README's spec."""
    torch.manual_seed(seed)
    return masksd.wrap(
        hook_models.TinyRIS(), hook_models.tiny_spec(), extra_objectives=[objective], **options
    )


def myris_maskris(mode: str = "input", **config) -> MaskRIS:
    config = {"patch_size": 8, "mask_id": 1, **config}  # ids 1..49 are words, 0 is padding (Maskable.never)
    torch.manual_seed(5)
    return MaskRIS(MaskRISConfig(mode=mode, **config), image_dim=16, text_dim=16)


class Recorder:
    """Forward pre-hook that keeps the positional inputs of every call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple] = []
        module.register_forward_pre_hook(
            lambda m, args: self.calls.append(tuple(a.detach().clone() for a in args))
        )


# ------------------------------------------------------------------------ corruption rules


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_random_subset_takes_maskris_count_per_row(ratio):
    allowed = torch.rand(64, 37, generator=torch.Generator().manual_seed(1)) < 0.6
    chosen = random_subset(allowed, ratio, torch.Generator().manual_seed(2))
    assert not (chosen & ~allowed).any()
    n = allowed.sum(1)
    expected = n - torch.floor(n.double() * (1 - ratio)).long()  # MaskRIS: L - int(L * (1 - r))
    assert torch.equal(chosen.sum(1), expected)


def test_masked_pixels_form_whole_patches_and_nothing_else():
    images = torch.rand(6, 3, 64, 64) + 0.5  # no zero anywhere
    out, patches = mask_image(images, patch_size=16, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert patches.shape == (6, 4, 4) and torch.equal(patches.sum((1, 2)), torch.full((6,), 12))
    blocks = out.unflatten(2, (4, 16)).unflatten(4, (4, 16))  # [B, C, 4, 16, 4, 16]
    zero = (blocks != 0).sum(dim=(1, 3, 5)) == 0
    assert torch.equal(zero, patches)
    kept = ~patches[:, None, :, None, :, None].expand_as(blocks)
    assert torch.equal(blocks[kept], images.unflatten(2, (4, 16)).unflatten(4, (4, 16))[kept])


def test_non_divisible_image_crops_the_border_patches():
    images = torch.rand(2, 3, 20, 28) + 0.5
    out, patches = mask_image(images, patch_size=8, ratio=1.0)
    assert patches.shape == (2, 3, 4) and patches.all() and (out == 0).all()
    out, patches = mask_image(images, patch_size=8, ratio=0.5, generator=torch.Generator().manual_seed(3))
    for b in range(2):
        for i in range(3):
            for j in range(4):
                block = out[b, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                assert bool((block == 0).all()) == bool(patches[b, i, j])


def test_patch_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="patch_size 32 is larger than the 16x16 image"):
        mask_image(torch.zeros(1, 3, 16, 16), patch_size=32, ratio=0.75)


def test_bert_style_rates_and_specials():
    """Statistical: chosen ≈ r_T of the eligible tokens, 80/10/10 among the chosen (5 sigma)."""
    g = torch.Generator().manual_seed(0)
    vocab, specials, mask_id = 30, (0, 1, 2), 3
    ids = torch.randint(0, vocab, (400, 64), generator=g)
    eligible = ~torch.isin(ids, torch.tensor((*specials, mask_id)))
    new, picked = corrupt_ids(
        ids, eligible, ratio=0.15, split=(0.8, 0.1, 0.1), mask_id=mask_id, vocab_size=vocab,
        excluded=(*specials, mask_id), generator=g,
    )
    chosen, to_mask, to_random = picked["chosen"], picked["to_mask"], picked["to_random"]
    n = int(eligible.sum())
    assert (
        not (chosen & ~eligible).any() and torch.equal(new[~eligible], ids[~eligible])
    )  # specials untouched
    assert abs(int(chosen.sum()) - 0.15 * n) < 5 * math.sqrt(n * 0.15 * 0.85)
    m = int(chosen.sum())
    for part, p in ((to_mask, 0.8), (to_random, 0.1), (chosen & ~to_mask & ~to_random, 0.1)):
        assert abs(int(part.sum()) - p * m) < 5 * math.sqrt(m * p * (1 - p))
    assert (new[to_mask] == mask_id).all()
    assert not torch.isin(new[to_random], torch.tensor((*specials, mask_id))).any()
    assert ((new >= 0) & (new < vocab)).all()
    unchanged = ~(to_mask | to_random)
    assert torch.equal(new[unchanged], ids[unchanged])


def test_every_non_excluded_id_can_be_drawn():
    ids = torch.full((50, 200), 10)
    new, _ = corrupt_ids(
        ids, torch.ones_like(ids, dtype=torch.bool), ratio=1.0, split=(0.0, 1.0, 0.0),
        mask_id=None, vocab_size=8, excluded=(0, 3, 7), generator=torch.Generator().manual_seed(0),
    )
    assert set(new.unique().tolist()) == {1, 2, 4, 5, 6}


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"image_ratio": 1.5}, ValueError, "image_ratio must lie in"),
    ({"text_ratio": -0.1}, ValueError, "text_ratio must lie in"),
    ({"text_mask": 0.7}, ValueError, "must be 1"),
    ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
    ({"patch_size": 8.0}, TypeError, "patch_size must be an int"),
    ({"mask_id": 60, "vocab_size": 50}, ValueError, "mask_id 60 lies outside the vocabulary"),
    ({"mode": "pixels"}, ValueError, "mode must be one of"),
    ({"special_ids": (0, -1)}, TypeError, "special_ids"),
])
def test_config_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        MaskRISConfig(**kwargs)


def test_usage_errors_name_the_fix():
    with pytest.raises(TypeError, match="ids must be an integer"):
        corrupt_ids(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), ratio=0.1, split=(1, 0, 0),
                    mask_id=1, vocab_size=5)
    with pytest.raises(ValueError, match="pass image_dim="):
        MaskRIS(MaskRISConfig(mode="embedding"), text_dim=16)
    wrapper = towers_wrapper([towers_maskris(mask_id=None)], lmvsd=None, vmlsd=None)
    with pytest.raises(ValueError, match=r"mask_id=\.\.\.\) \(BERT: 103\)"):
        train_step(wrapper, towers_batch())
    for split in ({}, {"text_mask": 0.9, "text_random": 0.0}):  # the word table has 50 rows
        wrapper = towers_wrapper([towers_maskris(mask_id=60, **split)], lmvsd=None, vmlsd=None)
        with pytest.raises(ValueError, match="mask_id 60 lies outside the vocabulary"):
            train_step(wrapper, towers_batch())
    wrapper = towers_wrapper([towers_maskris(patch_size=32)], lmvsd=None, vmlsd=None)
    with pytest.raises(ValueError, match="patch_size 32 is larger than the 16x16 image"):
        train_step(wrapper, towers_batch())


# ---------------------------------------------------------------------------- the objective


def test_corrupted_pass_sees_the_corrupted_inputs_on_myris():
    objective = myris_maskris()
    wrapper = myris_wrapper(objective, lmvsd=None, vmlsd=None)
    calls = Recorder(wrapper.unwrap())
    images, ids, target = hooks_batch()
    out = train_step(wrapper, (images, ids, target))
    info = out.selections["maskris"]
    assert len(calls.calls) == 3  # the fusion probe (first step only), the main pass, one corrupted pass
    (img0, ids0), (img1, ids1) = calls.calls[1:]
    assert torch.equal(img0, images) and torch.equal(ids0, ids)
    pixels = info["image_masked"].repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    assert torch.equal(img1[pixels], torch.zeros(int(pixels.sum()))) and torch.equal(
        img1[~pixels], images[~pixels]
    )
    assert info["image_masked"].sum((1, 2)).tolist() == [12] * 4  # 16 patches of 8 px, 75 %
    assert torch.equal(ids1, info["ids"]) and (ids1[info["text_to_mask"]] == 1).all()
    assert not (info["text_chosen"] & (ids == hook_models.PAD)).any()
    torch.testing.assert_close(out.losses["maskris"], consistency_loss(info["logits"], out.logits))


@pytest.mark.parametrize("mode", ["input", "embedding"])
@pytest.mark.parametrize("backend", ["towers", "hooks"])
def test_trains_alone_with_the_paper_weights(backend, mode):
    objective = towers_maskris(mode) if backend == "towers" else myris_maskris(mode)
    build = (
        towers_wrapper if backend == "towers" else lambda objectives, **o: myris_wrapper(objectives[0], **o)
    )
    wrapper = build([objective], **MaskRIS.paper_options())
    assert list(wrapper.objectives) == ["maskris"] and wrapper.seg_weight == 0.5
    data = towers_batch() if backend == "towers" else hooks_batch()
    out = train_step(wrapper, data)
    torch.testing.assert_close(out.loss, 0.5 * out.losses["seg"] + 0.5 * out.losses["maskris"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert_all_grads(wrapper.unwrap())
    if mode == "embedding":
        assert_all_grads(wrapper, "objectives.maskris.")
    else:
        assert not list(wrapper.added_parameters())
    again = build(
        [towers_maskris(mode) if backend == "towers" else myris_maskris(mode)], **MaskRIS.paper_options()
    )
    torch.testing.assert_close(
        train_step(again, data).losses["maskris"], out.losses["maskris"]
    )  # reproducible
    wrapper.eval()
    images, ids, _ = data
    with torch.no_grad():
        assert torch.equal(wrapper(images, ids), wrapper.unwrap()(images, ids))


@pytest.mark.parametrize("mode", ["input", "embedding"])
def test_beside_lmvsd_and_vmlsd(mode):
    wrapper = myris_wrapper(myris_maskris(mode))
    out = train_step(wrapper, hooks_batch())
    assert set(out.losses) == {"seg", "lmvsd", "vmlsd", "maskris"}
    out.loss.backward()
    assert_all_grads(wrapper)


def test_embedding_mode_replaces_both_modalities_in_one_pass():
    objective = myris_maskris("embedding", text_ratio=1.0, text_mask=1.0, text_random=0.0, text_keep=0.0)
    wrapper = myris_wrapper(objective, lmvsd=None, vmlsd=None)
    seen: dict[str, list] = {"patch_embed": [], "word_embed": []}
    for name in seen:  # the input of the next module: what the embedding hook returned
        after = {"patch_embed": wrapper.unwrap().backbone, "word_embed": wrapper.unwrap().text_encoder}[name]
        after.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach().clone())
        )
    images, ids, target = hooks_batch()
    out = train_step(wrapper, (images, ids, target))
    assert len(seen["patch_embed"]) == 3 and len(seen["word_embed"]) == 3  # probe, main, one joint pass
    words = out.selections["maskris"]["text_to_mask"]
    assert torch.equal(words, ids != hook_models.PAD)
    assert torch.allclose(
        seen["word_embed"][2][words], objective.text_token.detach().expand(int(words.sum()), -1)
    )
    masked_units = out.selections["maskris"]["image_masked"]  # [B, 16] on the 4x4 backbone grid
    assert masked_units.shape == (4, 16) and masked_units.sum(1).tolist() == [12] * 4
    image_token = objective.image_token.detach()[None, :, None, None]
    changed = (seen["patch_embed"][2] == image_token).all(1)  # [B, 8, 8] embedded positions
    assert torch.equal(changed, masked_units.view(4, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2))


class _SentenceTower(tiny_models.TinyTextTower):
    """A text tower that tokenises sentences itself (its input is a list of strings, not ids)."""

    def embed(self, sentences):
        ids = torch.tensor([[tiny_models.SOT, 5 + len(s) % 7, tiny_models.EOT] for s in sentences])
        return super().embed(ids)


def test_towers_input_mode_refuses_non_id_texts():
    image_tower, _, decoder = tiny_models.make_model(0)
    wrapper = masksd.MaskedSelfDistill(image_tower, _SentenceTower(), decoder, lmvsd=None, vmlsd=None,
                                       extra_objectives=[towers_maskris(image_ratio=0.0)]).train()
    images, _, target = tiny_models.make_batch(2, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="not integer token ids"):
        wrapper(images, ["a sentence", "another one"], target)


# -------------------------------------------------------------------------- RIS-style models


def lavt_spec() -> HookSpec:
    pwam = "backbone.layers.2.fusion.image_lang_att"
    return HookSpec(
        image=ModalitySpec(embed="backbone.patch_embed", layout="bchw",
                           tokens=Tap(f"{pwam}.f_query", layout="bcn"), reuse=("backbone.layers.*",)),
        text=ModalitySpec(embed="text_encoder.embeddings.word_embeddings",
                          maskable=Maskable(ids="input_ids", never=(2, 3), attention_mask="attention_mask"),
                          tokens=Tap(f"{pwam}.f_key", layout="bcn"), reuse=("text_encoder",)),
        two_class=True,
    )


def test_two_class_lavt_style_bert_loss_is_maskris_soft_cross_entropy():
    """On two-class logits the loss is MaskRIS's CE against ``softmax(main logits).detach()``."""
    pytest.importorskip("transformers")
    from ris_models import lavt_style

    torch.manual_seed(0)
    model = lavt_style.LAVTOne()
    objective = MaskRIS(MaskRISConfig(patch_size=16, mask_id=lavt_style.MASK, special_ids=(0, 2, 3, 4)))
    wrapper = masksd.wrap(model, lavt_spec(), extra_objectives=[objective], **MaskRIS.paper_options())
    outputs: list = []
    model.register_forward_hook(lambda m, args, out: outputs.append(out))
    batch = lavt_style.make_batch()
    wrapper.train()
    out = wrapper(batch.image, batch.input_ids, batch.attention_mask, target=batch.target,
                  generator=torch.Generator().manual_seed(0))
    main, masked = outputs[-2], outputs[-1]
    soft_ce = F.cross_entropy(masked.float(), F.softmax(main.detach().float(), dim=1))
    torch.testing.assert_close(out.losses["maskris"], soft_ce.detach())
    assert vocab_ok(out.selections["maskris"]["ids"], lavt_style.VOCAB_SIZE)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.backbone.patch_embed.proj.weight.grad is not None
    wrapper.eval()
    with torch.no_grad():
        args = (batch.image, batch.input_ids, batch.attention_mask)
        assert torch.equal(wrapper(*args), model(*args))


def vocab_ok(ids: torch.Tensor, vocab: int) -> bool:
    return bool(((ids >= 0) & (ids < vocab)).all())


def test_cris_style_model_with_its_own_loss():
    """CRIS: forward(img, word, mask) -> (pred.detach(), mask, loss); logits tapped on ``proj``."""
    from ris_models import cris_style

    spec = HookSpec(
        image=ModalitySpec(embed="backbone.visual.avgpool", layout="bchw", width=16),
        text=ModalitySpec(embed="backbone.token_embedding", maskable=Maskable(ids="word", never=(0, 98, 99))),
        logits=Tap("proj"), target="mask", loss="[2]",
    )
    torch.manual_seed(0)
    model = cris_style.CRIS()
    objective = MaskRIS(MaskRISConfig(patch_size=16, mask_id=1))  # CLIP has no [MASK]: some word id
    wrapper = masksd.wrap(model, spec, extra_objectives=[objective], **MaskRIS.paper_options())
    batch = cris_style.make_batch()
    out = wrapper.train()(
        batch.img, batch.word, target=batch.mask, generator=torch.Generator().manual_seed(0)
    )
    info = out.selections["maskris"]
    assert not torch.isin(info["ids"][info["text_to_random"]], torch.tensor([0, 98, 99, 1])).any()
    assert not (info["text_chosen"] & torch.isin(batch.word, torch.tensor([0, 98, 99]))).any()
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.backbone.visual.conv1.weight.grad is not None


@pytest.mark.parametrize("dropout", ["fresh", "replay"])
def test_uncorrupted_pass_replays_the_main_dropout(dropout):
    """With nothing masked the extra pass is the main pass again: identical logits when the branches
    replay the main branch's dropout draws (CRIS's decoder has dropout 0.1), different otherwise."""
    from ris_models import cris_style

    spec = HookSpec(image=ModalitySpec(embed="backbone.visual.avgpool", layout="bchw", width=16),
                    logits=Tap("proj"), target="mask", loss="[2]")
    torch.manual_seed(0)
    objective = MaskRIS(MaskRISConfig(image_ratio=0.0, text_ratio=0.0))
    wrapper = masksd.wrap(cris_style.CRIS(), spec, extra_objectives=[objective], lmvsd=None, dropout=dropout)
    batch = cris_style.make_batch()
    out = wrapper.train()(batch.img, batch.word, target=batch.mask)
    same = torch.equal(out.selections["maskris"]["logits"], out.logits.detach())
    assert same == (dropout == "replay")


# ------------------------------------------------------------------------------ DDP (gloo)

WORLD_SIZE, STEPS = 2, 3


def _ddp_worker(rank: int, port: int, result_dir: str, backend: str, mode: str) -> None:
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP broadcasts rank 0's
    if backend == "towers":
        wrapper = towers_wrapper([towers_maskris(mode)], seed=rank)
        batch = towers_batch
    else:
        wrapper = myris_wrapper(myris_maskris(mode), seed=rank)
        batch = hooks_batch
    model = DistributedDataParallel(wrapper.train())  # find_unused_parameters=False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask_gen = torch.Generator().manual_seed(2000 + rank)  # different masks per rank
    losses = []
    for step in range(STEPS):
        images, ids, target = batch(4, seed=1000 * rank + step)
        out = model(images, ids, target=target, generator=mask_gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.losses["maskris"].item())
    _, same = replicas(wrapper, WORLD_SIZE)
    if rank == 0:
        result = {**same, "losses": losses}
        Path(result_dir, "result.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "mode"), [("hooks", "input"), ("towers", "embedding")])
def test_ddp_replicas_stay_equal(tmp_path, backend, mode):
    import json
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_ranks(_ddp_worker, (port, str(tmp_path), backend, mode), world_size=WORLD_SIZE, marker_dir=tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"] and result["finite"]
    assert len(result["losses"]) == STEPS and all(math.isfinite(v) for v in result["losses"])
