"""`mlp_tile_tokens` (qlora/speed/tiled_mlp.py): the MLP in tiles along the sequence trains the same numbers
(up to the order LoRA gradients are summed in), keeps none of the MLP's intermediates for backward, replays
the forward's dropout masks in backward, and refuses the settings it cannot serve."""

import pytest
import torch

from qlora.config import ConfigError
from qlora.model.trainable import describe_speedups
from qlora.speed import tiled_mlp
from qlora.speed.switches import Where, check_switches

from conftest import tiny_cfg
from test_rebuild import cfg_for, loss_grads_and_saved, sql_examples_tiny  # noqa: F401 (a fixture)

TILE = 48  # tokens: the 2 x 256-token batch runs in 11 tiles, the last one short

# tolerance: measured in fp32 on a 2-core AVX512-BF16 CPU, tiled vs whole give the same loss bitwise and LoRA
# gradients within 4.0e-7 of their largest entry (the tiles' sums in another order); 1e-5 leaves room for other
# CPUs' BLAS blocking.
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOL * b.abs().max())


def check_close(res0, res1):
    (_, loss0, grads0, _), (_, loss1, grads1, _) = res0, res1
    assert close(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        assert close(grads1[n], grads0[n]), (n, (grads1[n] - grads0[n]).abs().max() / grads0[n].abs().max())


def test_same_numbers_and_no_intermediates_kept(sql_examples_tiny):
    batch = sql_examples_tiny
    whole = loss_grads_and_saved(cfg_for("random:tiny", lora_dropout=0.0), batch)
    tiled = loss_grads_and_saved(cfg_for("random:tiny", lora_dropout=0.0, mlp_tile_tokens=TILE), batch)
    check_close(whole, tiled)
    model = tiled[0]
    assert "MLPs in tiles of 48 tokens" in describe_speedups(model)
    # each layer's MLP keeps its input only: gate, up and act(gate) * up (tokens x intermediate each) are gone
    c, tokens = model.config, batch["input_ids"].numel()
    assert whole[3] - tiled[3] >= tokens * c.num_hidden_layers * 3 * c.intermediate_size * 4


def test_under_recompute_with_offloaded_inputs(sql_examples_tiny):
    kw = dict(lora_dropout=0.0, recompute=True, offload_recompute=True)
    check_close(loss_grads_and_saved(cfg_for("random:tiny", **kw), sql_examples_tiny),
                loss_grads_and_saved(cfg_for("random:tiny", mlp_tile_tokens=TILE, **kw), sql_examples_tiny))


def test_backward_replays_the_forward_dropout_masks(sql_examples_tiny, monkeypatch):
    """With torch's dropout (random masks), the tiles' backward must draw the masks their forward drew. The
    reference runs the same tiles in the same order with plain autograd (masks stored, not redrawn)."""
    kw = dict(lora_dropout=0.1, mlp_tile_tokens=TILE)
    tiled = loss_grads_and_saved(cfg_for("random:tiny", **kw), sql_examples_tiny)

    def plain_tiles(run, tile, preserve_rng, anchor, x):
        flat = x.reshape(-1, x.shape[-1])
        outs = [run(flat[i:i + tile].unsqueeze(0)).squeeze(0) for i in range(0, flat.shape[0], tile)]
        return torch.cat(outs).view(*x.shape[:-1], -1)

    monkeypatch.setattr(tiled_mlp._TiledMLP, "apply", plain_tiles)
    check_close(loss_grads_and_saved(cfg_for("random:tiny", **kw), sql_examples_tiny), tiled)
    # and the masks matter: whole-MLP dropout draws others
    whole = loss_grads_and_saved(cfg_for("random:tiny", lora_dropout=0.1), sql_examples_tiny)
    assert not close(tiled[1], whole[1]) or not all(close(tiled[2][n], whole[2][n]) for n in whole[2])


def test_short_micro_batches_are_untouched(sql_examples_tiny):
    kw = dict(lora_dropout=0.0)
    whole = loss_grads_and_saved(cfg_for("random:tiny", **kw), sql_examples_tiny)
    big = loss_grads_and_saved(cfg_for("random:tiny", mlp_tile_tokens=10_000, **kw), sql_examples_tiny)
    assert torch.equal(whole[1], big[1]) and all(torch.equal(whole[2][n], big[2][n]) for n in whole[2])


@pytest.mark.parametrize("change, where, why", [
    (dict(cuda_graphs=True), Where(torch.device("cpu")), "needs cuda_graphs false"),
    ({}, Where(torch.device("cpu"), processes=2), "needs one process"),
])
def test_refuses_what_it_cannot_serve(change, where, why):
    with pytest.raises(ConfigError, match=why):
        check_switches(tiny_cfg(mlp_tile_tokens=TILE, **change), where)


def test_bad_value_is_one_error():
    from qlora.config import validate

    with pytest.raises(ConfigError, match="mlp_tile_tokens"):
        validate(tiny_cfg(mlp_tile_tokens=-1))
