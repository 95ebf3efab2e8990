"""``torch.compile`` with the hook backend: the bare model compiled in place, its submodules, or
the wrapper; two training steps each match eager (losses, every gradient).

Uses the ``aot_eager`` backend (dynamo + AOTAutograd, no code generation: seconds on a CPU);
inductor itself is covered on the tower backend by ``tests/test_compile.py`` behind
``MASKSD_TEST_INDUCTOR``. ``torch.compile(model)`` (an ``OptimizedModule``) is still refused by
``masksd.wrap``: the hooks would land on the wrapper object, not on the model's modules.
After the first two steps nothing recompiles (tested): the per-step state the hooks keep does
not fail dynamo's guards. Compiling the wrapper used to fail with ``AttributeError: 'Sequential'
object has no attribute 'forward'``: dynamo deferred the branch's ``module.forward = Replay(...)``
but ran the traced ``del module.forward`` (now both run eagerly, ``masksd.engine.recorder``).
"""

from __future__ import annotations

import pytest
import torch
from hook_models import TinyRIS, make_batch, tiny_spec
from torch._dynamo.utils import counters

import masksd

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(),
                                reason="torch.compile is not supported here")

STEPS = 4
# torch 2.1's dynamo inlines the modules inside a compiled module without running their hooks
# (2.2.2, 2.3.1 and 2.14.1 run them); masksd then refuses the step instead of training without them
HOOKS_INSIDE_COMPILED = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 2)


def _train(how: str) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], int]]:
    """``STEPS`` training steps: per step the loss, every gradient and dynamo's graph count so far."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = TinyRIS()
    wrapper = masksd.wrap(model, tiny_spec(), vmlsd=masksd.VMLSDConfig(top_k=1.0, ratio=0.5)).train()
    step = wrapper
    if how == "model":  # nn.Module.compile(): in place, the model object and its hooks stay
        model.compile(backend="aot_eager")
    elif how == "submodules":
        model.backbone.compile(backend="aot_eager")
        model.text_encoder.compile(backend="aot_eager")
    elif how == "wrapper":
        step = torch.compile(wrapper, backend="aot_eager")
    results = []
    for i in range(STEPS):
        images, ids, target = make_batch(seed=i)
        out = step(images, ids, target=target, generator=torch.Generator().manual_seed(i))
        out.loss.backward()
        grads = {n: p.grad for n, p in wrapper.named_parameters()}
        results.append((out.loss.detach(), grads, counters["stats"]["unique_graphs"]))
        wrapper.zero_grad(set_to_none=True)
    return results


def test_compiled_bare_model_refused_when_passed_as_optimized_module():
    with pytest.raises(TypeError, match=r"wrap the bare model first"):
        masksd.wrap(torch.compile(TinyRIS(), backend="aot_eager"), tiny_spec())


@pytest.mark.parametrize("how", ["model", "submodules", "wrapper"])
def test_compiled_training_steps_match_eager(how):
    if how != "submodules" and not HOOKS_INSIDE_COMPILED:
        with pytest.raises(ValueError, match=r"did not run in this forward.*torch 2\.1"):
            _train(how)
        return
    eager = _train("eager")
    compiled = _train(how)
    for (loss, grads, _), (ref_loss, ref_grads, _) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(loss, ref_loss)
        assert all(g is not None for g in ref_grads.values())
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # no graph compiled after the second step: masksd's per-step state (the check() logs, the
    # skipped modules' Replay objects) used to fail dynamo's guards and recompile at every step
    graphs = [count for _, _, count in compiled]
    assert graphs[0] > 0 and graphs[1:] == [graphs[1]] * (STEPS - 1), graphs


def test_compiled_cris_style_model_matches_eager():
    """CRIS's projector returns a transposed view and its training forward returns ``pred.detach()``:
    the kept logits and the returned detached copy made AOTAutograd fail ("incorrect out shape after
    application of ViewMeta sequence", also with ``torch.compile(wrapper)``); masksd now keeps
    copies under compile (``masksd.engine.recorder.captured``)."""
    from ris_models import cris_style
    from ris_models.specs import cris_spec

    results = {}
    for mode in ("eager", "model"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = cris_style.CRIS()
        wrapper = masksd.wrap(model, cris_spec()).train()
        if mode == "model":
            model.compile(backend="aot_eager")
        batch = cris_style.make_batch()
        out = wrapper(batch.img, batch.word, batch.mask, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        results[mode] = (out.losses, {n: p.grad for n, p in wrapper.named_parameters()})
    (losses, grads), (ref_losses, ref_grads) = results["model"], results["eager"]
    torch.testing.assert_close(losses, ref_losses)
    for name, grad in ref_grads.items():
        if grad is None:
            assert grads[name] is None, name
        else:  # gradients up to ~10: float noise of a different op order is ~1e-5
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)


def test_code_compiled_before_wrapping_is_named_as_the_cause():
    """Dynamo does not guard on module hooks: a model compiled and run before ``masksd.wrap`` keeps
    running its hook-less code. masksd notices that the hooks did not fire and says why."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyRIS()
    model.compile(backend="aot_eager")
    images, ids, target = make_batch()
    model(images, ids)  # compiled here, without hooks
    wrapper = masksd.wrap(model, tiny_spec()).train()
    not_run = "ran 0 times" if HOOKS_INSIDE_COMPILED else "did not run in this forward"
    with pytest.raises(ValueError, match=rf"{not_run}.*skip_nnmodule_hook_guards.*wrap first, then compile"):
        wrapper(images, ids, target=target)
    torch._dynamo.reset()
