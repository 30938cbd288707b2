"""PerceiverResampler (Sec. 4.1) against an independent einsum transcription of the same math."""

import math

import pytest
import torch

from resampler import PerceiverResampler

IN, DIM, OUT, HEADS, DH = 24, 40, 12, 4, 8


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference(m, keys, latents, mask):
    """Sec. 4.1 / docs/design.md §3 written out with einsum; reads only the module's parameters, by name."""
    p = dict(m.named_parameters())
    x = keys @ p["proj_in.weight"].T + p["proj_in.bias"]  # (B, T, D)
    lat = p["latents"] if latents is None else latents @ p["proj_in.weight"].T + p["proj_in.bias"]
    lat = lat.expand(x.shape[0], -1, -1)  # (B, Q, D)
    B, T, Q = x.shape[0], x.shape[1], lat.shape[1]
    allowed = torch.cat([mask, torch.ones(B, Q, dtype=torch.bool)], 1)  # (B, T+Q)
    for i in range(len(m.layers)):
        a, f = f"layers.{i}.attn.", f"layers.{i}.ff."
        ln_lat = layer_norm(lat, p[a + "norm_latents.weight"], p[a + "norm_latents.bias"])
        ctx = torch.cat([layer_norm(x, p[a + "norm_keys.weight"], p[a + "norm_keys.bias"]), ln_lat], 1)
        q = torch.einsum("bqd,ed->bqe", ln_lat, p[a + "to_q.weight"]).reshape(B, Q, HEADS, DH)
        kv = torch.einsum("btd,ed->bte", ctx, p[a + "to_kv.weight"])
        k = kv[..., : HEADS * DH].reshape(B, T + Q, HEADS, DH)
        v = kv[..., HEADS * DH :].reshape(B, T + Q, HEADS, DH)
        s = torch.einsum("bqhe,bthe->bhqt", q, k) / math.sqrt(DH)
        s = torch.where(allowed[:, None, None, :], s, torch.tensor(-1e30))
        w = torch.exp(s - s.amax(-1, keepdim=True))
        w = w / w.sum(-1, keepdim=True)
        o = torch.einsum("bhqt,bthe->bqhe", w, v).reshape(B, Q, HEADS * DH)
        lat = lat + torch.einsum("bqe,de->bqd", o, p[a + "to_out.weight"])
        h = layer_norm(lat, p[f + "0.weight"], p[f + "0.bias"])
        h = gelu(torch.einsum("bqd,ed->bqe", h, p[f + "1.weight"]))
        lat = lat + torch.einsum("bqe,de->bqd", h, p[f + "3.weight"])
    y = lat @ p["proj_out.weight"].T + p["proj_out.bias"]
    return layer_norm(y, p["norm_out.weight"], p["norm_out.bias"])


def randomise(m):
    """LayerNorms start at ones/zeros; perturb every parameter so each one matters."""
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    return m


@pytest.fixture
def keys_mask():
    torch.manual_seed(0)
    keys = torch.randn(3, 7, IN)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, 2:4] = False  # another task's tokens in the middle
    mask[2, :] = False  # nothing attendable but the latents themselves
    return keys, mask


@pytest.mark.parametrize("depth", [1, 2])
def test_own_latents_match_reference(keys_mask, depth):
    keys, mask = keys_mask
    m = randomise(PerceiverResampler(IN, DIM, OUT, num_latents=5, depth=depth, heads=HEADS, dim_head=DH))
    out = m(keys, key_mask=mask)
    assert out.shape == (3, 5, OUT)
    assert torch.allclose(out, reference(m, keys, None, mask), atol=1e-5)
    assert torch.allclose(m(keys), reference(m, keys, None, torch.ones(3, 7, dtype=torch.bool)), atol=1e-5)


def test_passed_latents_match_reference(keys_mask):
    keys, mask = keys_mask
    m = randomise(PerceiverResampler(IN, DIM, OUT, heads=HEADS, dim_head=DH))
    assert m.latents is None
    latents = torch.randn(3, 6, IN)
    out = m(keys, latents, mask)
    assert out.shape == (3, 6, OUT)
    assert torch.allclose(out, reference(m, keys, latents, mask), atol=1e-5)
    shared = torch.randn(1, 6, IN)  # one query matrix for the whole batch
    assert torch.allclose(m(keys, shared, mask), reference(m, keys, shared, mask), atol=1e-5)


def test_default_config_is_paper_predictor():
    m = PerceiverResampler(64, 48, 16)
    attn, ff = m.layers[0]["attn"], m.layers[0]["ff"]
    assert len(m.layers) == 1 and attn.heads == 4 and attn.dim_head == 32
    assert ff[1].weight.shape == (48, 48)  # ff_mult 1
    assert attn.to_q.bias is None and attn.to_kv.bias is None and attn.to_out.bias is None
    assert ff[1].bias is None and ff[3].bias is None
    assert m.proj_in.bias is not None and m.proj_out.bias is not None


def test_masked_keys_have_no_influence(keys_mask):
    keys, mask = keys_mask
    m = randomise(PerceiverResampler(IN, DIM, OUT, heads=HEADS, dim_head=DH))
    latents = torch.randn(3, 4, IN)
    out = m(keys, latents, mask)
    changed = torch.where(mask[..., None], keys, 100 * torch.randn_like(keys))
    assert torch.equal(m(keys, latents, mask), out)
    assert torch.equal(m(changed, latents, mask), out)
    assert not torch.allclose(m(changed, latents), m(keys, latents), atol=1e-3)  # unmasked: they do
    bumped = keys.clone()
    bumped[0, 0] += 1.0  # an attendable key
    diff = (m(bumped, latents, mask) - out).abs().amax(dim=(1, 2))
    assert diff[0] > 1e-4 and diff[1:].max() == 0  # only its own sample


def test_gradient_reaches_latents_and_keys(keys_mask):
    keys, mask = keys_mask
    keys = keys.clone().requires_grad_()
    own = PerceiverResampler(IN, DIM, OUT, num_latents=5, heads=HEADS, dim_head=DH)
    own(keys, key_mask=mask).square().sum().backward()
    assert own.latents.grad.abs().sum() > 0 and keys.grad[0, :5].abs().sum() > 0
    assert keys.grad[0, 5:].abs().sum() == 0  # masked: no gradient
    passed = PerceiverResampler(IN, DIM, OUT, heads=HEADS, dim_head=DH)
    query = torch.randn(1, 6, IN, requires_grad=True)
    passed(keys, query, mask).square().sum().backward()
    assert query.grad.abs().sum() > 0


def test_latents_argument_checked(keys_mask):
    keys, _ = keys_mask
    with pytest.raises(ValueError, match="latents"):
        PerceiverResampler(IN, DIM, OUT, num_latents=5)(keys, torch.randn(3, 5, IN))
    with pytest.raises(ValueError, match="latents"):
        PerceiverResampler(IN, DIM, OUT)(keys)
    with pytest.raises(ValueError, match="key_mask"):
        PerceiverResampler(IN, DIM, OUT, num_latents=5)(keys, key_mask=torch.ones(3, 6, dtype=torch.bool))
